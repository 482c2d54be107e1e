"""The one-pass sums (hvd_pcdarts/experimental/sums.py, BatchedOptions(sums="triton")): add_all against a
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
from triton_checks import CELLS, VECTOR_LOAD, assert_no_spills, compile_sm90, interpreted, net_script

from hvd_pcdarts.experimental import batched_variants, depthwise, sums
from hvd_pcdarts.models import BatchedOptions, batched_ops

pytestmark = pytest.mark.skipif(depthwise.triton is None, reason="triton is not installed")

CHECK = r"""
import json, sys, torch
from hvd_pcdarts.experimental import sums
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


SCALED = r"""
import json, sys, torch
from hvd_pcdarts.experimental import sums
from hvd_pcdarts.models.batched_ops import WeightedSum
dtype = getattr(torch, sys.argv[1])
launches, dot_launches = [], []
launch, launch_dots = sums._launch_scaled, sums._launch_dots
sums._launch_scaled = lambda gs, w, idx: launches.append(len(gs)) or launch(gs, w, idx)
sums._launch_dots = lambda g, xs: dot_launches.append(len(xs)) or launch_dots(g, xs)
seen = []
K, cp = 4, 3

def views(s, nhwc):  # a state's bypassed channels as (K-1, cp) channel groups, as the cell reads them
    rest = s[:, cp:]
    return rest.permute(0, 2, 3, 1).unflatten(3, (K - 1, cp)) if nhwc else rest.unflatten(1, (K - 1, cp))

def node(m, r, nhwc):  # the cell's shuffle(cat(mixed, rest)): the rest's gradient comes back a strided view
    n, _, h, w = m.shape
    if nhwc:
        mm = m.permute(0, 2, 3, 1).unsqueeze(4)
        return torch.cat([mm, r.transpose(3, 4)], dim=4).reshape(n, h, w, cp * K).permute(0, 3, 1, 2)
    return torch.cat([m.unsqueeze(2), r.transpose(1, 2)], dim=2).reshape(n, cp * K, h, w)

def run(states, w, ms, us, nhwc, scaled, mixed_layouts=False, create_graph=False, wrt=None):
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    # three nodes read state 0 (betas w[1], w[3], w[4]), each also reads state 1 unscaled-path (w[0], w[2], w[5])
    x0, x1 = views(states[0], nhwc), views(states[1], nhwc)
    if x0.requires_grad:  # the gradient the fan-out returns: contiguous (N, H, W, K-1, cp) or (N, K-1, cp, H, W), so
        x0.register_hook(lambda gx: seen.append(bool(gx.is_contiguous())))  # the views' backward copies nothing
    idx0, idx1 = (1, 3, 4), (0, 2, 5)
    a0 = sums.scaled_fan_out(x0, w, idx0) if scaled else [x0] * 3
    loss = 0
    for i in range(3):
        # dots: the betas' gradients through sums.dots, as the cell asks with BatchedOptions(sums="triton")
        r = WeightedSum.apply(2, (scaled, False), sums.runs_on(a0[i]), w[idx0[i]], w[idx1[i]], a0[i], x1)
        if mixed_layouts and i == 1:  # this reader's gradient contiguous, the others' views of their nodes'
            loss = loss + (r.float() * views(us[i].contiguous(memory_format=fmt), nhwc).contiguous()).sum()
        loss = loss + (node(ms[i], r, nhwc).float() * us[i]).sum()
    return torch.autograd.grad(loss, wrt or [*states, w, *ms], create_graph=create_graph)

out = {}
for nhwc in (True, False):
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    g = torch.Generator().manual_seed(3)
    states = [torch.randn(2, cp * K, 5, 7, generator=g).to(dtype).contiguous(memory_format=fmt).requires_grad_()
              for _ in range(2)]
    w = torch.randn(6, generator=g).to(dtype).requires_grad_()
    ms = [torch.randn(2, cp, 5, 7, generator=g).to(dtype).contiguous(memory_format=fmt).requires_grad_()
          for _ in range(3)]
    us = [torch.randn(2, cp * K, 5, 7, generator=g) for _ in range(3)]
    refs = {}
    for case in ("scaled", "mixed"):
        ref = run([s.detach().double().requires_grad_() for s in states], w.detach().double().requires_grad_(),
                  [m.detach().double().requires_grad_() for m in ms], [u.double() for u in us], nhwc, False,
                  mixed_layouts=case == "mixed")
        before, dbefore, seen = len(launches), len(dot_launches), []
        got = run(states, w, ms, us, nhwc, True, mixed_layouts=case == "mixed")
        err = max(float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(got, ref))
        refs[case] = ref
        out[f"{case}-{nhwc}"] = dict(err=err, launched=len(launches) - before, layout=list(seen),
                                     dots=dot_launches[dbefore:], w_err=float((got[2].double() - ref[2]).abs().max()
                                                                              / ref[2].abs().max()))
    # the arch step: autograd.grad to the betas alone (the states lead to weights only): the betas' kernel runs,
    # the fan-out's (its input is not needed) computes nothing
    before, dbefore = len(launches), len(dot_launches)
    (gw,) = run(states, w, ms, us, nhwc, True, wrt=[w])
    out[f"arch-{nhwc}"] = dict(launched=len(launches) - before, dots=len(dot_launches) - dbefore,
                               err=float((gw.double() - refs["scaled"][2]).abs().max()
                                         / refs["scaled"][2].abs().max()))
    # create_graph: torch's multiplies and adds, and a second backward through them
    before, dbefore = len(launches), len(dot_launches)
    gs = run(states, w, ms, us, nhwc, True, create_graph=True)
    h = torch.autograd.grad(gs[0].float().square().sum(), w)[0]
    wd = w.detach().double().requires_grad_()
    gd = run([s.detach().double().requires_grad_() for s in states], wd,
             [m.detach().double().requires_grad_() for m in ms], [u.double() for u in us], nhwc, False,
             create_graph=True)
    hd = torch.autograd.grad(gd[0].square().sum(), wd)[0]
    out[f"second-{nhwc}"] = dict(err=float((h.double() - hd).abs().max() / hd.abs().max()),
                                 launched=len(launches) - before + len(dot_launches) - dbefore)
# dots alone: g and the xs with different strides (channel slices, NCHW, NHWC), 1-9 of them (9: torch's, per x)
g = torch.randn(2, 12, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last)[:, 3:]
xs = [torch.randn(2, 9, 5, 7).to(dtype) if i % 3 == 0 else
      torch.randn(2, 9, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last) if i % 3 == 1 else
      torch.randn(2, 11, 5, 7).to(dtype)[:, 2:] for i in range(9)]
for n in (1, 3, 8, 9):
    before = len(dot_launches)
    with torch.no_grad():  # (as in a backward without create_graph)
        d = sums.dots(g, xs[:n], torch.float32)
    ref = [float((g.double() * x.double()).sum()) for x in xs[:n]]
    scale = float(g.double().abs().sum())  # |sum| can cancel: relative to the sum of |g * x| ~ |g| sums
    out[f"dots-{n}"] = dict(err=max(abs(float(a) - b) / scale for a, b in zip(d, ref)),
                            launched=len(dot_launches) - before, dtype=str(d[0].dtype), n=len(d))
x = torch.randn(2, 3, requires_grad=True)
out["none"] = [sums.scaled_fan_out(x.detach(), w, (0, 1)) is None, sums.scaled_fan_out(x, w, ()) is None,
               len(sums.scaled_fan_out(x, w, (0,)))]
print(json.dumps(out))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scaled_fan_out_with_deferred_weighted_sums_interpreted(dtype):
    """Readers of sums.scaled_fan_out's aliases (batched_ops.WeightedSum with deferred inputs) hand back their
    gradients unscaled, as strided views of the nodes' gradients; one kernel per state computes sum_i beta_i * g_i,
    and one per node the betas' gradients (sums.dots). Against a float64 reference without deferral: every
    state's, beta's and mixed part's gradient (NHWC and NCHW), also where one reader's gradient has other strides
    (still one kernel: each view its own strides), and under create_graph (torch's ops, and a second backward
    through the betas); sums.dots alone for 1-9 terms of mixed strides."""
    out = interpreted(SCALED, dtype)
    tol = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    for nhwc in (True, False):
        r = out[f"scaled-{nhwc}"]
        assert r["err"] < tol and r["launched"] == 1 and r["layout"] == [True], r
        assert r["dots"] == [2, 2, 2] and r["w_err"] < tol, r  # each node's two betas: one kernel
        r = out[f"mixed-{nhwc}"]  # one reader's gradient with other strides (also read elsewhere): still one kernel
        assert r["err"] < tol and r["launched"] == 1, r
        r = out[f"arch-{nhwc}"]
        assert r["launched"] == 0 and r["dots"] == 3 and r["err"] < tol, r
        r = out[f"second-{nhwc}"]
        assert r["err"] < 5 * tol and r["launched"] == 0, r
    for n in (1, 3, 8, 9):
        r = out[f"dots-{n}"]
        assert r["err"] < tol / 10 and r["launched"] == (n <= 8) and r["n"] == n, r
        assert r["dtype"] == "torch.float32", r
    assert out["none"] == [True, True, 1]


def test_coalesced_views():
    """The kernel's index arithmetic: adjacent dims merged where every view's strides allow, at most 5 dims; each
    view keeps its own strides (a node's gradient can be a channel slice of the cell output's: a wider pixel step)."""
    assert sums._coalesced((2, 5, 7, 3, 3), [(420, 84, 12, 1, 4), (1680, 336, 48, 1, 4)]) == \
        ([1, 1, 70, 3, 3], [[0, 0, 12, 1, 4], [0, 0, 48, 1, 4]])
    assert sums._coalesced((2, 5, 7, 3, 3), [(420, 84, 12, 1, 4), (420, 7, 1, 35, 140)]) == \
        ([1, 2, 35, 3, 3], [[0, 420, 12, 1, 4], [0, 420, 1, 35, 140]])
    assert sums._coalesced((2, 3, 3, 5, 7), [(420, 35, 140, 7, 1)]) == ([1, 2, 3, 3, 35], [[0, 420, 35, 140, 1]])
    assert sums._coalesced((4, 1, 6), [(6, 6, 1)]) == ([1, 1, 1, 1, 24], [[0, 0, 0, 0, 1]])
    assert sums._coalesced((2,) * 6, [(64, 16, 32, 4, 8, 1)]) is None


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
    with pytest.raises(ValueError, match="torch or triton"):
        BatchedOptions(sums="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert torch.equal(batched_variants.add_all([x, 2 * x]), 3 * x)  # no interpreter, a CPU tensor: torch's add
    assert batched_variants.fan_out(x.requires_grad_(), ["relu", "skip"]) == {"relu": x, "skip": x}


def test_factorized_reduce_keeps_channels_last():
    """The stacked FactorizedReduce of a channels_last run comes out channels_last, as the per-edge op's does (it
    came out NCHW: its BN, the group's sum and their gradients in mixed layouts), with the same values."""
    torch.manual_seed(0)
    R = torch.randn(2, 12, 7, 7)
    w1, w2 = torch.randn(6, 4, 1, 1), torch.randn(6, 4, 1, 1)
    ref = batched_ops.factorized_reduce(R, w1, w2, 3)
    out = batched_ops.factorized_reduce(R.contiguous(memory_format=torch.channels_last), w1, w2, 3)
    assert ref.is_contiguous() and batched_ops.is_nhwc(out)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


