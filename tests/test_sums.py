"""The one-pass sums (hvd_pcdarts/models/sums.py, batched_cell.OPTIONS["sums"] = "triton"): add_all against a
float64 sum for 2-17 terms (chunks of 8), float32/bf16/float16, NCHW/NHWC; fan_out's summed gradients; the
fallbacks (torch's adds, bit for bit) where the kernel does not run; and the batched search cell with the option
against the per-edge reference.

Without a GPU the kernel runs in Triton's interpreter (subprocesses with TRITON_INTERPRET=1); on a GPU compiled,
plus a graphed search step."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import describe, launch, python_exe
from search_runs import cuda_search_steps, rel_diff
from triton_checks import VECTOR_LOAD, assert_no_spills, compile_sm90, interpreted, net_script

from hvd_pcdarts.models import batched_cell, depthwise, sums

pytestmark = pytest.mark.skipif(depthwise.triton is None, reason="triton is not installed")

CHECK = r"""
import json, sys, torch
from hvd_pcdarts.models import sums
device, dtype = sys.argv[1], getattr(torch, sys.argv[2])
launches = []
launch = sums._launch
sums._launch = lambda xs: launches.append(len(xs)) or launch(xs)
torch.manual_seed(0)
out = {}
for n in (2, 3, 7, 8, 9, 15, 16, 17):
    for layout in ("nchw", "nhwc"):
        xs = [torch.randn(3, 6, 5, 7, device=device).to(dtype) for _ in range(n)]
        if layout == "nhwc":
            xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
        xs = [x.requires_grad_() for x in xs]
        before = len(launches)
        y = sums.add_all(xs)
        ref = torch.stack([x.detach().double() for x in xs]).sum(0)
        g0 = torch.randn_like(y)
        gs = torch.autograd.grad(y, xs, g0)
        out[f"{n}-{layout}"] = dict(err=float((y.double() - ref).abs().max() / ref.abs().max()),
                                    launched=len(launches) - before, same_strides=y.stride() == xs[0].stride(),
                                    dtype=str(y.dtype), grad_same=all(torch.equal(g, g0) for g in gs))
