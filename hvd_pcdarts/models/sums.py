"""Sums of several same-shape tensors in one pass, as a Triton kernel (batched_cell.OPTIONS["sums"] = "triton",
search_step.py +tsm): each input read once, the output written once, accumulated in float32.

Why: the batched search cell sums a group's seven primitive outputs with a chain of adds (6 adds read 2 and write 1
tensor each: 18 tensor passes where one kernel needs 8), and autograd sums the gradients of a tensor read by several
ops the same way (a group's input: its ReLU, both pools and the skip; the ReLU'd input: every convolution op; a
state's bypassed channels: every node after it). Counted on the CPU (session 11, B=64 bf16, RESULTS.md), a step's
adds moved 3.2 GiB of its 16.3 GiB; with these sums it moves 15.0 GiB.

- add_all(xs): xs[0] + xs[1] + ... in one kernel (its backward hands each input the output gradient, as add's does).
- fan_out(x, readers): one alias of x per reader (a dict); their gradients are summed in one kernel, not by the
  engine's pairwise accumulation.
Both fall back to torch's adds (the same numbers as without them, bit for bit) where the kernel does not run: no
Triton, a CPU tensor without TRITON_INTERPRET=1, tensors of different dtypes or strides, a layout that is not dense,
inside torch.compile (inductor fuses the adds itself), or a backward that builds a graph (create_graph=True).
"""

from __future__ import annotations

import torch

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


def _pairwise(xs) -> torch.Tensor:
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    return total


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