NET = net_script("sums", "_Sum", r"""
fans = [0]
fan_apply = sums._FanOut.apply
def fan_counted(*a):
    fans[0] += 1
    return fan_apply(*a)
sums._FanOut.apply = fan_counted
scaled = [0, 0]  # scaled fan-outs (forward), their kernel's launches (backward)
scaled_apply, scaled_launch = sums._ScaledFanOut.apply, sums._launch_scaled
sums._ScaledFanOut.apply = lambda *a: scaled.__setitem__(0, scaled[0] + 1) or scaled_apply(*a)
sums._launch_scaled = lambda *a: scaled.__setitem__(1, scaled[1] + 1) or scaled_launch(*a)
dots = [0]  # launches of the betas' gradient kernel
dots_launch = sums._launch_dots
sums._launch_dots = lambda *a: dots.__setitem__(0, dots[0] + 1) or dots_launch(*a)
out = {}
for fuse, dedup in (("off", False), ("all", False), ("off", True)):
    before, sbefore, dbefore = fans[0], list(scaled), dots[0]
    r = compare(dict(sums="triton", fuse=fuse, dedup=dedup))
    r["dots"] = dots[0] - dbefore
    r["fans"] = fans[0] - before  # the training and the bf16 forward (eval needs no gradients: no aliases)
    r["scaled"] = [a - b for a, b in zip(scaled, sbefore)]
    r["case"] = f"{fuse}-{dedup}"
    out[r["case"]] = r
print(json.dumps(out))
""")


