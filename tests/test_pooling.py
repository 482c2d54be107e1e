"""The Triton pooling kernels (hvd_pcdarts/experimental/pooling.py, BatchedOptions(pool="triton")) against
F.max_pool2d / F.avg_pool2d(count_include_pad=False): forward and input gradient for windows 2/3/5, strides 1/2,
ceil mode, odd maps, ties, NaN and all -inf windows, channel-slice views; bf16; and inside the batched search cell.

Without a GPU the kernels run in Triton's interpreter (subprocesses with TRITON_INTERPRET=1); on a GPU compiled,
plus a graphed search step."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import describe, launch, python_exe
from search_runs import cuda_search_steps, rel_diff
from triton_checks import CELLS, VECTOR_LOAD, assert_net_close, assert_no_spills, compile_sm90, interpreted, net_script

from hvd_pcdarts.experimental import batched_variants, depthwise, pooling
from hvd_pcdarts.models import BatchedOptions

pytestmark = pytest.mark.skipif(depthwise.triton is None, reason="triton is not installed")

# (channels, window, stride, padding, height, width, ceil mode)
SHAPES = [(12, 3, 1, 1, 9, 10, False), (32, 3, 2, 1, 8, 8, False), (40, 3, 2, 1, 7, 9, False),
          (8, 2, 2, 0, 9, 11, True), (70, 5, 1, 2, 6, 7, False), (12, 3, 2, 1, 5, 5, True)]

CHECK = r"""
import json, sys, torch, torch.nn.functional as F
from hvd_pcdarts.experimental import pooling
device, shapes, dtype = sys.argv[1], json.loads(sys.argv[2]), getattr(torch, sys.argv[3])
torch.manual_seed(0)
rel = lambda a, b: float((a.float() - b).abs().max() / b.abs().max())
def ref(kind, x, k, s, p, ceil):
    if kind == "max":
        return F.max_pool2d(x, k, s, p, ceil_mode=ceil)
    return F.avg_pool2d(x, k, s, p, ceil, count_include_pad=False)
def run(kind, x, k, s, p, ceil):
    x = x.to(dtype).requires_grad_()
    y = pooling.pool2d(x, kind, k, s, p, ceil)
    xr = x.detach().float().requires_grad_()  # the reference in float32 from the same (rounded) values
    yr = ref(kind, xr, k, s, p, ceil)
    g = torch.randn_like(yr).to(dtype)
    (dx,), (dxr,) = torch.autograd.grad(y, x, g), torch.autograd.grad(yr, xr, g.float())
    return y, yr, dx, dxr
out = []
for kind in ("max", "avg"):
    for C, k, s, p, H, W, ceil in shapes:
        # small integers for the max: ties everywhere (the first maximum of a window must win, as in torch)
        x = torch.randint(-3, 4, (2, C, H, W), device=device).float() if kind == "max" else \
            torch.randn(2, C, H, W, device=device)
        y, yr, dx, dxr = run(kind, x.contiguous(memory_format=torch.channels_last), k, s, p, ceil)
        out.append(dict(case=[kind, C, k, s, p, H, W, ceil], shape=list(y.shape) == list(yr.shape), y=rel(y, yr),
                        dx=rel(dx, dxr), cl=y.is_contiguous(memory_format=torch.channels_last), dtype=str(y.dtype)))
# a channel slice of a channels_last tensor (the reduction cells' bypassed channels): read in place
big = torch.randn(2, 16, 9, 9, device=device).contiguous(memory_format=torch.channels_last)
y, yr, dx, dxr = run("max", big[:, 4:], 2, 2, 0, True)
out.append(dict(case="slice", shape=list(y.shape) == list(yr.shape), y=rel(y, yr), dx=rel(dx, dxr), cl=True,
                dtype=str(y.dtype)))
# NaN wins its windows; a window of -inf only sends its gradient to the window's first input, as torch's does
x = torch.randn(1, 8, 6, 6, device=device)
x[0, 1, 2, 3] = float("nan")
x[0, 2, :3, :3] = float("-inf")
x = x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
y = pooling.pool2d(x, "max", 3, 1, 1)
xr = x.detach().float().requires_grad_()
yr = F.max_pool2d(xr, 3, 1, 1)
(dx,), (dxr,) = torch.autograd.grad(y, x, torch.ones_like(y)), torch.autograd.grad(yr, xr, torch.ones_like(yr))
special = dict(nan_same=bool(torch.equal(y.float().isnan(), yr.isnan())),
               finite_same=bool(torch.equal(y.float().nan_to_num(), yr.nan_to_num())),
               grad_same=bool(torch.equal(dx.float(), dxr)))
print(json.dumps(dict(rows=out, special=special)))
"""


def _check(out, dtype):
    tol = 1e-6 if dtype == "float32" else 1e-2  # bf16 outputs: rounded to 8 bits of mantissa
    for r in out["rows"]:
        assert r["shape"] and r["cl"] and r["dtype"] == f"torch.{dtype}", r
        assert r["y"] < tol and r["dx"] < tol, r
        if r["case"] != "slice" and r["case"][0] == "max":
            assert r["y"] == 0.0, r  # a maximum is exact
    assert out["special"] == dict(nan_same=True, finite_same=True, grad_same=True), out["special"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_pools_equal_torch_interpreted(dtype):
    _check(interpreted(CHECK, "cpu", json.dumps(SHAPES), dtype), dtype)


NET = net_script("pooling", "_Pool2d", r"""
out = {}
for dedup in (False, True):
    out[f"{dedup}"] = compare(dict(pool="triton", dedup=dedup))
