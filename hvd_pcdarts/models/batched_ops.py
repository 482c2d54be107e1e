"""Building blocks of the batched search cell (models/batched_cell.py): its autograd Functions (the bypassed
channels' weighted sum, the channels_last gradient), the stacked FactorizedReduce, block-diagonal 1x1 weights,
channel repeats, and the CUDA side streams a group's ops run on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SIDE_STREAMS = {}  # device index -> [torch.cuda.Stream], created once per process and reused by every cell

STREAM_MODES = ("off", "capture", "on")


def wanted(ctx, i: int, node_index: int | None = None) -> bool:
    """Whether this backward pass uses the gradient of input i: not only requires_grad (ctx.needs_input_grad), but
    also reached by the engine. The architecture step's torch.autograd.grad(loss, alphas/betas) needs no weight
    gradient, and skips it for torch's own convolutions; a custom Function must ask. `node_index`: i's entry in
    ctx.next_functions where it differs (next_functions has one entry per tensor argument only)."""
    if not ctx.needs_input_grad[i]:
        return False
    if torch.compiler.is_compiling():  # traced (torch.compile): no engine to ask, and the traced ctx has no
        return True                     # next_functions (asking made dynamo give up on the whole cell)
    node = ctx.next_functions[i if node_index is None else node_index][0]
    try:
        return node is None or torch._C._will_engine_execute_node(node)
    except (AttributeError, RuntimeError):  # not in this torch, or not in a backward pass: compute it
        return True


def add_chain(xs) -> torch.Tensor:
    """xs[0] + xs[1] + ...: torch's adds, in that order."""
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    return total


