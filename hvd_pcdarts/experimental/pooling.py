"""Max and average pooling (the search space's max_pool_3x3 / avg_pool_3x3) as Triton kernels for channels_last
tensors, forward and input gradient (BatchedOptions(pool="triton"), search_step.py +tpl).

Why: in the H100 profile of the batched search step (benchmarks/RESULTS.md) torch's NHWC pooling kernels took
13.9 ms of 152 ms at batch 256 for maps of a few MB: avg-pool backward 72 us a call, max-pool backward 54 us,
the forwards ~40 us, 10-15x their bytes' time. These kernels take a tile of pixels x channels and every tap from
its neighbourhood (L1/L2), like experimental/depthwise.py (whose tile helpers they share). The max pool keeps the
winning tap of each output as one int8 (torch keeps an int64 index: 8 bytes per output) and its backward gathers:
each input pixel sums the gradients of the outputs whose winning tap it was, so no atomics, deterministic.

Same function as F.max_pool2d(x, k, stride, padding) (the first maximum of a window wins, NaN wins) and
F.avg_pool2d(x, k, stride, padding, count_include_pad=False) (tests: forward and gradient, Triton's interpreter on
the CPU). Accumulates in float32 for float32, bf16 and float16 inputs.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import depthwise as dw
from .depthwise import available, triton  # noqa: F401  (available: re-exported for the callers)

KINDS = ("max", "avg")
TILES = {"fwd": (128, 32, 8), "bwd": (128, 32, 8)}  # (pixels, channels, warps) per program

if triton is not None:
    import triton.language as tl

    @triton.jit(do_not_specialize=dw._ARGS)
    def _pool_fwd_kernel(x, y, arg, total, C, H, W, Ho, Wo, san, sah, saw, sbn, sbh, sbw, stride, pad, dil,
                         KH: tl.constexpr, KW: tl.constexpr, MAX: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
                         VEC: tl.constexpr, EVEN_C: tl.constexpr):
        # y[n, c, ho, wo] = max / mean over the valid taps (i, j) of x[n, c, ho * stride - pad + i, ...]; for MAX,
        # arg (y's layout, int8) = i * KW + j of the first maximum (a NaN wins); a = x's strides, b = y's
        c, pm, cm, n, ho, wo = dw._tile(total, C, Ho, Wo, BP, BC)
        if MAX:  # all taps -inf: the first valid tap, as torch's index starts at the window's first input
            acc = tl.full((BP, BC), float("-inf"), dtype=tl.float32)
            first = tl.maximum(pad - ho * stride, 0) * KW + tl.maximum(pad - wo * stride, 0)
            best = tl.zeros((BP, BC), dtype=tl.int32) + first[:, None]
        else:
            acc = tl.zeros((BP, BC), dtype=tl.float32)
            cnt = tl.zeros((BP,), dtype=tl.float32)
        for i in range(KH):
            hi = ho * stride - pad + i
            hm = pm & (hi >= 0) & (hi < H)
            for j in range(KW):
                wi = wo * stride - pad + j
                m = hm & (wi >= 0) & (wi < W)
                ptr = dw._ptrs(x, n, hi, wi, san, sah, saw, c, VEC)
                if MAX:
                    xv = tl.load(ptr, mask=dw._mask(m, cm, EVEN_C), other=float("-inf")).to(tl.float32)
                    take = ((xv > acc) | (xv != xv)) & m[:, None]
                    acc = tl.where(take, xv, acc)
                    best = tl.where(take, i * KW + j, best)
                else:
                    acc += tl.load(ptr, mask=dw._mask(m, cm, EVEN_C), other=0.0).to(tl.float32)
                    cnt += m.to(tl.float32)
        out = dw._mask(pm, cm, EVEN_C)
        if MAX:
            tl.store(dw._ptrs(arg, n, ho, wo, sbn, sbh, sbw, c, VEC), best.to(tl.int8), mask=out)
        else:
            acc = acc / tl.maximum(cnt, 1.0)[:, None]
        tl.store(dw._ptrs(y, n, ho, wo, sbn, sbh, sbw, c, VEC), acc.to(y.dtype.element_ty), mask=out)

    @triton.jit(do_not_specialize=dw._ARGS)
    def _pool_bwd_kernel(g, arg, dx, total, C, H, W, Ho, Wo, san, sah, saw, sbn, sbh, sbw, stride, pad, dil,
                         KH: tl.constexpr, KW: tl.constexpr, MAX: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
                         VEC: tl.constexpr, EVEN_C: tl.constexpr):
        # dx[n, c, hi, wi] = sum over the outputs (ho, wo) whose tap (i, j) reads (hi, wi) of g[n, c, ho, wo] if
        # that tap was the output's maximum (MAX: arg), or / the output's count of valid taps (average);
        # a = g's and arg's strides, b = dx's
        c, pm, cm, n, hi, wi = dw._tile(total, C, H, W, BP, BC)
        acc = tl.zeros((BP, BC), dtype=tl.float32)
        for i in range(KH):
            th = hi + pad - i
            ho = th // stride
            hm = pm & (th >= 0) & (th - ho * stride == 0) & (ho < Ho)
            rows = tl.minimum(ho * stride - pad + KH, H) - tl.maximum(ho * stride - pad, 0)  # the window's
            for j in range(KW):
                tw = wi + pad - j
                wo = tw // stride
                m = hm & (tw >= 0) & (tw - wo * stride == 0) & (wo < Wo)
                mm = dw._mask(m, cm, EVEN_C)
                gv = tl.load(dw._ptrs(g, n, ho, wo, san, sah, saw, c, VEC), mask=mm, other=0.0).to(tl.float32)
                if MAX:
                    a = tl.load(dw._ptrs(arg, n, ho, wo, san, sah, saw, c, VEC), mask=mm, other=-1)
                    acc += tl.where((a.to(tl.int32) == i * KW + j) & m[:, None], gv, 0.0)
                else:
                    cols = tl.minimum(wo * stride - pad + KW, W) - tl.maximum(wo * stride - pad, 0)
                    acc += gv / tl.maximum(rows * cols, 1).to(tl.float32)[:, None]
        tl.store(dw._ptrs(dx, n, hi, wi, sbn, sbh, sbw, c, VEC), acc.to(dx.dtype.element_ty),
                 mask=dw._mask(pm, cm, EVEN_C))


def _launch(kernel, tile, a, b, out, total, c, h, wd, ho, wo, stride, pad, k, is_max):
    """One program per tile of `total` pixels x c channels; a, b: the inputs (x or the gradient; the max's tap
    index for both kernels when is_max, in a's layout), out: the output (its own strides)."""
    bp, bc, warps = TILES[tile]
    bc = min(bc, triton.next_power_of_2(c))
    grid = (triton.cdiv(total, bp), triton.cdiv(c, bc))
    vec, even = dw._layout(c, bc, a, out)
    with dw._on(a):
        kernel[grid](a, b, out, total, c, h, wd, ho, wo, *dw._sizes(a), *dw._sizes(out), stride, pad, 1, KH=k,
                     KW=k, MAX=is_max, BP=bp, BC=bc, VEC=vec, EVEN_C=even, num_warps=warps)


def _out_size(size, k, stride, pad, ceil_mode):
    """torch's pooling output size (ceil mode: a last window that starts inside the map or its left padding)."""
    if not ceil_mode:
        return (size + 2 * pad - k) // stride + 1
    out = -(-(size + 2 * pad - k) // stride) + 1
    return out - 1 if (out - 1) * stride >= size + pad else out


def _forward(x, kind, k, stride, pad, ceil_mode):
    """-> (y, the max's int8 winning taps or None) of the kernels, y channels_last."""
    n, c, h, wd = x.shape
    ho, wo = _out_size(h, k, stride, pad, ceil_mode), _out_size(wd, k, stride, pad, ceil_mode)
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    is_max = kind == "max"
    arg = torch.empty_like(y, dtype=torch.int8) if is_max else y  # (y: an unused pointer for the average)
    # the forward kernel's second pointer is the output y, its third the tap index
    _launch(_pool_fwd_kernel, "fwd", x, y, arg, n * ho * wo, c, h, wd, ho, wo, stride, pad, k, is_max)
    return y, (arg if is_max else None)


def _input_grad(g, arg, shape, dtype, k, stride, pad):
    """The input gradient from the output gradient g (and the max's winning taps `arg`, None for the average)."""
    g = dw._nhwc(g)
    if arg is None:
        arg = g
    elif g.stride() != arg.stride():  # the kernel reads both with g's strides (size-1 dimensions may differ)
        g = torch.empty_like(arg, dtype=g.dtype).copy_(g)
    n, c, h, wd = shape
    dx = torch.empty(shape, dtype=dtype, device=g.device, memory_format=torch.channels_last)
    _launch(_pool_bwd_kernel, "bwd", g, arg, dx, n * h * wd, c, h, wd, g.shape[2], g.shape[3], stride, pad, k,
            arg is not g)
    return dx


class _Pool2d(torch.autograd.Function):
    """Not twice differentiable (the kernels' outputs carry no graph): create_graph=True raises."""

    @staticmethod
    def forward(ctx, x, kind, k, stride, pad, ceil_mode):
        y, arg = _forward(x, kind, k, stride, pad, ceil_mode)
        if arg is not None:
            ctx.save_for_backward(arg)
        ctx.conf = (x.shape, x.dtype, k, stride, pad)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        arg = ctx.saved_tensors[0] if ctx.saved_tensors else None
        return _input_grad(g, arg, *ctx.conf), None, None, None, None, None


def pool2d(x: torch.Tensor, kind: str, kernel_size: int = 3, stride: int = 1, padding: int = 1,
           ceil_mode: bool = False) -> torch.Tensor:
    """F.max_pool2d(x, k, stride, padding, ceil_mode=ceil_mode) (kind "max") or F.avg_pool2d(x, k, stride, padding,
    ceil_mode, count_include_pad=False) (kind "avg") of a float32/bf16/float16 tensor, computed by the Triton
    kernels with a channels_last output. Square windows, padding at most half the window (as torch requires).
    Any tensor whose channel stride is 1 is read in place (channels_last, or a channel slice of one)."""
    if kind not in KINDS:
        raise ValueError(f"pool2d: kind {kind!r}: one of {', '.join(KINDS)}")
    k, stride, padding = dw._one(kernel_size, "kernel_size"), dw._one(stride, "stride"), dw._one(padding, "padding")
    if k < 1 or k * k > 128 or stride < 1 or not 0 <= padding <= k // 2:  # the winning tap (< k * k): one int8
        raise ValueError(f"pool2d: kernel_size {k}, stride {stride}, padding {padding}: need 1 <= k <= 11, "
                         "stride >= 1 and padding <= k // 2")
    if x.dim() != 4 or x.dtype not in dw.DTYPES:
        raise ValueError(f"pool2d: a 4-d float32/bf16/float16 tensor, not {x.dim()}-d {x.dtype}")
    n, c, h, wd = x.shape
    if min(h, wd) + 2 * padding < k:
        raise ValueError(f"pool2d: a {h}x{wd} map is smaller than the {k}x{k} window")
    if max(x.numel(), dw.extent(x)) > dw.MAX_ELEMENTS:
        raise ValueError(f"pool2d: {tuple(x.shape)} too large for the kernels' int32 offsets")
    return _Pool2d.apply(x if x.stride(1) == 1 else dw._nhwc(x), kind, k, stride, padding, bool(ceil_mode))
