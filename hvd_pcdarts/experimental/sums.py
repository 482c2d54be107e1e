"""Sums of several same-shape tensors in one pass, as a Triton kernel (BatchedOptions(sums="triton"),
search_step.py +tsm): each input read once, the output written once, accumulated in float32.

Why: the batched search cell sums a group's seven primitive outputs with a chain of adds (6 adds read 2 and write 1
tensor each: 18 tensor passes where one kernel needs 8), and autograd sums the gradients of a tensor read by several
ops the same way (a group's input: its ReLU, both pools and the skip; the ReLU'd input: every convolution op; a
state's bypassed channels: every node after it). Counted on the CPU (B=64 bf16, benchmarks/RESULTS.md), a step's
adds moved 3.2 GiB of its 16.3 GiB; with these sums it moves 15.0 GiB.

- add_all(xs): xs[0] + xs[1] + ... in one kernel (its backward hands each input the output gradient, as add's does).
- fan_out(x, readers): one alias of x per reader (a dict); their gradients are summed in one kernel, not by the
  engine's pairwise accumulation.
- scaled_fan_out(x, w, idx): one alias of x per reader for readers that take w[idx[i]] * x (a node's bypassed
  channels, each weighted by its edge's beta: batched_ops.WeightedSum with `deferred`). The readers hand back their
  output gradient g_i unscaled (a view of the node's gradient, no multiply) and one kernel computes
  sum_i w[idx[i]] * g_i: each g_i read once, x's gradient written once (before: a multiply per reader, writing g_i *
  beta_i, and a sum reading them all back).
Both fall back to torch's adds (the same numbers as without them, bit for bit) where the kernel does not run: no
Triton, a CPU tensor without TRITON_INTERPRET=1, tensors of different dtypes or strides, a layout that is not dense,
inside torch.compile (inductor fuses the adds itself), or a backward that builds a graph (create_graph=True).
"""

from __future__ import annotations

import torch

from ..models.batched_ops import add_chain as _pairwise
from ..models.batched_ops import wanted as _wanted
from . import depthwise as dw
from .depthwise import triton

