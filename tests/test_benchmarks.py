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
    ("triton_poi_fused_convolution_relu_0", "elementwise"), ("triton_red_fused_cat_sum_3", "reduction"),
    ("triton_per_fused__native_batch_norm_legit_functional_1", "batch norm"),
    ("_dwconv_fwd_kernel", "convolution"), ("_dwconv_wgrad_kernel", "convolution"), ("_pool_bwd_kernel", "pooling"),
    ("_add_n_kernel", "elementwise"),
])
def test_kernel_class(name, cls):
    assert ss.kernel_class(name) == cls


class _Ev:
    """A stand-in for the profiler's FunctionEvent: what aggregate_profile reads."""

    def __init__(self, name, device, us, annotation=False):
        from torch.autograd.profiler_util import Interval

        self.name, self.is_user_annotation = name, annotation
        self.device_type = torch.autograd.DeviceType.CUDA if device == "cuda" else torch.autograd.DeviceType.CPU
        self.time_range = Interval(1000, 1000 + us)
        self.self_cpu_time_total = us


def test_aggregate_profile_counts_gpu_kernels_only():
    ev = [_Ev("void cudnn::bn_fw_tr_1C11_kernel_NCHW<float>", "cuda", 300),
          _Ev("void cudnn::bn_fw_tr_1C11_kernel_NCHW<float>", "cuda", 300),
          _Ev("sm90_xmma_fprop_implicit_gemm_tf32", "cuda", 1000),
          _Ev("Memcpy DtoD (Device -> Device)", "cuda", 100),
          _Ev("Optimizer.step#Adam.step", "cuda", 5000, annotation=True),  # a range over other kernels
          _Ev("aten::convolution", "cpu", 9000)]  # the CPU side of the same step
    p = ss.aggregate_profile(ev, 2, "cuda")  # two steps
    assert p["total_ms"] == pytest.approx(0.85) and p["kernels_per_step"] == pytest.approx(2.0)
    assert p["by_class"] == {"convolution": 0.5, "batch norm": 0.3, "copy / cat": 0.05}
    assert p["top"][0] == dict(name="sm90_xmma_fprop_implicit_gemm_tf32", ms=0.5, calls=0.5)
    cpu = ss.aggregate_profile(ev, 1, "cpu")
    assert cpu["total_ms"] == pytest.approx(9.0) and cpu["by_class"] == {"convolution": 9.0}


def test_profile_steps_accounts_the_step_on_cpu():
    args = argparse.Namespace(**TINY)
    model, step = ss.build_step(ss.parse_variant("eager+be"), args, torch.device("cpu"))
    batches = ss.make_batches(2, 2, torch.device("cpu"), size=16)
    ss.one_step(step, batches, 0)
    prof = ss.profile_steps(step, batches, 2, torch.device("cpu"))
    assert prof["total_ms"] > 0 and prof["kernels_per_step"] > 100
    assert abs(sum(prof["by_class"].values()) - prof["total_ms"]) < 1e-2 * prof["total_ms"] + 0.01
    assert any(t["name"] == "aten::convolution_backward" for t in prof["top"])  # the step's backward was traced
    assert prof["by_class"]["convolution"] > 0 and prof["by_class"]["batch norm"] > 0
    assert len(prof["top"]) == 15 and prof["top"][0]["ms"] >= prof["top"][-1]["ms"]


@pytest.mark.slow
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


def test_step_traffic_counts_the_one_pass_sums_as_cuda_runs_them():
    """+tsm: experimental/sums.py's kernel where CUDA would run it (one op, each input read once), torch's adds gone."""
    args = argparse.Namespace(**TINY)
    base, tsm = st.measure("eager+cl+be", 2, args), st.measure("eager+cl+be+tsm", 2, args)
    launches = tsm["counts"]["add_n"]
    assert "add_n" not in base["counts"] and launches > 0
    # per group and pass, one sum of its ops (6 adds before) and two gradient sums (2-3 adds each before)
    assert base["ops"] - tsm["ops"] > 2 * launches
    assert base["counts"]["add"] - tsm["counts"]["add"] > 3 * launches
    assert 0.8 * base["bytes"] < tsm["bytes"] < 0.97 * base["bytes"]
    assert tsm["flops"] == base["flops"]
    # the stand-in enables only the sums: +tdw's depthwise kernels stay off on the CPU (no Triton launch there)
    assert st.measure("eager+cl+be+tsm+tdw", 2, args)["ops"] == tsm["ops"]


def test_step_traffic_refuses_graph_and_compile_variants():
    args = argparse.Namespace(**TINY)
    for v in ("graph+be", "eager+compile+be"):
        with pytest.raises(SystemExit, match="counts the eager ops"):
            st.measure(v, 2, args)