def is_nhwc(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def use_streams(x: torch.Tensor, mode: str) -> bool:
    """Whether a group's ops go to side streams now: BatchedOptions.streams `mode`, on a CUDA tensor."""
    if mode not in STREAM_MODES:
        raise ValueError(f"BatchedOptions.streams = {mode!r}: off, capture or on")
    if mode == "off" or not x.is_cuda or torch.compiler.is_compiling():
        return False
    if mode == "on":
        return True
    with torch.cuda.device(x.device):
        return torch.cuda.is_current_stream_capturing()


def side_streams(device, n):
    streams = _SIDE_STREAMS.setdefault(torch.device(device).index, [])
    while len(streams) < n:
        streams.append(torch.cuda.Stream(device=device))
    return streams


def on_side_streams(fns, inputs):
    """fns() each on its own side stream, forked from the current stream after `inputs` are ready and joined back
    before the results are used. The caching allocator is told which streams use which blocks (record_stream), so
    no block is reused while another stream may still read it; autograd runs each op's backward on the op's stream
    and synchronizes the streams it joins."""
    main = torch.cuda.current_stream(inputs[0].device)
    streams = side_streams(main.device, len(fns))
    outs = []
    for fn, st in zip(fns, streams):
        for t in inputs:
            t.record_stream(st)
        st.wait_stream(main)
        with torch.cuda.stream(st):
            outs.append(fn())
    for st, y in zip(streams, outs):
        main.wait_stream(st)
        y.record_stream(main)
    return outs


def repeat_channels(x, rep, scale=None, shift=None):
    """x (N, C, H, W) repeated rep times along the channels -> (N, rep*C, H, W), in x's memory format, times a
    per-channel `scale` plus `shift` (each of rep*C channels) when given: one kernel either way."""
    n, c, h, w = x.shape
    nhwc = x.stride(1) == 1 and h * w > 1  # channels innermost: NHWC, also a channel slice of an NHWC tensor
    v = x.permute(0, 2, 3, 1).unsqueeze(3) if nhwc else x.unsqueeze(1)  # (n, h, w, 1, c) or (n, 1, c, h, w)
    shape = (rep, c) if nhwc else (1, rep, c, 1, 1)
    if scale is None:
        y = v.expand(*v.shape[:3], rep, c) if nhwc else v.expand(n, rep, c, h, w)
        y = y.contiguous()
    elif shift is None:
        y = v * scale.view(shape)
    else:
        y = torch.addcmul(shift.view(shape), v, scale.view(shape))
    if nhwc:
        return y.reshape(n, h, w, rep * c).permute(0, 3, 1, 2)
    return y.reshape(n, rep * c, h, w)


def block_diagonal(w, eye):
    """(E*co, ci, kh, kw) weights of E groups -> the (E*co, E*ci, kh, kw) dense weight with them on the diagonal
    and exact zeros elsewhere (a multiply by eye(E): one kernel, and its backward hands each edge its block)."""
    E = eye.shape[0]
    co, ci, kh, kw = w.shape[0] // E, w.shape[1], w.shape[2], w.shape[3]
    dense = w.view(E, co, 1, ci, kh, kw) * eye.to(w.dtype).view(E, 1, E, 1, 1, 1)
    return dense.reshape(E * co, E * ci, kh, kw)


class WeightedSum(torch.autograd.Function):
    """sum_j b_j * x_j (0-dim b_j, same-shape x_j: a node's bypassed channels, its edges' betas times their inputs'
    rests), computed as autograd's mul/addcmul chain would. Its backward takes 3 ops a term, g * b_j and
    sum(g * x_j), where addcmul's took 5 (it multiplies x_j and b_j by addcmul's `value` 1 first, one of them a
    full-size multiply). x_j's gradient comes out contiguous in x_j's shape, so the reshape behind a view x_j
    needs no copy. `deferred[j]`: x_j is an alias from experimental/sums.scaled_fan_out, which scales the gradient
    itself: x_j gets g unscaled (no multiply, nothing written). `dots` (BatchedOptions.sums "triton", where its
    kernel runs): the betas' gradients from one kernel (experimental/sums.dots: g read once, no products written).
    Called as WeightedSum.apply(n, deferred, dots, *bs, *xs)."""

    @staticmethod
    def forward(ctx, n, deferred, dots, *args):
        bs, xs = args[:n], args[n:]
        ctx.n, ctx.deferred, ctx.dots = n, tuple(deferred), bool(dots)
        ctx.save_for_backward(*bs, *xs)
        r = xs[0] * bs[0]
        for x, b in zip(xs[1:], bs[1:]):
            r = torch.addcmul(r, x, b)
        return r

    @staticmethod
    def backward(ctx, g):
        n = ctx.n
        saved = ctx.saved_tensors
        bs, xs = saved[:n], saved[n:]
        # the gradients this pass reaches (next_functions: bs then xs, no entry for n, deferred and dots): the
        # weight step's backward (inputs = the weights) needs no beta's, each a full-size multiply and reduction;
        # nor the arch step the first cell's rests' (deferred ones: handed back as they are, for free, and the
        # fan-out computes nothing where its input is not needed)
        need = [wanted(ctx, 3 + i, i) for i in range(2 * n)]
        # eager, no graph of this backward wanted (create_graph: out= is not differentiable)
        eager = type(g) is torch.Tensor and not torch.compiler.is_compiling() and not torch.is_grad_enabled()
        gbs = WeightedSum._beta_grads(ctx, g, bs, xs, [j for j in range(n) if need[j]], eager)
        gxs = []
        for j, (x, b) in enumerate(zip(xs, bs)):
            if not need[n + j]:
                gxs.append(None)
            elif ctx.deferred[j]:
                gxs.append(g)
            elif eager:  # the transpose fused into the mul
                gxs.append(torch.mul(g, b, out=torch.empty(x.shape, dtype=x.dtype, device=x.device)))
            else:  # traced (torch.compile): out= does not fix a traced result's strides; the compiler fuses the copy
                gxs.append((g * b).contiguous())  # (create_graph: an autograd graph of the multiply and copy)
        return (None, None, None, *gbs, *gxs)

    @staticmethod
    def _beta_grads(ctx, g, bs, xs, want, eager):
        gbs = [None] * len(bs)
        if ctx.dots and eager and want:  # g read once for all of them, no product written
            from ..experimental import sums

            for j, d in zip(want, sums.dots(g, [xs[j] for j in want], bs[want[0]].dtype)):
                gbs[j] = d
        else:
            for j in want:
                gbs[j] = (g * xs[j]).sum()
        return gbs


class ChannelsLastGrad(torch.autograd.Function):
    """Identity; its backward returns the gradient channels_last (BatchedOptions.cl_grads)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous(memory_format=torch.channels_last)


def factorized_reduce(R, w1, w2, E, eyes=None, dense=False):
    """Every edge's FactorizedReduce (after its ReLU, before its BN) over the stacked inputs: two stride-2 1x1
    convs, the second on the input shifted by one pixel (odd sizes padded); each edge's two halves side by side.
    `eyes`: make the weights block-diagonal dense ones; `dense`: they are already."""
    shifted = R[:, :, 1:, 1:]
    if R.shape[-1] % 2 or R.shape[-2] % 2:
        shifted = F.pad(shifted, (0, R.shape[-1] % 2, 0, R.shape[-2] % 2))
    groups = 1 if dense else E
    if eyes is not None and E > 1 and not dense:
        w1, w2, groups = block_diagonal(w1, eyes[E]), block_diagonal(w2, eyes[E]), 1
    a = F.conv2d(R, w1, None, 2, 0, 1, groups)
    b = F.conv2d(shifted, w2, None, 2, 0, 1, groups)
    n, _, h, w = a.shape
    half = a.shape[1] // E
    if is_nhwc(a):  # channels_last out, as the per-edge op's cat along the channels gives (a 5-d cat of the
        # channel views below would come out NCHW: its BN, the group's sum and their gradients in mixed layouts)
        ab = [t.permute(0, 2, 3, 1).unflatten(3, (E, half)) for t in (a, b)]
        return torch.cat(ab, dim=4).reshape(n, h, w, E * 2 * half).permute(0, 3, 1, 2)
    return torch.cat([a.unflatten(1, (E, half)), b.unflatten(1, (E, half))], dim=2).reshape(n, E * 2 * half, h, w)