@pytest.mark.slow
def test_batched_cell_with_triton_sums_equals_reference_interpreted():
    """The batched channels_last search net with its sums through the kernel (also fused and deduplicated) against
    the per-edge reference: loss, gradients and BN statistics in training, eval outputs, bf16-autocast loss."""
    out = interpreted(NET)
    for r in out.values():
        assert r["loss"] < 1e-5 and r["grad"] < 1e-3 and r["stats"] < 1e-5 and r["eval"] < 1e-5, r
        assert r["bf16"] < 2e-2, r
        # one sum of a group's ops per group (CELLS cells x 4 groups; a node's parts are channel views: torch's adds)
        assert r["calls"] == CELLS * 4, r  # (counted over both nets' training forwards: the reference has none)
    # aliases per forward (training and bf16): per cell, each group's input and its ReLU (4 + 4); fused ("all"):
    # the ReLU's only reader is the fused chain, except in the reduction cells' first group (and the
    # FactorizedReduce)
    assert out["off-False"]["fans"] == out["off-True"]["fans"] == 2 * CELLS * (4 + 4)
    assert out["all-False"]["fans"] == 2 * (CELLS * 4 + 2)
    # and the bypassed channels of every state a node reads (the cell's inputs, nodes 0-2: 5 a cell), scaled: one
    # kernel each per backward (the training step's; the bf16 check runs none)
    for r in out.values():
        assert r["scaled"] == [2 * CELLS * 5, CELLS * 5], r
        assert r["dots"] == CELLS * 4, r  # and the betas' gradients: one kernel per node