def test_variant_options_set_the_batched_op_choices():
    v = ss.parse_variant("graph+cl+be+pwg+msc+dd")
    assert (v.mode, v.cl, v.be) == ("graph", True, True)
    assert v.opts == {"pointwise": "grouped", "streams": "capture", "dedup": True}
    assert ss.parse_variant("graph+be+fz5").opts == {"fuse": "5x5"}
    assert ss.parse_variant("eager+cl+be+fza+ud3").opts == {"fuse": "all", "dilated": "3x3"}
    assert ss.parse_variant("graph+cl+be+tpl+tdh+bf16").opts == {"pool": "triton", "depthwise": "hybrid"}
    assert ss.parse_variant("graph+cl+be+tsm+bf16").opts == {"sums": "triton"}
    for bad in ("eager+pwg", "eager+be+pwg+pwd", "eager+be+msc+nms", "eager+be+xyz", "eager+be+fz5+fza"):
        with pytest.raises(SystemExit):
            ss.parse_variant(bad)


def _rows(base, times, batch=256):
    rows = [dict(kind="depthwise", batch=batch, ms_median=1.0)]
    for extra, ms in times.items():
        rows.append(dict(kind="search_step", variant=base + extra, batch=batch, ms_median=ms))
    return rows


def test_pick_options_keeps_the_fastest_winner_of_each_choice():
    import pick_options as po

    base = "graph+cl+be+bf16"
    rows = _rows(base, {"": 104.6, "+ud3": 97.0, "+uda": 99.0, "+tdh": 95.0, "+tdw": 96.0, "+fz5": 104.3,
                        "+fza": 110.0, "+dd+ud3": 80.0})  # two options at once: not an A/B of one option
    rows += _rows("graph+cl+be", {"": 50.0, "+tdh": 10.0})  # fp32 rows: another base
    rows += _rows(base, {"+fz5": 90.0}, batch=32)  # another batch
    rows.append(dict(kind="search_step", variant=base + "+dd", batch=256, error="RuntimeError: capture failed"))
    kept, why = po.pick(rows, base, 256)
    assert kept == ["tdh", "ud3"]  # fastest first; +uda and +tdw lose to their choice's faster option
    assert why["fz5"][1] == "no gain"  # 0.3 ms: inside the 1% margin
    assert why["uda"][1].startswith("wins, but +ud3") and why["tdw"][1].startswith("wins, but +tdh")
    assert "dd" not in why
    # words in any order name the same variant; a rerun counts with its last row
    rows2 = _rows(base, {"": 100.0}) + [dict(kind="search_step", variant="graph+be+fz5+cl+bf16", batch=256,
                                             ms_median=m) for m in (90.0, 99.5)]
    assert po.pick(rows2, base, 256)[0] == []


def test_pick_options_cli(tmp_path, capsys):
    import json

    import pick_options as po

    f = tmp_path / "results.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _rows("graph+cl+be+bf16", {"": 104.6, "+ud3": 97.0})))
    assert po.main([str(f), "--base", "graph+cl+be+bf16", "--batch", "256"]) == 0
    out = capsys.readouterr()
    assert out.out == "+ud3\n" and "97.0 ms: wins" in out.err
    assert po.main([str(f), "--base", "graph+be", "--batch", "256"]) == 2  # no base row
    assert "no graph+be row at batch 256" in capsys.readouterr().err
    f.write_text("{not json\n")
    assert po.main([str(f), "--base", "graph+be", "--batch", "256"]) == 2
    assert po.main([str(tmp_path / "missing.jsonl"), "--base", "graph+be", "--batch", "256"]) == 2