# not twice differentiable: a second derivative through the kernels raises instead of dropping terms
xs = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
(gx,) = torch.autograd.grad(pooling.pool2d(xs, "avg").pow(2).sum(), xs, create_graph=True)
try:
    gx.pow(2).sum().backward()
    out["second"] = "no error"
except RuntimeError as e:
    out["second"] = str(e)
print(json.dumps(out))
""")


@pytest.mark.slow
def test_batched_cell_with_triton_pools_equals_reference_interpreted():
    """The batched channels_last search net with its pools through the kernels (also with dedup) against the
    per-edge reference: loss, gradients and BN statistics in training, eval outputs, bf16-autocast loss, to float32
    (bf16) rounding. (The Triton depthwise convs in such a net: test_depthwise.py.)"""
    out = interpreted(NET)
    second = out.pop("second")
    assert "once_differentiable" in second or "twice" in second, second
    # CELLS cells x 4 groups x 2 pools, + the 2 reduction cells' 2x2 pools of both inputs' bypassed channels
    assert out["False"]["calls"] == CELLS * 4 * 2 + 2 * 2
    assert out["True"]["calls"] == out["False"]["calls"]
    assert_net_close(out)


def test_pool2d_refuses_what_it_does_not_compute():
    x = torch.randn(1, 4, 5, 5)
    for kwargs, msg in ((dict(kind="min"), "kind 'min'"), (dict(kind="max", padding=2), "padding 2"),
                        (dict(kind="max", stride=(1, 2)), "both axes"), (dict(kind="avg", kernel_size=0), "need"),
                        (dict(kind="max", kernel_size=12, padding=0), "k <= 11")):  # winning tap: one int8
        with pytest.raises(ValueError, match=msg):
            pooling.pool2d(x, **kwargs)
    with pytest.raises(ValueError, match="float32/bf16/float16"):
        pooling.pool2d(x.double(), "max")
    with pytest.raises(ValueError, match="smaller than"):
        pooling.pool2d(torch.randn(1, 4, 1, 1), "max", 5, 1, 1)


def test_int32_guards_count_how_far_a_view_reaches():
    """A channel slice read in place spans its parent: the kernels' int32 guards use its extent, not numel()."""
    parent = torch.empty(2, 8, 3, 5).contiguous(memory_format=torch.channels_last)
    view = parent[:, 2:4]
    assert view.numel() == 60 and depthwise.extent(view) == parent.numel() - 8 + 4 == 236
    assert depthwise.extent(parent) == parent.numel() and depthwise.extent(parent[:0]) == 0


def test_pool_option_values_are_checked_and_fall_back(monkeypatch):
    mp = torch.nn.MaxPool2d(3, 1, 1)
    with pytest.raises(ValueError, match="torch or triton"):
        BatchedOptions(pool="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    # where the kernels cannot run (a CPU tensor without the interpreter), or for a pool they do not compute
    # (count_include_pad, dilation): torch's module, the same numbers
    assert torch.equal(batched_variants.pool(mp, x), mp(x))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    called = []
    monkeypatch.setattr(pooling, "pool2d", lambda *a: called.append(a))
    for mod in (torch.nn.AvgPool2d(3, 1, 1), torch.nn.MaxPool2d(3, 1, 1, dilation=2)):
        assert torch.equal(batched_variants.pool(mod, x), mod(x))
    assert called == []
    batched_variants.pool(torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False), x)
    batched_variants.pool(torch.nn.MaxPool2d(2, 2, ceil_mode=True), x)
    assert called == [(x, "avg", 3, 2, 1, False), (x, "max", 2, 2, 0, True)]
    batched_variants.pool(mp, x.contiguous())  # NCHW (channel stride 25): torch's
    assert len(called) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_pools_equal_torch_cuda(dtype):
    res = launch([python_exe(), "-c", CHECK, "cuda", json.dumps(SHAPES), dtype], timeout=300)
    assert res.returncode == 0, describe(res)
    _check(json.loads(res.stdout.strip().splitlines()[-1]), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("depthwise_mode", ["cudnn", "triton"])
def test_graphed_batched_step_with_triton_pools_equals_eager_reference_cuda(depthwise_mode, strict_fp32):
    """The kernels inside the captured search step (streams on): the eager per-edge step's numbers."""
    options = BatchedOptions(pool="triton", depthwise=depthwise_mode)
    (l0, p0, _), (l1, p1, _) = (cuda_search_steps(m, batched=m == "graph", channels_last=True, options=options)
                                for m in ("eager", "graph"))
    assert max(abs(a - b) for a, b in zip(l0, l1)) < 1e-3
    assert rel_diff(p0, p1) < 1e-3


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("is_max", [True, False])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_pool_kernels_compile_for_sm90_with_vector_loads_and_no_spills(kernel, is_max, dtype, tmp_path):
    fn, ptrs = {"fwd": (pooling._pool_fwd_kernel, "x y arg"), "bwd": (pooling._pool_bwd_kernel, "g arg dx")}[kernel]
    data = "*fp32" if dtype == "fp32" else "*bf16"
    pointers = {p: "*i8" if p == "arg" else data for p in ptrs.split()}
    bp, bc, warps = pooling.TILES[kernel]

    def ptx(vec, even, k):
        return compile_sm90(fn, pointers, depthwise._ARGS, dict(KH=k, KW=k, MAX=is_max, BP=bp, BC=bc, VEC=vec,
                                                                  EVEN_C=even), warps)

    aligned = ptx(4 if dtype == "fp32" else 8, True, 3)
    assert re.search(VECTOR_LOAD, aligned)
    ptx(1, False, 2)  # unaligned, ragged channels, the 2x2 window: compiles
    assert_no_spills(aligned, tmp_path)
