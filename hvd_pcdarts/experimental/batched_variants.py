"""The batched search cell's untimed choices (models/batched_options.BatchedOptions), off by default; the runner
imports this module only when one of them is chosen. Each gives the same results as the default (tests/test_batched.py
and the kernel tests run every choice against the per-edge reference).

- dedup: edges of a group that read the same state (group 0: 8 edges over the 2 cell inputs; later groups: all
  edges read one node) share one pooling, one ReLU and one set of batch statistics for the pools' BNs, computed
  once per distinct input instead of once per edge (each edge keeps its own running statistics and scale): fewer
  bytes, a few more small kernels.
- dilated: dilated depthwise convs as ordinary depthwise convs with zeros between the taps (3x3 dilation 2 -> 5x5,
  5x5 dilation 2 -> 9x9): on the H100 in NHWC, cuDNN ran the dilated ones in a direct kernel ~6x slower per call
  than the 5x5 of sep_conv_5x5 (H100 profile). "native" (off), "3x3" (dil_conv_3x3 only), "all".
- fuse: the convolution ops of a group as one chain: "5x5" = the first depthwise convs of sep_conv_3x3,
  sep_conv_5x5 and dil_conv_3x3 as ONE depthwise conv over the group's ReLU'd input with 3 filters per channel
  (5x5 kernels: the 3x3 zero-padded, the dilated 3x3 undilated), their 1x1 convs as one dense conv, their BNs (the
  separable convs' first, the dilated conv's only) as one BN; then both separable convs' second halves as one 5x5
  depthwise conv, one 1x1 conv and one BN. "all" also takes dil_conv_5x5 in (9x9 kernels, 4 filters per channel).
  The input is read once instead of 3-4 times and its gradient comes out of one convolution instead of 3-4 summed
  ones; 3x fewer kernels for these ops. "off": each op its own chain.
- depthwise: the depthwise convolutions (one filter per channel) of channels_last runs: "cudnn" (F.conv2d),
  "triton" (experimental/depthwise.py: forward and both gradients as Triton kernels, dilation native; CUDA only,
  elsewhere F.conv2d) or "hybrid" (Triton for the dilated convs and every weight gradient, cuDNN for the rest).
- pool: the pools (max_pool_3x3, avg_pool_3x3, and the reduction cells' 2x2 max pool of the bypassed channels) of
  channels_last runs: "torch" or "triton" (experimental/pooling.py: forward and gradient as Triton kernels; torch's
  NHWC pooling kernels ran 10-15x above their bytes' time on the H100).
- sums: the sums of several same-shape tensors: a group's primitive outputs (a node's parts too where they are
  dense; in these cells they are channel views), and the gradients of a group's input and of its ReLU (each read
  by several ops): "torch" (chains of adds, and autograd's pairwise accumulation) or "triton"
  (experimental/sums.py: one pass each, in float32; where it cannot run, torch's adds). Also the gradients of each
  state's bypassed channels from the nodes that read them: sum_i beta_i * g_i in one kernel over the nodes'
  gradients in place (sums.scaled_fan_out), and each node's betas' gradients sum(g * rest_j) in one kernel reading
  g once (sums.dots). Counted on the CPU, a B=64 bf16 step: 16.28 -> 15.01 GiB in 12,406 -> 11,760 ops (one-pass
  sums), -> 14.12 GiB in 11,311 ops (with the bypassed channels' sums).

None is timed on a GPU yet (benchmarks/RESULTS.md, "Experimental GPU options").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import batched_ops as bo
from ..models.weight_pack import SEP
from ..space.genotypes import PRIMITIVES
from . import depthwise, pooling, sums

_IDX = {name: i for i, name in enumerate(PRIMITIVES)}


# --- fuse ------------------------------------------------------------------------------------------------------
def fused_members(mode: str):
    """BatchedOptions.fuse -> (primitives of the fused first stage, their common kernel size), or None when off."""
    if mode not in ("off", "5x5", "all"):
        raise ValueError(f"BatchedOptions.fuse = {mode!r}: off, 5x5 or all")
    if mode == "off":
        return None
    if mode == "5x5":
        return ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3"), 5
    return ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"), 9


def buffer_sets(slots, fused):
    """An edge's BN `slots` as the sets whose running statistics are one tensor per group, with the fused chain:
    its first stage's BNs one set, the separable convs' last BNs another (each computed by one batch_norm call),
    every other slot a set of its own."""
    first = [(p, "mid" if p in SEP else "last") for p in fused[0]]
    second = [(p, "last") for p in SEP]
    rest = [slot for slot in slots if slot not in first and slot not in second]
    return [[slot] for slot in rest] + [first, second]


def fused_stacked_1x1(fused):
    """PackPlan's `stacked_1x1`: the 1x1 weights the fused chain builds into its own dense weights."""
    return lambda primitive, where: (primitive in fused[0] and where == 2) or (primitive in SEP and where == 6)