def test_cuda_autocast_emulation_applies_cuda_policies_inside_only():
    import cuda_autocast

    h, s = torch.ones(4, dtype=torch.bfloat16), torch.tensor(2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.addcmul(h, h, s).dtype == torch.bfloat16  # the CPU's policy
        assert h.sum(0).dtype == torch.bfloat16
        with cuda_autocast.emulate():
            assert torch.addcmul(h, h, s).dtype == torch.float32  # promote: the float32 0-dim tensor wins
            assert torch.addcmul(h, h, s.to(torch.bfloat16)).dtype == torch.bfloat16
            assert h.sum(0).dtype == torch.float32 and h.sum().dtype == torch.float32
            assert h.sum(0, dtype=torch.bfloat16).dtype == torch.bfloat16  # an explicit dtype is kept
            assert torch.rsqrt(h).dtype == torch.float32
            assert float(torch.addcmul(h, h, s)[0]) == 3.0
        assert torch.addcmul(h, h, s).dtype == torch.bfloat16  # unregistered again
    with cuda_autocast.emulate():
        assert torch.addcmul(h, h, s).dtype == torch.bfloat16  # outside autocast: no policy


def test_search_quality_scores_edges_node_by_node():
    import search_quality as sq

    from hvd_pcdarts.space.genotypes import Genotype

    t = sq.TEACHER
    assert sq.score(t) == dict(normal_edges=8, normal_inputs=8, reduce_edges=8, reduce_inputs=8, normal_skips=1)
    # node 0 swapped (order within a node is free), node 1's op changed, node 2's input changed
    normal = [t.normal[1], t.normal[0], ("max_pool_3x3", 0), t.normal[3], ("dil_conv_3x3", 1), t.normal[5],
              ("skip_connect", 1), ("skip_connect", 4)]
    s = sq.score(Genotype(normal, t.normal_concat, t.reduce, t.reduce_concat))
    assert (s["normal_edges"], s["normal_inputs"], s["normal_skips"]) == (4, 7, 3)
    c = sq.chance(t.normal)  # 2/(j+2) of each node's two teacher inputs is read, 1/7 of those with the op
    assert c["inputs"] == pytest.approx(2 * (1 + 2 / 3 + 1 / 2 + 2 / 5))
    assert c["edges"] == pytest.approx(c["inputs"] / 7)
    assert sq.variant_flags("beta-decay=0.5") == ["--arch-reg", "beta-decay", "--arch-reg-weight", "0.5"]
    assert sq.variant_flags("early-stop=stable:3") == ["--early-stop", "stable:3"] and sq.variant_flags("plain") == []
    for bad in ("skip-cap", "skip-cap=", "dropout=0.1"):
        with pytest.raises(SystemExit, match="unknown variant"):
            sq.variant_flags(bad)


@pytest.mark.slow
def test_search_quality_runs_the_search_on_the_planted_task(tmp_path, capsys):
    """A tiny run end to end: labels of several classes, genotype.json recounted by hand, the table printed."""
    import json

    import search_quality as sq

    out = tmp_path / "r.json"
    assert sq.main(["--variants", "skip-cap=1", "--seeds", "3", "--images", "96", "--classes", "3",
                    "--teacher-channels", "8", "--layers", "3", "--batch-size", "16", "--epochs", "2",
                    "--arch-start-epoch", "0", "--jobs", "1", "--work-dir", str(tmp_path), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    counts = res["teacher"]["class_counts"]
    assert sum(counts) == 96 and len(counts) == 3 and max(counts) < 80  # not all one class
    assert len(list((tmp_path / "data" / "train").rglob("*.png"))) == 96
    (run,) = res["runs"]
    assert run["variant"] == "skip-cap=1" and run["seed"] == 3 and run["epochs_run"] == 2
    derived = json.loads((tmp_path / "skip-cap_1-s3" / "genotype.json").read_text())
    assert derived["derivation"] == {"skip_cap": 1}  # the variant's flag reached the search
    teacher = res["teacher"]["genotype"]
    for cell in ("normal", "reduce"):
        d, t = derived["genotype"][cell], teacher[cell]
        edges = sum(len({tuple(e) for e in d[j:j + 2]} & {tuple(e) for e in t[j:j + 2]}) for j in (0, 2, 4, 6))
        inputs = sum(len({e[1] for e in d[j:j + 2]} & {e[1] for e in t[j:j + 2]}) for j in (0, 2, 4, 6))
        assert run[f"{cell}_edges"] == edges and run[f"{cell}_inputs"] == inputs
        assert 0 <= edges <= inputs <= 8 and inputs >= 2  # node 0 reads both cell inputs, as the teacher's does
    assert run["normal_skips"] == sum(op == "skip_connect" for op, _ in derived["genotype"]["normal"]) <= 1
    assert 0 <= run["valid_acc"] <= 100
    log = (tmp_path / "skip-cap_1-s3" / "log.txt").read_text()  # the search's own last line agrees on undecided edges
    n, r = run["normal_undecided"], run["reduce_undecided"]
    assert (f"{n} of 8 normal edges and {r} of 8 reduction edges" in log) if n + r else ("are decided" in log)
    assert res["summary"]["skip-cap=1"]["normal_edges"] == [run["normal_edges"], 0.0]
    assert "| skip-cap=1 |" in capsys.readouterr().out


@pytest.mark.slow
def test_early_stop_skip_ends_a_search_driven_into_skips(tmp_path):
    """The planted task of search_quality.py, search seed 3, turns to skip connections at its first architecture
    epoch (benchmarks/RESULTS.md, "Search quality on a planted architecture": 4-6 skips from epoch 7 on, from 1 in
    the initial architecture). --early-stop skip:4 ends the search at that epoch, with that epoch's genotype."""
    import json

    import search_quality as sq

    out = tmp_path / "r.json"
    assert sq.main(["--variants", "early-stop=skip:4", "--seeds", "3", "--jobs", "1", "--work-dir", str(tmp_path),
                    "--json", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    folder = tmp_path / "early-stop_skip_4-s3"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    skips = [r["diagnostics"]["normal_skips"] for r in rows]
    assert run["epochs_run"] == len(rows) == 7 and skips[0] < 4 <= skips[-1]  # driven there by the search
    assert run["early_stop"]["rule"] == "skip:4" and run["early_stop"]["epochs_run"] == 7
    saved = json.loads((folder / "genotype.json").read_text())
    assert saved["genotype"] == rows[-1]["genotype"] and run["normal_skips"] == skips[-1]
    assert "early stop after epoch 7/30 (--early-stop skip:4)" in (folder / "log.txt").read_text()