MAX_TERMS = 8  # inputs per launch; more are summed in chunks (the running sum is the next chunk's first input)
BLOCK, WARPS = 2048, 8  # elements and warps per program: 8 (fp32) or 16 (bf16) elements a thread, vector loads

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _add_n_kernel(out, x0, x1, x2, x3, x4, x5, x6, x7, numel, N: tl.constexpr, BLOCK: tl.constexpr):
        # out[i] = x0[i] + ... + x{N-1}[i] over the flat storage of same-layout dense tensors, in float32
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        acc = tl.load(x0 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 1:
            acc += tl.load(x1 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 2:
            acc += tl.load(x2 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 3:
            acc += tl.load(x3 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 4:
            acc += tl.load(x4 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 5:
            acc += tl.load(x5 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 6:
            acc += tl.load(x6 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 7:
            acc += tl.load(x7 + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out + offs, acc.to(out.dtype.element_ty), mask=m)

    # The two strided kernels below: every view's strides are runtime arguments and not specialized (one compile
    # per term count and innermost sizes, whatever the strides; the gathered loads do not vectorize anyway), the
    # two innermost sizes compile-time (small: K-1 and C/K, or C/K and H*W; division by a constant is cheap), the
    # outer two runtime (Triton specializes a size of 1: NHWC runs merge batch and pixels into one dim)
    _STRIDES = [f"t{n}{d}" for n in range(MAX_TERMS) for d in range(5)]
    _BETAS = [f"i{n}" for n in range(MAX_TERMS)]  # the betas' positions: not specialized either

    @triton.jit
    def _index(offs, S1, S2, S3: tl.constexpr, S4: tl.constexpr):
        # offs over a contiguous (*, S1, S2, S3, S4) index space -> its five coordinates
        c4 = offs % S4
        r = offs // S4
        c3 = r % S3
        r = r // S3
        c2 = r % S2
        r = r // S2
        return r // S1, r % S1, c2, c3, c4

    @triton.jit
    def _scaled_term(acc, g, w, i, c0, c1, c2, c3, c4, t0, t1, t2, t3, t4, m):
        src = c0 * t0 + c1 * t1 + c2 * t2 + c3 * t3 + c4 * t4
        return acc + tl.load(g + src, mask=m, other=0.0).to(tl.float32) * tl.load(w + i).to(tl.float32)

    @triton.jit(do_not_specialize=_STRIDES + _BETAS)
    def _add_scaled_kernel(out, w, numel, S1, S2,
                           g0, i0, t00, t01, t02, t03, t04, g1, i1, t10, t11, t12, t13, t14,
                           g2, i2, t20, t21, t22, t23, t24, g3, i3, t30, t31, t32, t33, t34,
                           g4, i4, t40, t41, t42, t43, t44, g5, i5, t50, t51, t52, t53, t54,
                           g6, i6, t60, t61, t62, t63, t64, g7, i7, t70, t71, t72, t73, t74,
                           N: tl.constexpr, S3: tl.constexpr, S4: tl.constexpr, BLOCK: tl.constexpr):
        # out (contiguous, sizes (numel / (S1 S2 S3 S4), S1, S2, S3, S4)) = sum_n w[i_n] * g_n, each g_n a view
        # with its own strides (t_n0, ..., t_n4), in float32
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        c0, c1, c2, c3, c4 = _index(offs, S1, S2, S3, S4)
        acc = _scaled_term(tl.zeros([BLOCK], dtype=tl.float32), g0, w, i0, c0, c1, c2, c3, c4,
                           t00, t01, t02, t03, t04, m)
        if N > 1:
            acc = _scaled_term(acc, g1, w, i1, c0, c1, c2, c3, c4, t10, t11, t12, t13, t14, m)
        if N > 2:
            acc = _scaled_term(acc, g2, w, i2, c0, c1, c2, c3, c4, t20, t21, t22, t23, t24, m)
        if N > 3:
            acc = _scaled_term(acc, g3, w, i3, c0, c1, c2, c3, c4, t30, t31, t32, t33, t34, m)
        if N > 4:
            acc = _scaled_term(acc, g4, w, i4, c0, c1, c2, c3, c4, t40, t41, t42, t43, t44, m)
        if N > 5:
            acc = _scaled_term(acc, g5, w, i5, c0, c1, c2, c3, c4, t50, t51, t52, t53, t54, m)
        if N > 6:
            acc = _scaled_term(acc, g6, w, i6, c0, c1, c2, c3, c4, t60, t61, t62, t63, t64, m)
        if N > 7:
            acc = _scaled_term(acc, g7, w, i7, c0, c1, c2, c3, c4, t70, t71, t72, t73, t74, m)
        tl.store(out + offs, acc.to(out.dtype.element_ty), mask=m)

    @triton.jit
    def _dot_term(partials, j, nprog, gv, x, c0, c1, c2, c3, c4, t0, t1, t2, t3, t4, m):
        src = c0 * t0 + c1 * t1 + c2 * t2 + c3 * t3 + c4 * t4
        xv = tl.load(x + src, mask=m, other=0.0).to(tl.float32)
        tl.store(partials + j * nprog + tl.program_id(0), tl.sum(gv * xv, axis=0))

    @triton.jit(do_not_specialize=_STRIDES + [f"u{d}" for d in range(5)] + ["nprog"])
    def _dots_kernel(partials, numel, nprog, S1, S2, g, u0, u1, u2, u3, u4,
                     x0, t00, t01, t02, t03, t04, x1, t10, t11, t12, t13, t14,
                     x2, t20, t21, t22, t23, t24, x3, t30, t31, t32, t33, t34,
                     x4, t40, t41, t42, t43, t44, x5, t50, t51, t52, t53, t54,
                     x6, t60, t61, t62, t63, t64, x7, t70, t71, t72, t73, t74,
                     N: tl.constexpr, S3: tl.constexpr, S4: tl.constexpr, BLOCK: tl.constexpr):
        # partials[n, program] = this program's part of sum(g * x_n) over the index space (numel / (S1 S2 S3 S4),
        # S1, S2, S3, S4), g with strides (u0, ..., u4), x_n with (t_n0, ..., t_n4); in float32, g read once
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        c0, c1, c2, c3, c4 = _index(offs, S1, S2, S3, S4)
        gv = tl.load(g + c0 * u0 + c1 * u1 + c2 * u2 + c3 * u3 + c4 * u4, mask=m, other=0.0).to(tl.float32)
        _dot_term(partials, 0, nprog, gv, x0, c0, c1, c2, c3, c4, t00, t01, t02, t03, t04, m)
        if N > 1:
            _dot_term(partials, 1, nprog, gv, x1, c0, c1, c2, c3, c4, t10, t11, t12, t13, t14, m)
        if N > 2:
            _dot_term(partials, 2, nprog, gv, x2, c0, c1, c2, c3, c4, t20, t21, t22, t23, t24, m)
        if N > 3:
            _dot_term(partials, 3, nprog, gv, x3, c0, c1, c2, c3, c4, t30, t31, t32, t33, t34, m)
        if N > 4:
            _dot_term(partials, 4, nprog, gv, x4, c0, c1, c2, c3, c4, t40, t41, t42, t43, t44, m)
        if N > 5:
            _dot_term(partials, 5, nprog, gv, x5, c0, c1, c2, c3, c4, t50, t51, t52, t53, t54, m)
        if N > 6:
            _dot_term(partials, 6, nprog, gv, x6, c0, c1, c2, c3, c4, t60, t61, t62, t63, t64, m)
        if N > 7:
            _dot_term(partials, 7, nprog, gv, x7, c0, c1, c2, c3, c4, t70, t71, t72, t73, t74, m)


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def runs_on(x: torch.Tensor) -> bool:
    """Whether the kernel runs where x is: a plain tensor of a dtype it sums, where the Triton kernels run
    (depthwise.available: CUDA, or the CPU under TRITON_INTERPRET=1), outside torch.compile."""
    return not torch.compiler.is_compiling() and type(x) is torch.Tensor and dw.available(x)


def usable(xs) -> bool:
    """Whether the kernel can sum xs: two or more tensors it runs on (runs_on) of one shape, dtype, device and
    strides, dense (NCHW or NHWC contiguous)."""
    if len(xs) < 2:
        return False
    x = xs[0]
    if not runs_on(x) or not _dense(x) or x.numel() > dw.MAX_ELEMENTS - BLOCK:
        return False
    return all(type(t) is torch.Tensor and t.shape == x.shape and t.stride() == x.stride() and t.dtype == x.dtype
               and t.device == x.device for t in xs[1:])


def _launch(xs) -> torch.Tensor:
    """The kernel's sum of usable(xs) tensors: a new tensor in xs[0]'s layout."""
    out = torch.empty_like(xs[0])
    n = out.numel()
    grid = (triton.cdiv(n, BLOCK),)
    first = 0
    with dw._on(out):
        while first < len(xs):
            chunk = list(xs[first:first + MAX_TERMS]) if first == 0 else [out, *xs[first:first + MAX_TERMS - 1]]
            first += MAX_TERMS if first == 0 else MAX_TERMS - 1
            _add_n_kernel[grid](out, *chunk, *[chunk[0]] * (MAX_TERMS - len(chunk)), n, N=len(chunk), BLOCK=BLOCK,
                              num_warps=WARPS)
    return out


def _sum(xs) -> torch.Tensor:
    return _launch(xs) if usable(xs) else _pairwise(xs)


class _Sum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *xs):
        return _launch(xs)

    @staticmethod
    def backward(ctx, g):
        return tuple(g if need else None for need in ctx.needs_input_grad)


class _FanOut(torch.autograd.Function):
    """n aliases of x; the backward sums the gradients that reach them (None: an alias no op of this pass used)."""

    @staticmethod
    def forward(ctx, x, n):
        ctx.set_materialize_grads(False)
        return tuple(x.view_as(x) for _ in range(n))

    @staticmethod
    def backward(ctx, *gs):
        gs = [g for g in gs if g is not None]
        if not gs:
            return None, None
        # create_graph=True: torch's adds, whose graph a further backward can follow
        return (_pairwise(gs) if torch.is_grad_enabled() else _sum(gs)), None


def add_all(xs) -> torch.Tensor:
    """xs[0] + xs[1] + ... (same shape), one kernel where usable(xs), else torch's adds in that order."""
    xs = list(xs)
    if not usable(xs):
        return _pairwise(xs)
    return _Sum.apply(*xs)


def fan_out(x: torch.Tensor, readers) -> dict:
    """{reader: x} for the given readers, each an alias of x whose gradients are summed by one kernel: a tensor
    several ops read (x itself need not be dense: its readers' gradients usually are; where they are not, or
    differ in layout, torch's adds sum them). Where the kernel does not run (runs_on), every reader gets x
    itself (autograd's adds)."""
    readers = list(readers)
    if len(readers) < 2 or not x.requires_grad or not runs_on(x):
        return dict.fromkeys(readers, x)
    return dict(zip(readers, _FanOut.apply(x, len(readers))))


def _coalesced(shape, strides):
    """(sizes, [strides of each view]) of the same addresses, for views of one `shape` with the given strides (one
    tuple each), with adjacent dims merged where every view's stride steps over the next dim (the output is
    contiguous: only the views decide) and size-1 dims dropped; padded in front to 5 dims (None: more)."""
    keep = [d for d, n in enumerate(shape) if n != 1]
    sizes, groups = [], []  # groups: per merged dim, the original dims' last (innermost) index
    for d in keep:
        if sizes and all(st[groups[-1]] == st[d] * shape[d] for st in strides):
            sizes[-1] *= shape[d]
        else:
            sizes.append(shape[d])
        groups = groups[:len(sizes) - 1] + [d]
    if len(sizes) > 5:
        return None
    pad = 5 - len(sizes)
    return [1] * pad + sizes, [[0] * pad + [st[d] for d in groups] for st in strides]


def scaled_usable(gs, w, idx) -> bool:
    """Whether the kernel can compute sum_i w[idx[i]] * gs[i]: 1 to MAX_TERMS tensors it reads together
    (_views_usable: one shape, dtype and device, any strides), a dense 1-d w of a dtype it reads on their device,
    every index in it."""
    if not 1 <= len(gs) <= MAX_TERMS or len(idx) != len(gs) or not _views_usable(gs):
        return False
    return w.dim() == 1 and w.stride(0) == 1 and w.device == gs[0].device and w.dtype in dw.DTYPES and \
        all(0 <= i < w.numel() for i in idx)


def _launch_scaled(gs, w, idx) -> torch.Tensor:
    """The kernel's sum_i w[idx[i]] * gs[i] for scaled_usable(gs, w, idx): a new contiguous tensor."""
    g = gs[0]
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    n = out.numel()
    if n == 0:
        return out
    sizes, strides = _coalesced(g.shape, [t.stride() for t in gs])
    args = []
    for k in range(MAX_TERMS):  # unused slots: the first input again (never read: N says how many are)
        j = k if k < len(gs) else 0
        args += [gs[j], int(idx[j]), *strides[j]]
    with dw._on(out):
        _add_scaled_kernel[(triton.cdiv(n, BLOCK),)](out, w, n, sizes[1], sizes[2], *args, N=len(gs), S3=sizes[3],
                                                     S4=sizes[4], BLOCK=BLOCK, num_warps=WARPS)
    return out


def scaled_sum(gs, w, idx) -> torch.Tensor:
    """sum_i w[idx[i]] * gs[i] (gs: same shape, any strides; w: 1-d), contiguous: one kernel where scaled_usable,
    else torch's multiply and adds (which a further backward can follow)."""
    if not torch.is_grad_enabled() and scaled_usable(gs, w, idx):
        return _launch_scaled(gs, w, idx)
    out = torch.mul(gs[0], w[idx[0]]).contiguous()
    for g, i in zip(gs[1:], idx[1:]):
        out = torch.addcmul(out, g, w[i])
    return out


class _ScaledFanOut(torch.autograd.Function):
    """n aliases of x for readers that use them scaled by w[idx[i]] and hand back their gradient unscaled; the
    backward: x's gradient sum_i w[idx[i]] * g_i (w gets none here: its readers compute w's gradients). Only the
    pair is correct: the gradient at an alias is unscaled, so each alias must have exactly one reader, of that
    kind (no other op, hook or retain_grad on it)."""

    @staticmethod
    def forward(ctx, x, w, idx):
        ctx.set_materialize_grads(False)
        ctx.idx = idx
        ctx.save_for_backward(w)
        return tuple(x.view_as(x) for _ in idx)

    @staticmethod
    def backward(ctx, *gs):
        (w,) = ctx.saved_tensors
        terms = [(g, i) for g, i in zip(gs, ctx.idx) if g is not None]
        # (not only needs_input_grad: w leads to the betas, so the arch step's autograd.grad runs this node also
        # where x leads only to weights, the first cell's inputs: nothing to compute then)
        if not terms or not _wanted(ctx, 0):
            return None, None, None
        return scaled_sum([g for g, _ in terms], w if torch.is_grad_enabled() else w.detach(),
                          [i for _, i in terms]), None, None


def scaled_fan_out(x: torch.Tensor, w: torch.Tensor, idx) -> list | None:
    """One alias of x per reader i, for readers that compute w[idx[i]] * x and return their output's gradient
    unscaled (batched_ops.WeightedSum's `deferred` inputs): x's gradient is then sum_i w[idx[i]] * g_i, one kernel.
    None where the kernel does not run here (runs_on) or x needs no gradient: the readers then scale as usual."""
    idx = tuple(int(i) for i in idx)
    if not 1 <= len(idx) <= MAX_TERMS or not x.requires_grad or not runs_on(x):
        return None
    return list(_ScaledFanOut.apply(x, w, idx))


def _views_usable(ts) -> bool:
    """Tensors the strided kernels can read together: 1 + up to MAX_TERMS of one shape, dtype and device where
    they run (runs_on), any strides (at most 5 dims once merged), offsets int32-addressable."""
    t = ts[0]
    if not 1 <= len(ts) <= MAX_TERMS + 1 or not runs_on(t) or t.numel() > dw.MAX_ELEMENTS - BLOCK:
        return False
    if any(type(u) is not torch.Tensor or u.shape != t.shape or u.dtype != t.dtype or u.device != t.device
           for u in ts[1:]) or any(dw.extent(u) > dw.MAX_ELEMENTS for u in ts):
        return False
    return _coalesced(t.shape, [u.stride() for u in ts]) is not None


def dots(g: torch.Tensor, xs, dtype=None) -> list:
    """[sum(g * x) for x in xs] (same shape, any strides) as 0-dim tensors of `dtype` (default g's): one kernel
    reading g once and each x once, accumulating in float32 (per program a partial sum, then one deterministic sum
    of the partials), where it runs (at most MAX_TERMS xs, no graph of this computation wanted); else torch's
    multiply and sum per x."""
    xs = list(xs)
    dtype = dtype or g.dtype
    if torch.is_grad_enabled() or not 1 <= len(xs) <= MAX_TERMS or not _views_usable([g, *xs]):
        return [(g * x).sum().to(dtype) for x in xs]
    return list(_launch_dots(g, xs).to(dtype).unbind(0))


def _launch_dots(g, xs) -> torch.Tensor:
    """The kernel's [sum(g * x) for x in xs] as one float32 vector, for _views_usable([g, *xs])."""
    n = g.numel()
    if n == 0:
        return torch.zeros(len(xs), dtype=torch.float32, device=g.device)
    nprog = triton.cdiv(n, BLOCK)
    partials = torch.empty(len(xs), nprog, dtype=torch.float32, device=g.device)  # every program writes its column
    sizes, strides = _coalesced(g.shape, [g.stride()] + [x.stride() for x in xs])
    args = []
    for k in range(MAX_TERMS):  # unused slots: the first x again (never read: N says how many are)
        j = k if k < len(xs) else 0
        args += [xs[j], *strides[1 + j]]
    with dw._on(g):
        _dots_kernel[(nprog,)](partials, n, nprog, sizes[1], sizes[2], g, *strides[0], *args, N=len(xs),
                               S3=sizes[3], S4=sizes[4], BLOCK=BLOCK, num_warps=WARPS)
    return partials.sum(1)