def add_permutations(aux, cache, groups, n, cp, device):
    """aux[("perm", E)] for every group of E edges: the fused 1x1 conv's input channels, (channel, op) interleaved
    -> op-major (perm[ch * n + m] = m * c + ch), cached in `cache` (the runner's)."""
    for g in groups:
        c = len(g.edges) * cp
        key = ("perm", device, n, c)
        if key not in cache:
            cache[key] = torch.arange(n * c).view(n, c).t().reshape(-1).to(device)
        aux[("perm", len(g.edges))] = cache[key]


def fused_chain(runner, g, scales):
    """The fused ops of one group (runner: its BatchedCellRunner, g: its _GroupOps, scales: primitive -> per-channel
    scale): relu, one depthwise conv with n filters per channel, one 1x1 conv, one BN (the dilated convs end here),
    relu, one depthwise conv, one 1x1 conv, one BN (separable)."""
    (members, k), E = runner._fused, g.E
    n, c = len(members), E * g.cp
    first = g.ops[0][_IDX[members[0]]][1]
    w = []
    for primitive in members:
        wi = runner._weight(g, primitive, 1)
        dilation = g.ops[0][_IDX[primitive]][1].dilation
        w.append(pad_kernel(dilate_weight(wi, dilation) if tuple(dilation) != (1, 1) else wi, k))
    # output channel ch * n + m: filter m of channel ch (a depthwise conv's channel multiplier)
    y = F.conv2d(g.rin["fused"], torch.stack(w, dim=1).flatten(0, 1), None, first.stride, k // 2, 1, c)
    # one 1x1 conv: block-diagonal over (op, edge), op-major outputs, inputs in the interleaved order
    w = bo.block_diagonal(torch.cat([runner._weight(g, p, 2) for p in members]), g.aux[n * E])
    y = F.conv2d(y, w.index_select(1, g.aux[("perm", E)]))
    ones = scales[members[0]].new_ones(2 * c)
    y = runner._bn(g, y, members[0], "mid", torch.cat([ones] + [scales[p] for p in members[2:]]))
    sep, *dil = y.split([2 * c] + [c] * (n - 2), dim=1)
    # the separable convs' second halves: one 5x5 depthwise conv, one 1x1 conv, one BN
    w, sep = torch.cat([pad_kernel(runner._weight(g, p, 5), 5) for p in SEP]), F.relu(sep)
    mode = runner.options.depthwise
    y = depthwise.depthwise_conv2d(sep, w, 1, 2, 1, mode) if mode != "cudnn" and triton_depthwise(sep) else \
        F.conv2d(sep, w, None, 1, 2, 1, 2 * c)
    w = torch.cat([runner._weight(g, p, 6) for p in SEP])
    y = F.conv2d(y, bo.block_diagonal(w, g.eyes[2 * E]), None) if g.eyes is not None else \
        F.conv2d(y, w, None, 1, 0, 1, 2 * E)
    a, b = runner._bn(g, y, SEP[0], "last", torch.cat([scales[p] for p in SEP])).split(c, dim=1)
    return runner._add_all([a, b, *dil])


def pad_kernel(w, k):
    """A (C, 1, kh, kw) kernel zero-padded around to (C, 1, k, k): the same convolution with padding k // 2."""
    p = (k - w.shape[-1]) // 2
    return F.pad(w, (p, p, p, p)) if p else w


# --- dilated ---------------------------------------------------------------------------------------------------
def undilate(primitive: str, mode: str) -> bool:
    """Whether BatchedOptions.dilated `mode` computes this primitive's dilated conv undilated."""
    return mode == "all" or (mode == "3x3" and primitive == "dil_conv_3x3")


def dilate_weight(w, dilation):
    """A (C, 1, k, k) kernel with dilation d as the (C, 1, d(k-1)+1, ...) kernel with zeros between its taps: the
    same convolution (same padding and stride) without dilation; the zeros get no gradient."""
    dh, dw = dilation
    kh, kw = w.shape[2], w.shape[3]
    out = w.new_zeros(w.shape[0], w.shape[1], dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    out[:, :, ::dh, ::dw] = w
    return out


# --- dedup -----------------------------------------------------------------------------------------------------
def bn_repeated(shared, y, scale, rep, training):
    """The batched BN of y repeated rep times along the channels (`shared`: the runner's (module, running mean,
    running var, ...) of that BN slot): batch statistics once, each edge's running statistics updated with them
    (training), or each edge's own statistics (eval)."""
    m, rm, rv, *_ = shared
    if training:
        yn = F.batch_norm(y, None, None, None, None, True, 0.0, m.eps)
        with torch.no_grad():  # as batch_norm updates them: unbiased variance, exponential average
            var, mean = torch.var_mean(y.detach().to(rm.dtype), dim=(0, 2, 3), correction=1)
            rm.lerp_(mean.repeat(rep), m.momentum)
            rv.lerp_(var.repeat(rep), m.momentum)
        if yn.dtype != scale.dtype:  # autocast: scaled in float32 like batch_norm's mixed mode (and the
            return bo.repeat_channels(yn, rep, scale).to(yn.dtype)  # scale's gradient reduced in float32)
        return bo.repeat_channels(yn, rep, scale)
    a = scale * torch.rsqrt(rv + m.eps)
    return bo.repeat_channels(y, rep, a.to(y.dtype), (-rm * a).to(y.dtype))


# --- Triton kernels: depthwise, pool, sums ----------------------------------------------------------------------
def triton_depthwise(x) -> bool:
    """Whether the Triton depthwise kernels compute this conv (channels_last, where they run)."""
    # is_compiling first: available() reads the storage offset, a graph break under dynamo
    return not torch.compiler.is_compiling() and bo.is_nhwc(x) and depthwise.available(x)


depthwise_conv2d = depthwise.depthwise_conv2d


def pool(mod, x):
    """mod(x) for a search cell's nn.MaxPool2d / nn.AvgPool2d (count_include_pad=False), as the Triton kernels
    where they can run (channel stride 1: channels_last runs; CUDA), else the module."""
    if torch.compiler.is_compiling() or x.dim() != 4 or x.stride(1) != 1 or \
            not pooling.available(x):  # (is_compiling before available(): its storage offset breaks a graph)
        return mod(x)
    if isinstance(mod, torch.nn.MaxPool2d) and mod.dilation in (1, (1, 1)) and not mod.return_indices:
        kind = "max"
    elif isinstance(mod, torch.nn.AvgPool2d) and not mod.count_include_pad and mod.divisor_override is None:
        kind = "avg"
    else:
        return mod(x)
    return pooling.pool2d(x, kind, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode)


def sums_run_on(x) -> bool:
    return sums.runs_on(x)


def add_all(xs):
    """xs[0] + xs[1] + ...: one kernel where it runs, else torch's adds in that order."""
    return sums.add_all(xs) if sums.runs_on(xs[0]) else bo.add_chain(xs)


def fan_out(x, readers) -> dict:
    """{reader: x}, as aliases whose gradients one kernel sums (where it runs)."""
    return sums.fan_out(x, readers) if sums.runs_on(x) else dict.fromkeys(readers, x)


def scaled_fan_out(x, w, idx):
    """Aliases of x for the nodes that read it times w[idx[i]] and hand back their gradients unscaled, one kernel
    summing them (where it runs); None: the nodes scale their own gradients."""
    return sums.scaled_fan_out(x, w, idx) if sums.runs_on(x) else None