def test_add_n_kernel_compiles_for_sm90_with_vector_loads_and_no_spills(tmp_path):
    for dtype in ("fp32", "bf16"):
        pointers = {p: f"*{dtype}" for p in ["out"] + [f"x{i}" for i in range(sums.MAX_TERMS)]}
        ptx = compile_sm90(sums._add_n_kernel, pointers, ["numel"], dict(N=7, BLOCK=sums.BLOCK), sums.WARPS,
                           aligned=sums.MAX_TERMS + 2)  # and numel a multiple of 16 (Triton specializes it)
        assert re.search(VECTOR_LOAD, ptx)
        assert_no_spills(ptx, tmp_path)


def test_add_scaled_kernel_compiles_for_sm90_with_vector_stores_and_no_spills(tmp_path):
    """The NHWC case of a C=16, K=4 cell (sizes 1, 1, pixels, 3, 4): the gathered loads are scalar, the contiguous
    output of the scaled sum stored in vectors; the betas' gradient kernel (dots) too."""
    for dtype in ("fp32", "bf16"):
        # (in the signature's order: out, w, numel, S1, S2, then per term g, i and its strides)
        names = ["out", "w", "numel", "S1", "S2"] + [a for n in range(sums.MAX_TERMS)
                                                     for a in (f"g{n}", f"i{n}", *(f"t{n}{d}" for d in range(5)))]
        sig = {a: f"*{dtype}" if a in ("out", "w") or a[0] == "g" else "i32" for a in names}
        ptx = compile_sm90(sums._add_scaled_kernel, sig, [], dict(N=4, S3=3, S4=4, BLOCK=sums.BLOCK), sums.WARPS,
                           aligned=3)  # out, w and numel (a multiple of 16: specialized)
        assert re.search(r"st\.global(\.\w+)*\.v[248]", ptx)
        assert_no_spills(ptx, tmp_path)
        # the betas' gradients: g and the xs gathered, one float32 partial sum each per program
        names = ["partials", "numel", "nprog", "S1", "S2", "g", *(f"u{d}" for d in range(5))] + \
            [a for n in range(sums.MAX_TERMS) for a in (f"x{n}", *(f"t{n}{d}" for d in range(5)))]
        sig = {a: "*fp32" if a == "partials" else f"*{dtype}" if a[0] in "gx" else "i32" for a in names}
        ptx = compile_sm90(sums._dots_kernel, sig, [], dict(N=5, S3=3, S4=4, BLOCK=sums.BLOCK), sums.WARPS,
                           aligned=1)
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
    options = BatchedOptions(sums="triton")
    launches, scaled, dots = [], [], []
    launch, launch_scaled, launch_dots = sums._launch, sums._launch_scaled, sums._launch_dots
    monkeypatch.setattr(sums, "_launch", lambda xs: launches.append(len(xs)) or launch(xs))
    monkeypatch.setattr(sums, "_launch_scaled", lambda gs, w, i: scaled.append(len(gs)) or launch_scaled(gs, w, i))
    monkeypatch.setattr(sums, "_launch_dots", lambda g, xs: dots.append(len(xs)) or launch_dots(g, xs))
    (l0, p0, _), (l1, p1, _) = (cuda_search_steps(m, batched=m == "graph", channels_last=True, options=options)
                                for m in ("eager", "graph"))
    # ran (a silent fallback to torch's ops would pass the comparison too)
    assert len(launches) > 100 and len(scaled) > 20 and len(dots) > 10, (len(launches), len(scaled), len(dots))
    assert max(abs(a - b) for a, b in zip(l0, l1)) < 1e-3
    assert rel_diff(p0, p1) < 1e-3