# fan_out: three readers (one unused in this pass), their gradients summed by the kernel
x = torch.randn(2, 4, 6, 6, device=device).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
d = sums.fan_out(x, ["a", "b", "c"])
before = len(launches)
ga, gb = (torch.randn_like(x) for _ in range(2))  # channels_last, as x
(gx,) = torch.autograd.grad([d["a"] * 3, d["b"] ** 2], x, [ga, gb])
expect = 3 * ga.double() + 2 * x.detach().double() * gb.double()
launched = len(launches) - before
# a channel slice (not dense) read by two ops: aliases all the same; its readers' gradients are dense
parent = torch.randn(2, 8, 5, 5, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
xs = parent.requires_grad_()[:, 2:6]
d2 = sums.fan_out(xs, [0, 1])
(gp,) = torch.autograd.grad([d2[0] * 2, d2[1] * 3], parent, [torch.ones_like(xs)] * 2)
slice_ok = bool((gp[:, 2:6] == 5).all() and (gp[:, :2] == 0).all() and (gp[:, 6:] == 0).all())
out["fan"] = dict(slice_ok=slice_ok, launched=launched,
                  err=float((gx.double() - expect).abs().max() / expect.abs().max()),
                  aliases=all(v.data_ptr() == x.data_ptr() for v in d.values()), readers=sorted(d))
# create_graph=True: torch's adds (a graph a second backward follows), the same gradient
d = sums.fan_out(x, ["a", "b"])
before = len(launches)
(gx,) = torch.autograd.grad((d["a"] ** 2).sum() + (d["b"] ** 3).sum(), x, create_graph=True)
launched = len(launches) - before
(hx,) = torch.autograd.grad(gx.sum(), x)  # back through those adds and the aliases again (no graph: the kernel)
out["second"] = dict(err=float((hx.double() - (2 + 6 * x.detach().double())).abs().max()), launched=launched)
print(json.dumps(out))
"""


def _check(out: dict, dtype: str) -> None:
    tol = {"float32": 1e-6, "bfloat16": 8e-3, "float16": 1e-3}[dtype]
    for key, r in out.items():
        if key in ("fan", "second"):
            continue
        n = int(key.split("-")[0])
        assert r["err"] < tol * (1 + n // 8), (key, r)  # chunks: the running sum rounded once per 8 terms
        assert r["launched"] == 1 and r["same_strides"] and r["dtype"] == f"torch.{dtype}", (key, r)
        assert r["grad_same"], (key, r)  # each input gets the output gradient
    assert out["fan"]["err"] < tol and out["fan"]["launched"] == 1, out["fan"]
    assert out["fan"]["aliases"] and out["fan"]["readers"] == ["a", "b", "c"] and out["fan"]["slice_ok"], out["fan"]
    assert out["second"]["launched"] == 0 and out["second"]["err"] < 50 * tol, out["second"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_add_all_and_fan_out_interpreted(dtype):
    _check(interpreted(CHECK, "cpu", dtype), dtype)


def test_fallbacks_are_torchs_adds_bit_for_bit(monkeypatch):
    """Where the kernel cannot run: the chain of adds in the given order, and no launch."""
    monkeypatch.setattr(sums, "_launch", lambda xs: pytest.fail("launched"))
    torch.manual_seed(0)
    xs = [torch.randn(2, 3, 4, 5) for _ in range(4)]
    chain = ((xs[0] + xs[1]) + xs[2]) + xs[3]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not sums.usable(xs) and torch.equal(sums.add_all(xs), chain)  # a CPU tensor without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sums.usable(xs)
    cl = xs[0].contiguous(memory_format=torch.channels_last)
    parent = torch.randn(2, 6, 4, 5)
    for bad in ([cl, *xs[1:]],  # different strides
                [xs[0].double(), *xs[1:]],  # different dtypes
                [parent[:, :3], parent[:, 3:], *xs[2:]],  # channel slices: not dense
                [xs[0], xs[1][:, :, :1].expand(2, 3, 4, 5), *xs[2:]],  # broadcast view
                xs[:1]):
        assert not sums.usable(bad)
        assert torch.equal(sums.add_all(bad), sums._pairwise(bad))
    x = torch.randn(2, 3, 4, 5)  # needs no gradient: no aliases
    assert sums.fan_out(x, ["a", "b"]) == {"a": x, "b": x}
    x.requires_grad_()
    assert sums.fan_out(x, ["a"]) == {"a": x}
    xd = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)  # a dtype the kernel does not sum
    assert sums.fan_out(xd, ["a", "b"]) == {"a": xd, "b": xd}


def test_sums_option_values_are_checked_and_fall_back(monkeypatch):
    x = torch.randn(1, 4, 5, 5)
    monkeypatch.setitem(batched_cell.OPTIONS, "sums", "cuda")
    with pytest.raises(ValueError, match="torch or triton"):
        batched_cell._add_all([x, x])
    monkeypatch.setitem(batched_cell.OPTIONS, "sums", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert torch.equal(batched_cell._add_all([x, 2 * x]), 3 * x)  # no interpreter, a CPU tensor: torch's add
    assert batched_cell._fan_out(x.requires_grad_(), ["relu", "skip"]) == {"relu": x, "skip": x}


def test_factorized_reduce_keeps_channels_last():
    """The stacked FactorizedReduce of a channels_last run comes out channels_last, as the per-edge op's does (it
    came out NCHW: its BN, the group's sum and their gradients in mixed layouts), with the same values."""
    torch.manual_seed(0)
    R = torch.randn(2, 12, 7, 7)
    w1, w2 = torch.randn(6, 4, 1, 1), torch.randn(6, 4, 1, 1)
    ref = batched_cell._factorized_reduce(R, w1, w2, 3)
    out = batched_cell._factorized_reduce(R.contiguous(memory_format=torch.channels_last), w1, w2, 3)
    assert ref.is_contiguous() and batched_cell._is_nhwc(out)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


NET = net_script("sums", "_Sum", r"""
fans = [0]
fan_apply = sums._FanOut.apply
def fan_counted(*a):
    fans[0] += 1
    return fan_apply(*a)
sums._FanOut.apply = fan_counted
out = {}
for fuse, dedup in (("off", False), ("all", False), ("off", True)):
    before = fans[0]
    r = compare(dict(sums="triton", fuse=fuse, dedup=dedup))
    r["fans"] = fans[0] - before  # the training and the bf16 forward (eval needs no gradients: no aliases)
    r["case"] = f"{fuse}-{dedup}"
    out[r["case"]] = r
print(json.dumps(out))
""")


def test_batched_cell_with_triton_sums_equals_reference_interpreted():
    """The batched channels_last search net with its sums through the kernel (also fused and deduplicated) against
    the per-edge reference: loss, gradients and BN statistics in training, eval outputs, bf16-autocast loss."""
    out = interpreted(NET)
    for r in out.values():
        assert r["loss"] < 1e-5 and r["grad"] < 1e-3 and r["stats"] < 1e-5 and r["eval"] < 1e-5, r
        assert r["bf16"] < 2e-2, r
        # one sum of a group's ops per group (5 cells x 4 groups; a node's parts are channel views: torch's adds)
        assert r["calls"] == 5 * 4, r  # (counted over both nets' training forwards: the reference has none)
    # aliases per forward (training and bf16): per cell, each group's input and its ReLU (4 + 4), and the bypassed
    # channels of the states that two or more nodes read (the cell's inputs, nodes 0 and 1: 4); fused ("all"):
    # the ReLU's only reader is the fused chain, except in the reduction cells' first group (and the
    # FactorizedReduce)
    assert out["off-False"]["fans"] == out["off-True"]["fans"] == 2 * 5 * (4 + 4 + 4)
    assert out["all-False"]["fans"] == 2 * (5 * (4 + 4) + 2)


def test_add_n_kernel_compiles_for_sm90_with_vector_loads_and_no_spills(tmp_path):
    for dtype in ("fp32", "bf16"):
        pointers = {p: f"*{dtype}" for p in ["out"] + [f"x{i}" for i in range(sums.MAX_TERMS)]}
        ptx = compile_sm90(sums._add_n_kernel, pointers, ["numel"], dict(N=7, BLOCK=sums.BLOCK), sums.WARPS,
                           aligned=sums.MAX_TERMS + 2)  # and numel a multiple of 16 (Triton specializes it)
        assert re.search(VECTOR_LOAD, ptx)
        assert_no_spills(ptx, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_add_all_and_fan_out_cuda(dtype):
    res = launch([python_exe(), "-c", CHECK, "cuda", dtype], timeout=300)
    assert res.returncode == 0, describe(res)
    _check(json.loads(res.stdout.strip().splitlines()[-1]), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graphed_batched_step_with_triton_sums_equals_eager_reference_cuda(strict_fp32, monkeypatch):
    """The kernel inside the captured search step (streams on: the aliases' gradients come from side streams)."""
    monkeypatch.setitem(batched_cell.OPTIONS, "sums", "triton")
    launches = []
    launch = sums._launch
    monkeypatch.setattr(sums, "_launch", lambda xs: launches.append(len(xs)) or launch(xs))
    (l0, p0, _), (l1, p1, _) = (cuda_search_steps(m, batched=m == "graph", channels_last=True)
                                for m in ("eager", "graph"))
    assert len(launches) > 100  # ran (a silent fallback to torch's adds would pass the comparison too)
    assert max(abs(a - b) for a, b in zip(l0, l1)) < 1e-3
    assert rel_diff(p0, p1) < 1e-3
