"""Depthwise convolution (groups == channels, one filter per channel) as Triton kernels for channels_last tensors:
forward, input gradient and weight gradient (BatchedOptions(depthwise="triton"), search_step.py +tdw).

Why: in the H100 profile of the batched search step (benchmarks/RESULTS.md) cuDNN ran the search cells'
depthwise convolutions far from the memory bandwidth they need: the dilated ones' forward in a direct kernel ~6x
slower per call than the undilated 5x5 (plus NHWC<->NCHW conversions around it), the weight gradients 3-4x above
their bytes' time. These kernels read each operand once per tile and take every tap from the tile's neighbourhood
(L1/L2), dilation and stride included at no cost; fp32 accumulation for any input dtype (bf16 under autocast).
The weight gradient is deterministic: per-tile partial sums, then one sum over the tiles (no atomics).

Runs wherever Triton runs: CUDA GPUs, and the CPU under TRITON_INTERPRET=1 (how the tests check it without a GPU).
Same function as F.conv2d(x, w, None, stride, padding, dilation, groups=C) (tests: forward and both gradients).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.autograd.function import once_differentiable

from ..models.batched_ops import wanted as _wanted

try:  # a dependency of torch's CUDA wheels; optional
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - no triton: the option is refused
    triton = None

# (pixels, channels, warps) per program of each kernel; HVD_PCDARTS_DW_TILES="P,C,W" (all three kernels) or
# "P,C,W;P,C,W;P,C,W" (forward; input gradient; weight gradient) overrides them, for tuning on a GPU. Fewer channels
# than the tile's: the channel block shrinks to the next power of two. 16 values per thread: ~80 registers, no
# spills (ptxas for sm_90, fp32 and bf16, 5x5)
TILES = {"fwd": (128, 32, 8), "dgrad": (128, 32, 8), "wgrad": (128, 32, 8)}


def parse_tiles(text: str) -> dict:
    """HVD_PCDARTS_DW_TILES's value -> TILES; ValueError with the reason when it is not one or three P,C,W tiles of
    powers of two."""
    try:
        tiles = [tuple(int(v) for v in t.split(",")) for t in text.split(";")]
    except ValueError:
        tiles = []
    if len(tiles) == 1:
        tiles *= 3
    if len(tiles) != 3 or any(len(t) != 3 or min(t) < 1 or any(v & (v - 1) for v in t) for t in tiles):
        raise ValueError(f"HVD_PCDARTS_DW_TILES={text!r}: one or three PIXELS,CHANNELS,WARPS tiles (';' between "
                         "them), each number a power of two")
    return dict(zip(TILES, tiles))


if os.environ.get("HVD_PCDARTS_DW_TILES"):
    TILES = parse_tiles(os.environ["HVD_PCDARTS_DW_TILES"])
MAX_ELEMENTS = 2**31 - 1  # int32 offsets in the kernels


DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # computed in float32: float64 is refused


def available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on x (CUDA, or the CPU under TRITON_INTERPRET=1; a dtype they compute
    exactly; int32-addressable with room for a same-size output)."""
    if triton is None or extent(x) > MAX_ELEMENTS // 2 or x.dtype not in DTYPES:
        return False
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def extent(x: torch.Tensor) -> int:
    """How many elements from its storage's start the kernels' offsets reach in x: more than numel() for a view
    (a channel slice read in place spans its whole parent)."""
    if x.numel() == 0:
        return 0
    return x.storage_offset() + sum((n - 1) * st for n, st in zip(x.shape, x.stride())) + 1


# Channel stride 1 (channels_last) is assumed, every other size and stride is a runtime argument (not specialized:
# one compiled kernel per kernel size, tile and dtype, whatever the map sizes, strides, paddings and dilations).
_ARGS = ["total", "C", "H", "W", "Ho", "Wo", "san", "sah", "saw", "sbn", "sbh", "sbw", "stride", "pad", "dil"]

