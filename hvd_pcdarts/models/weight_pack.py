"""The weight pack of a batched search cell (BatchedOptions.pack): every edge's convolution weights concatenated
once per forward (one cat, plus under autocast one cast to its dtype), each group's stacked weight a view of it,
and the block-diagonal 1x1 weights of pointwise "dense" gathered from it (one more kernel). Its backward: one cat
of the blocks' gradients (a gather), one cast back, and each weight's gradient a slice of the result."""

from __future__ import annotations

import torch

from ..space.genotypes import PRIMITIVES

_IDX = {name: i for i, name in enumerate(PRIMITIVES)}
SEP = ("sep_conv_3x3", "sep_conv_5x5")
DIL = ("dil_conv_3x3", "dil_conv_5x5")


def conv_specs(stride: int):
    """(primitive, index in its Sequential or FactorizedReduce attribute) of every convolution of one edge whose
    weight the batched op reads, in a fixed order."""
    out = [(name, i) for name in SEP for i in (1, 2, 5, 6)] + [(name, i) for name in DIL for i in (1, 2)]
    if stride != 1:
        out += [("skip_connect", "conv_1"), ("skip_connect", "conv_2")]
    return out


def _conv_module(edge_ops, primitive, where):
    op = edge_ops[_IDX[primitive]]
    return getattr(op, where) if isinstance(where, str) else op[where]


def pack_dtype(weight: torch.Tensor, device_type: str):
    """The dtype autocast would give `weight` in a convolution here and now (None: it stays as it is): autocast
    casts floating tensors other than float64 to its dtype."""
    if not torch.is_autocast_enabled(device_type):
        return None
    dt = torch.get_autocast_dtype(device_type)
    return dt if weight.is_floating_point() and weight.dtype not in (torch.float64, dt) else None


class PackPlan:
    """Where each weight of a cell's pack comes from. The pack's source: the cell's conv weights flattened and
    concatenated in the order of `groups` x `conv_specs` x edges, followed (only with dense keys) by one zero.
    `keys[i]` is the next `shapes[i]` entries of the pack. A key in `dense` is a group's 1x1 weights as one
    block-diagonal weight (E*co, E*ci, 1, 1), gathered from the source by `idx` (off-diagonal entries: the zero);
    the others are the stacked weights (E*co, ci, kh, kw), in order. Without dense keys the pack is the source.
    `stacked_1x1(primitive, where)`: True for a 1x1 weight kept stacked even with `dense` (one that the fused chain
    of experimental/batched_variants.py builds into its own dense weight)."""

    def __init__(self, cell, groups, dense: bool, device, stacked_1x1=None):
        keys, shapes, parts, dense_keys, off = [], [], [], set(), 0
        for gi, group in enumerate(groups):
            E = len(group.edges)
            for primitive, where in conv_specs(group.stride):
                co, ci, kh, kw = _conv_module(cell._ops[group.edges[0]]._ops, primitive, where).weight.shape
                keys.append((gi, primitive, where))
                parts.append(torch.arange(off, off + E * co * ci * kh * kw).view(E * co, ci, kh, kw))
                shapes.append(tuple(parts[-1].shape))
                off += parts[-1].numel()
                if dense and E > 1 and (kh, kw) == (1, 1) and \
                        not (stacked_1x1 and stacked_1x1(primitive, where)):
                    dense_keys.add(keys[-1])
                    shapes[-1] = (E * co, E * ci, 1, 1)
                    parts[-1] = (E, co, ci, parts[-1])  # made block-diagonal below, once the zero's place is known
        self.keys, self.shapes, self.dense, self.idx, self.inv = keys, shapes, dense_keys, None, None
        if dense_keys:
            for i, part in enumerate(parts):
                if isinstance(part, tuple):
                    E, co, ci, stacked = part
                    d = torch.full((E, co, E, ci), off, dtype=torch.long)  # off: the zero's position
                    for e, block in enumerate(stacked.view(E, co, ci)):
                        d[e, :, e, :] = block
                    parts[i] = d
            idx = torch.cat([t.reshape(-1) for t in parts])
            inv = torch.zeros(off + 1, dtype=torch.long)  # the zero's own entry: a gradient nobody reads
            taken = idx != off
            inv[idx[taken]] = torch.arange(len(idx))[taken]
            self.idx, self.inv = idx.to(device), inv.to(device)


class _Gather(torch.autograd.Function):
    """src.index_select(0, idx) for an idx that takes every entry of src once, except its last (a zero, taken for
    every other entry); the backward is a gather as well (`inv`: where each entry of src went; the zero's gradient
    is not needed), no scatter-add: deterministic."""

    @staticmethod
    def forward(ctx, src, idx, inv):
        ctx.save_for_backward(inv)
        return src.index_select(0, idx)

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        return g.index_select(0, inv), None, None


def weight_pack(cell, groups, plan: PackPlan, zero, dtype=None):
    """{(group, primitive, index or attribute): the group's edges' weights of that conv stacked along the output
    channels (block-diagonal for the plan's dense keys)} as views of ONE tensor: one cat of all the cell's conv
    weights (cast to `dtype` when given: the cast autocast would make at each convolution, made once), and with
    dense keys one gather. Its backward: one cat of the blocks' gradients (a gather), one cast back, and each
    weight's gradient a slice of the result. `zero`: a one-element zero of the weights' dtype and device."""
    leaves = []
    for gi, primitive, where in plan.keys:
        leaves += [_conv_module(cell._ops[e]._ops, primitive, where).weight for e in groups[gi].edges]
    flat = torch.cat([w.reshape(-1) for w in leaves] + ([zero] if plan.idx is not None else []))
    if dtype is not None:
        flat = flat.to(dtype)
    if plan.idx is not None:
        flat = _Gather.apply(flat, plan.idx, plan.inv)
    blocks = flat.split([s[0] * s[1] * s[2] * s[3] for s in plan.shapes])
    return {key: b.view(shape) for key, b, shape in zip(plan.keys, blocks, plan.shapes)}
