"""The benchmark scripts' own logic on tiny CPU models: the kernel-class profile of search_step.py --profile and
the traffic count of step_traffic.py (their numbers land in benchmarks/RESULTS.md, so they must be right)."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import search_step as ss  # noqa: E402
import step_traffic as st  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")
TINY = dict(C=4, layers=5, K=4, seed=2, compile_backend="inductor")


@pytest.mark.parametrize("name,cls", [
    ("aten::convolution_backward", "convolution"), ("void cudnn::bn_fw_tr_1C11_kernel_NCHW<float>", "batch norm"),
    ("sm90_xmma_fprop_implicit_gemm_tf32", "convolution"), ("aten::max_pool2d_with_indices", "pooling"),
    ("void at::native::vectorized_elementwise_kernel<4, add>", "elementwise"), ("aten::cat", "copy / cat"),
    ("Memcpy DtoD (Device -> Device)", "copy / cat"), ("triton_poi_fused_add_mul_0", "elementwise"),
    ("aten::native_batch_norm_backward", "batch norm"), ("something_new", "other"),
])
def test_kernel_class(name, cls):
    assert ss.kernel_class(name) == cls


def test_profile_steps_accounts_the_step_on_cpu():
    args = argparse.Namespace(**TINY)
    model, step = ss.build_step(ss.parse_variant("eager+be"), args, torch.device("cpu"))
    batches = ss.make_batches(2, 2, torch.device("cpu"), size=16)
    ss.one_step(step, batches, 0)
    prof = ss.profile_steps(step, batches, 2, torch.device("cpu"))
    assert prof["total_ms"] > 0 and prof["kernels_per_step"] > 100
    assert abs(sum(prof["by_class"].values()) - prof["total_ms"]) < 1e-2 * prof["total_ms"] + 0.01
    assert prof["by_class"]["convolution"] > 0 and prof["by_class"]["batch norm"] > 0
    assert len(prof["top"]) == 15 and prof["top"][0]["ms"] >= prof["top"][-1]["ms"]


def test_step_traffic_counts_bytes_and_scales_with_batch():
    args = argparse.Namespace(**TINY)
    small, big = st.measure("eager", 2, args), st.measure("eager", 4, args)
    batched = st.measure("eager+be", 2, args)
    assert small["ops"] == big["ops"] > 1000  # the same ops whatever the batch
    # activations scale with the batch, parameters and optimizer state do not: between 1.6x and 2x the bytes
    assert 1.6 < big["bytes"] / small["bytes"] <= 2.0
    assert big["flops"] == pytest.approx(2 * small["flops"], rel=0.01)  # convolutions: linear in the batch
    assert batched["ops"] < 0.6 * small["ops"]  # the batched cell: fewer, larger ops
    assert sum(n for n, _, _ in small["per_class"].values()) == small["ops"]
    roof, with_nodes = st.floor_ms(small, "h100", 2.8)
    assert 0 < roof < with_nodes and with_nodes - roof == pytest.approx(small["ops"] * 2.8e-3)


def test_step_traffic_refuses_graph_and_compile_variants():
    args = argparse.Namespace(**TINY)
    for v in ("graph+be", "eager+compile+be"):
        with pytest.raises(SystemExit, match="counts the eager ops"):
            st.measure(v, 2, args)