if triton is not None:
    @triton.jit
    def _mask(rows, cm, EVEN_C: tl.constexpr):
        # the (pixels, channels) mask: rows only when the channel blocks tile C exactly (a mask constant along the
        # channels lets the compiler use vector loads)
        if EVEN_C:
            return rows[:, None]
        else:
            return rows[:, None] & cm[None, :]

    @triton.jit
    def _tile(total, C, Hs, Ws, BP: tl.constexpr, BC: tl.constexpr):
        # this program's BP pixels (flattened n, row, column of an Hs x Ws map) and BC channels, with their masks
        p = tl.program_id(0) * BP + tl.arange(0, BP)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        return c, p < total, c < C, p // (Ws * Hs), (p // Ws) % Hs, p % Ws

    @triton.jit
    def _ptrs(base, n, r, q, sn, sr, sq, c, VEC: tl.constexpr):
        # base[n, c, r, q] of a channels_last tensor with batch/row/column strides sn/sr/sq; VEC divides every
        # row offset (aligned vector loads along the channels)
        return base + tl.multiple_of(n * sn + r * sr + q * sq, VEC)[:, None] + c[None, :]

    @triton.jit(do_not_specialize=_ARGS)
    def _dwconv_fwd_kernel(x, w, y, total, C, H, W, Ho, Wo, san, sah, saw, sbn, sbh, sbw, stride, pad, dil,
                    KH: tl.constexpr, KW: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, VEC: tl.constexpr,
                    EVEN_C: tl.constexpr):
        # y[n, c, ho, wo] = sum over taps (i, j) of x[n, c, ho * stride - pad + i * dil, ...] * w[c, i, j]
        # (a = x's strides, b = y's)
        c, pm, cm, n, ho, wo = _tile(total, C, Ho, Wo, BP, BC)
        acc = tl.zeros((BP, BC), dtype=tl.float32)
        for i in range(KH):
            hi = ho * stride - pad + i * dil
            hm = pm & (hi >= 0) & (hi < H)
            for j in range(KW):
                wi = wo * stride - pad + j * dil
                m = hm & (wi >= 0) & (wi < W)
                xv = tl.load(_ptrs(x, n, hi, wi, san, sah, saw, c, VEC), mask=_mask(m, cm, EVEN_C), other=0.0)
                wv = tl.load(w + c * (KH * KW) + (i * KW + j), mask=cm, other=0.0).to(tl.float32)
                acc += xv.to(tl.float32) * wv[None, :]
        tl.store(_ptrs(y, n, ho, wo, sbn, sbh, sbw, c, VEC), acc.to(y.dtype.element_ty), mask=_mask(pm, cm, EVEN_C))

    @triton.jit(do_not_specialize=_ARGS)
    def _dwconv_dgrad_kernel(g, w, dx, total, C, H, W, Ho, Wo, san, sah, saw, sbn, sbh, sbw, stride, pad, dil,
                      KH: tl.constexpr, KW: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, VEC: tl.constexpr,
                      EVEN_C: tl.constexpr):
        # dx[n, c, hi, wi] = sum over taps (i, j) with hi = ho * stride - pad + i * dil (same for wi) of
        # g[n, c, ho, wo] * w[c, i, j]; a = g's strides, b = dx's
        c, pm, cm, n, hi, wi = _tile(total, C, H, W, BP, BC)
        acc = tl.zeros((BP, BC), dtype=tl.float32)
        for i in range(KH):
            th = hi + pad - i * dil
            ho = th // stride
            hm = pm & (th >= 0) & (th - ho * stride == 0) & (ho < Ho)
            for j in range(KW):
                tw = wi + pad - j * dil
                wo = tw // stride
                m = hm & (tw >= 0) & (tw - wo * stride == 0) & (wo < Wo)
                gv = tl.load(_ptrs(g, n, ho, wo, san, sah, saw, c, VEC), mask=_mask(m, cm, EVEN_C), other=0.0)
                wv = tl.load(w + c * (KH * KW) + (i * KW + j), mask=cm, other=0.0).to(tl.float32)
                acc += gv.to(tl.float32) * wv[None, :]
        tl.store(_ptrs(dx, n, hi, wi, sbn, sbh, sbw, c, VEC), acc.to(dx.dtype.element_ty),
                 mask=_mask(pm, cm, EVEN_C))

    @triton.jit(do_not_specialize=_ARGS)
    def _dwconv_wgrad_kernel(x, g, part, total, C, H, W, Ho, Wo, san, sah, saw, sbn, sbh, sbw, stride, pad, dil,
                      KH: tl.constexpr, KW: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, VEC: tl.constexpr,
                      EVEN_C: tl.constexpr):
        # part[program, c, tap] = sum over this program's output pixels of g * x at the tap's input pixel
        # (a = x's strides, b = g's); the weight gradient is the sum over the programs
        c, pm, cm, n, ho, wo = _tile(total, C, Ho, Wo, BP, BC)
        pid = tl.program_id(0)
        gv = tl.load(_ptrs(g, n, ho, wo, sbn, sbh, sbw, c, VEC), mask=_mask(pm, cm, EVEN_C), other=0.0)
        gv = gv.to(tl.float32)
        for i in range(KH):
            hi = ho * stride - pad + i * dil
            hm = pm & (hi >= 0) & (hi < H)
            for j in range(KW):
                wi = wo * stride - pad + j * dil
                m = hm & (wi >= 0) & (wi < W)
                xv = tl.load(_ptrs(x, n, hi, wi, san, sah, saw, c, VEC), mask=_mask(m, cm, EVEN_C), other=0.0)
                tl.store(part + (pid * C + c) * (KH * KW) + (i * KW + j), tl.sum(xv.to(tl.float32) * gv, axis=0),
                         mask=cm)


