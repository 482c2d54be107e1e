"""The Triton depthwise convolution (hvd_pcdarts/experimental/depthwise.py, BatchedOptions(depthwise="triton"))
against F.conv2d: forward, input gradient and weight gradient, for kernel sizes 3/5/9, strides 1/2, dilations 1/2,
odd maps, channel counts that are not a power of two; bf16; and inside the batched search cell.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1 on CPU tensors, set before triton is
imported: hence the subprocesses). On a GPU the same checks run compiled, plus a graphed search step."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import describe, launch, python_exe
from search_runs import cuda_search_steps, rel_diff
from triton_checks import CELLS, VECTOR_LOAD, assert_net_close, assert_no_spills, compile_sm90, interpreted, net_script

from hvd_pcdarts.experimental import depthwise
from hvd_pcdarts.models import BatchedOptions

pytestmark = pytest.mark.skipif(depthwise.triton is None, reason="triton is not installed")

# (channels, kernel, stride, dilation, height, width)
SHAPES = [(12, 3, 1, 1, 9, 10), (32, 5, 2, 1, 8, 8), (40, 3, 1, 2, 7, 8), (8, 5, 2, 2, 10, 11), (16, 9, 1, 1, 6, 6),
          (70, 3, 2, 2, 9, 9)]

CHECK = r"""
import json, sys, torch, torch.nn.functional as F
from hvd_pcdarts.experimental import depthwise
device, shapes, dtype, mode = sys.argv[1], json.loads(sys.argv[2]), getattr(torch, sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
out = []
for C, k, s, d, H, W in shapes:
    pad = d * (k - 1) // 2
    x = torch.randn(2, C, H, W, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, k, k, device=device).to(dtype)
    x.requires_grad_(), w.requires_grad_()
    y = depthwise.depthwise_conv2d(x, w, s, pad, d, mode)
    # the reference in float32 from the same (rounded) values
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = F.conv2d(xr, wr, None, s, pad, d, C)
    g = torch.randn_like(yr)
    dx, dw = torch.autograd.grad(y, [x, w], g.to(dtype))
    dxr, dwr = torch.autograd.grad(yr, [xr, wr], g.to(dtype).float())
    rel = lambda a, b: float((a.float() - b).abs().max() / b.abs().max())
    out.append(dict(shape=[C, k, s, d, H, W], y=rel(y, yr), dx=rel(dx, dxr), dw=rel(dw, dwr),
                    cl=y.is_contiguous(memory_format=torch.channels_last), dtype=str(y.dtype)))
print(json.dumps(out))
"""


def _check_rows(rows, dtype):
    tol = 1e-5 if dtype == "float32" else 2e-2  # bf16 outputs: rounded to 8 bits of mantissa
    for r in rows:
        assert r["cl"] and r["dtype"] == f"torch.{dtype}", r
        assert r["y"] < tol and r["dx"] < tol and r["dw"] < 10 * tol, r


@pytest.mark.parametrize("dtype,mode", [("float32", "triton"), ("bfloat16", "triton"), ("float32", "hybrid")])
def test_triton_depthwise_equals_conv2d_interpreted(dtype, mode):
    _check_rows(interpreted(CHECK, "cpu", json.dumps(SHAPES), dtype, mode), dtype)


NET = net_script("depthwise", "_DepthwiseConv2d", r"""
out = {}
for mode, fuse, dedup in (("triton", "off", False), ("triton", "5x5", True), ("hybrid", "all", False)):
    out[f"{mode}-{fuse}-{dedup}"] = compare(dict(depthwise=mode, fuse=fuse, dedup=dedup))
print(json.dumps(out))
""")


@pytest.mark.slow
def test_batched_cell_with_triton_depthwise_equals_reference_interpreted():
    """The batched channels_last search net with its depthwise convs through the kernels (alone, with the fused
    chain, whose second depthwise conv is one, with dedup; hybrid) against the per-edge reference: loss, gradients
    and BN statistics in training, eval outputs, bf16-autocast loss, to float32 (bf16) rounding."""
    out = interpreted(NET)
    # CELLS cells x 4 groups x 6 depthwise convs: every one went through the kernels' Function; fused: the separable
    # convs' second one a group (5x5: and dil_conv_5x5's, outside the fused chain)
    assert out["triton-off-False"]["calls"] == CELLS * 4 * 6
    assert out["triton-5x5-True"]["calls"] == CELLS * 4 * 2 and out["hybrid-all-False"]["calls"] == CELLS * 4
    assert_net_close(out)


SKIP = r"""
import json, torch
from hvd_pcdarts.experimental import depthwise as dw
n = {"w": 0, "x": 0}
ow, ox = dw._weight_grad, dw._input_grad
dw._weight_grad = lambda *a: (n.__setitem__("w", n["w"] + 1), ow(*a))[1]
dw._input_grad = lambda *a: (n.__setitem__("x", n["x"] + 1), ox(*a))[1]
a = torch.randn(8, requires_grad=True)
x0 = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
wp = torch.randn(8, 1, 3, 3, requires_grad=True)
y = lambda: dw.depthwise_conv2d(x0 * a[None, :, None, None], wp * 1.0, 1, 1).sum()
out = []
torch.autograd.grad(y(), [a])
out.append(dict(n))
torch.autograd.grad(y(), [wp])
out.append(dict(n))
y().backward()
out.append(dict(n))
print(json.dumps(out))
"""


def test_backward_computes_only_the_gradients_the_engine_uses_interpreted():
    """The architecture step's autograd.grad(loss, alphas/betas) reaches the depthwise convs' inputs but not their
    weights: no weight-gradient kernel then (torch's convolutions skip it too); .backward() computes both."""
    arch, weights, both = interpreted(SKIP)
    assert arch == {"w": 0, "x": 1}
    assert weights == {"w": 1, "x": 1}
    assert both == {"w": 2, "x": 2}


def test_depthwise_refuses_what_it_does_not_compute(monkeypatch):
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match="not depthwise"):
        depthwise.depthwise_conv2d(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="both axes"):
        depthwise.depthwise_conv2d(x, w, stride=(1, 2))
    with pytest.raises(ValueError, match="compute in float32"):  # float64 would silently lose precision
        depthwise.depthwise_conv2d(x.double(), w.double())
    with pytest.raises(ValueError, match="differ"):
        depthwise.depthwise_conv2d(x, w.half())
    with pytest.raises(ValueError, match="mode 'cudnn'"):  # for dilated convs too (they always use the kernels)
        depthwise.depthwise_conv2d(x, w, 1, 2, 2, mode="cudnn")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not depthwise.available(x)  # a CPU tensor without the interpreter: the batched op uses F.conv2d
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert depthwise.available(x) and not depthwise.available(x.double())  # float64: F.conv2d, exact


def test_second_derivatives_through_the_kernels_raise():
    """The kernels' gradients carry no graph: differentiating them again must fail loudly, not drop terms."""
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    y = depthwise.depthwise_conv2d(x, torch.randn(4, 1, 3, 3), 1, 1, 1, mode="hybrid")  # CPU: torch's kernels
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.pow(2).sum().backward()


def test_tiles_setting_is_checked():
    assert depthwise.parse_tiles("64,32,4") == {k: (64, 32, 4) for k in ("fwd", "dgrad", "wgrad")}
    assert depthwise.parse_tiles("64,32,4;128,32,8;256,16,8")["wgrad"] == (256, 16, 8)
    for bad in ("64,32", "64,30,4", "64,32,4;64,32,4", "a,b,c"):
        with pytest.raises(ValueError, match="HVD_PCDARTS_DW_TILES"):
            depthwise.parse_tiles(bad)


def test_depthwise_option_values_are_checked():
    with pytest.raises(ValueError, match="cudnn, triton or hybrid"):
        BatchedOptions(depthwise="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["triton", "hybrid"])
def test_triton_depthwise_equals_conv2d_cuda(dtype, mode, strict_fp32):
    res = launch([python_exe(), "-c", CHECK, "cuda", json.dumps(SHAPES), dtype, mode], timeout=300)
    assert res.returncode == 0, describe(res)
    _check_rows(json.loads(res.stdout.strip().splitlines()[-1]), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("mode,fuse", [("triton", "off"), ("triton", "5x5"), ("hybrid", "off")])
def test_graphed_batched_step_with_triton_depthwise_equals_eager_reference_cuda(mode, fuse, strict_fp32):
    """The kernels inside the captured search step (streams on): the eager per-edge step's numbers."""
    options = BatchedOptions(depthwise=mode, fuse=fuse)
    (l0, p0, _), (l1, p1, _) = (cuda_search_steps(m, batched=m == "graph", channels_last=True, options=options)
                                for m in ("eager", "graph"))
    # other kernels, other rounding (the cuDNN ones of test_batched's graphed-step test agree to 1e-4)
    assert max(abs(a - b) for a, b in zip(l0, l1)) < 1e-3
    assert rel_diff(p0, p1) < 1e-3


def _compile_sm90(kernel, dtype, k, vec, even, tile):
    """The kernel compiled for an H100 (sm_90) without a GPU: Triton's compiler and the ptxas it ships."""
    fn, ptrs = {"fwd": (depthwise._dwconv_fwd_kernel, "x w y"), "dgrad": (depthwise._dwconv_dgrad_kernel, "g w dx"),
                "wgrad": (depthwise._dwconv_wgrad_kernel, "x g part")}[kernel]
    pointers = {p: "*fp32" if dtype == "fp32" or p == "part" else "*bf16" for p in ptrs.split()}
    const = dict(KH=k, KW=k, BP=tile[0], BC=tile[1], VEC=vec, EVEN_C=even)
    return compile_sm90(fn, pointers, depthwise._ARGS, const, tile[2])


@pytest.mark.parametrize("kernel", ["fwd", "dgrad", "wgrad"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_sm90_with_vector_loads_and_no_spills(kernel, dtype, tmp_path):
    """What the interpreter cannot show: the kernels compile for the GPU the issue names, the aligned channel
    blocks load 16 bytes at a time, and the default tile spills no registers (the first version, with every tap
    unrolled, spilled ~7 KB per thread at 5x5: ptxas -v)."""
    vec = 4 if dtype == "fp32" else 8
    ptx = _compile_sm90(kernel, dtype, 5, vec, True, depthwise.TILES[kernel])
    assert re.search(VECTOR_LOAD, ptx)  # vectorized loads along the channels
    _compile_sm90(kernel, dtype, 3, 1, False, depthwise.TILES[kernel])  # unaligned, ragged channels: compiles
    assert_no_spills(ptx, tmp_path)