def _out_size(size, k, stride, padding, dilation):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def _sizes(t):  # batch, row and column strides (the channel stride is 1)
    return t.stride(0), t.stride(2), t.stride(3)


def _layout(c, bc, *tensors):
    """(VEC, EVEN_C): VEC elements (16 bytes) divide every row offset and the data pointers are 16-byte aligned
    (else 1); EVEN_C: the channel blocks tile C exactly."""
    vec = 16 // tensors[0].element_size()
    ok = c % vec == 0 and all(t.data_ptr() % 16 == 0 and all(v % vec == 0 for v in _sizes(t)) for t in tensors)
    return (vec if ok else 1), c % bc == 0


def _on(t):
    """Triton launches on the current CUDA device's current stream: make t's device current for the launch."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch(kernel, tile, a, w, out, total, c, h, wd, ho, wo, conf):
    """The forward or input-gradient kernel: reads a (x or the output gradient) and w, writes out."""
    bp, bc, warps = TILES[tile]
    bc = min(bc, triton.next_power_of_2(c))
    grid = (triton.cdiv(total, bp), triton.cdiv(c, bc))
    vec, even = _layout(c, bc, a, out)
    with _on(a):
        kernel[grid](a, w, out, total, c, h, wd, ho, wo, *_sizes(a), *_sizes(out), *conf, KH=w.shape[2],
                     KW=w.shape[3], BP=bp, BC=bc, VEC=vec, EVEN_C=even, num_warps=warps)


def _forward(x, w, stride, padding, dilation):
    n, c, h, wd = x.shape
    kh, kw = w.shape[2], w.shape[3]
    ho, wo = _out_size(h, kh, stride, padding, dilation), _out_size(wd, kw, stride, padding, dilation)
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    _launch(_dwconv_fwd_kernel, "fwd", x, w, y, n * ho * wo, c, h, wd, ho, wo, (stride, padding, dilation))
    return y


def _input_grad(g, w, shape, dtype, stride, padding, dilation):
    n, c, h, wd = shape
    dx = torch.empty(shape, dtype=dtype, device=g.device, memory_format=torch.channels_last)
    _launch(_dwconv_dgrad_kernel, "dgrad", g, w, dx, n * h * wd, c, h, wd, g.shape[2], g.shape[3],
            (stride, padding, dilation))
    return dx


def _weight_grad(x, g, wshape, dtype, stride, padding, dilation):
    n, c, h, wd = x.shape
    kh, kw = wshape[2], wshape[3]
    bp, bc, warps = TILES["wgrad"]
    bc = min(bc, triton.next_power_of_2(c))
    total = n * g.shape[2] * g.shape[3]
    grid = (triton.cdiv(total, bp), triton.cdiv(c, bc))
    part = torch.empty((grid[0], c, kh * kw), dtype=torch.float32, device=x.device)
    vec, even = _layout(c, bc, x, g)
    with _on(x):
        _dwconv_wgrad_kernel[grid](x, g, part, total, c, h, wd, g.shape[2], g.shape[3], *_sizes(x), *_sizes(g),
                            stride, padding, dilation, KH=kh, KW=kw, BP=bp, BC=bc, VEC=vec, EVEN_C=even,
                            num_warps=warps)
    return part.sum(0).view(wshape).to(dtype)


def _cudnn_input_grad(g, x, w, stride, padding, dilation):
    return torch.ops.aten.convolution_backward(g, x, w, None, [stride] * 2, [padding] * 2, [dilation] * 2, False,
                                               [0, 0], x.shape[1], [True, False, False])[0]


class _DepthwiseConv2d(torch.autograd.Function):
    """`fwd_dgrad`: whether the forward and the input gradient run as Triton kernels (else torch's: cuDNN on GPUs);
    the weight gradient always does. Not twice differentiable (the kernels' outputs carry no graph): a backward with
    create_graph=True raises instead of silently dropping second-order terms."""

    @staticmethod
    def forward(ctx, x, w, stride, padding, dilation, fwd_dgrad):
        ctx.save_for_backward(x, w)
        ctx.conf, ctx.fwd_dgrad = (stride, padding, dilation), fwd_dgrad
        if fwd_dgrad:
            return _forward(x, w, stride, padding, dilation)
        return torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = _nhwc(g)
        dx = dw = None
        if _wanted(ctx, 0):
            dx = _input_grad(g, w, x.shape, x.dtype, *ctx.conf) if ctx.fwd_dgrad else \
                _cudnn_input_grad(g, x, w, *ctx.conf)
        if _wanted(ctx, 1):
            dw = _weight_grad(x, g, w.shape, w.dtype, *ctx.conf)
        return dx, dw, None, None, None, None


def _one(v, name):
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if v[0] != v[1]:
        raise ValueError(f"depthwise_conv2d: {name} {v} must be the same along both axes")
    return int(v[0])


# "triton": forward and both gradients as Triton kernels; "hybrid": the dilated convolutions and every weight
# gradient (cuDNN's weakest in the H100 profile), cuDNN's undilated forward and input gradient (near the bytes'
# time already there)
MODES = ("triton", "hybrid")


def depthwise_conv2d(x, w, stride=1, padding=0, dilation=1, mode="triton"):
    """F.conv2d(x, w, None, stride, padding, dilation, groups=x.shape[1]) for w of shape (C, 1, kh, kw), computed
    by the Triton kernels (`mode`: see MODES) with a channels_last output; float32, bf16 or float16 (accumulated in
    float32). Under autocast both operands are cast to its dtype first, as autocast casts a convolution's."""
    if mode not in MODES:
        raise ValueError(f"depthwise_conv2d: mode {mode!r}: one of {', '.join(MODES)}")
    if w.dim() != 4 or w.shape[1] != 1 or w.shape[0] != x.shape[1]:
        raise ValueError(f"depthwise_conv2d: weight {tuple(w.shape)} is not depthwise for {x.shape[1]} channels")
    stride, padding, dilation = _one(stride, "stride"), _one(padding, "padding"), _one(dilation, "dilation")
    if x.dtype not in DTYPES or w.dtype not in DTYPES:
        raise ValueError(f"depthwise_conv2d: {x.dtype} / {w.dtype}: the kernels compute in float32 (use F.conv2d)")
    kh, kw = w.shape[2], w.shape[3]
    n, c, h, wd = x.shape
    ho, wo = _out_size(h, kh, stride, padding, dilation), _out_size(wd, kw, stride, padding, dilation)
    programs = triton.cdiv(n * ho * wo, min(t[0] for t in TILES.values())) if triton is not None else 0
    if max(extent(x), x.numel(), n * c * ho * wo, programs * c * kh * kw) > MAX_ELEMENTS:
        raise ValueError(f"depthwise_conv2d: {tuple(x.shape)} too large for the kernels' int32 offsets")
    conf = (stride, padding, dilation, mode == "triton" or dilation != 1)
    x, w = _nhwc(x), w.contiguous()
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, w = x.to(dt), w.to(dt)
        with torch.autocast(dev, enabled=False):
            return _DepthwiseConv2d.apply(x, w, *conf)
    if x.dtype != w.dtype:
        raise ValueError(f"depthwise_conv2d: input {x.dtype} and weight {w.dtype} differ")
    return _DepthwiseConv2d.apply(x, w, *conf)
