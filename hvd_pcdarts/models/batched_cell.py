"""The batched mixed op (`--batched-edges`): a search cell's forward with the edges that are ready at the
same time computed together, as grouped convolutions over their stacked partial channels.

Same module, same parameters, same state_dict as the reference `SearchCell.forward` (so checkpoints, optimizers,
Horovod hooks and the elastic state are untouched); only the order of the arithmetic changes. Why it is equal:

- Edges are grouped by the state they read. Group 0: the edges from the two cell inputs to every node (all with
  the cell's stride); group t >= 2: the edges from intermediate node t-2 to the later nodes (stride 1). A group's
  partial inputs x_e[:, :C/K] are concatenated along the channels (E*C/K channels), and every candidate op runs
  once over all of them: depthwise convs with groups=E*C/K, pointwise convs with groups=E (each edge's own
  weights, concatenated), pools and BatchNorm are per channel anyway. So each edge's slice of the result is
  exactly that edge's op output.
- The mixing weights softmax(alpha)[e, op] * edge_softmax(beta)[e] are folded into the last BatchNorm of each op
  as its per-channel scale (BN(x) * s == (x - mean) / std * s; the search net's BNs have no affine parameters),
  and into one multiply for the identity. `none` contributes exactly zero and is left out.
- A node is sum_e beta_e * shuffle(cat(mixed_e, rest_e)); shuffle and cat are linear, so it equals
  shuffle(cat(sum_e beta_e mixed_e, sum_e beta_e rest_e)), assembled in one copy.
- BatchNorm running statistics: the per-edge BN modules keep their buffers, but the buffers of one group and
  one op position are made views of one shared tensor, so the batched BN updates every edge's statistics in
  place (state_dict and checkpoints look exactly as before). The modules' `num_batches_tracked` counters (all
  equal in the reference, each BN runs once per forward) are one shared tensor per cell.

- Weights: each group's stacked (or block-diagonal) conv weights are views of one tensor per cell and forward
  (`weight_pack`: one cat, one cast under autocast, one gather), each weight's gradient a slice of its gradient.

About 2.3x fewer kernels per cell than the per-edge forward, and 22-30% fewer ops again in a search
step's graph (weight pack, `_WeightedSum`, repeated inputs as one copy); tests/test_batched.py checks equality in
float64, benchmarks/search_step.py measures the speed, benchmarks/step_traffic.py counts the ops and bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..genotypes import PRIMITIVES
from . import depthwise, pooling, sums

_IDX = {name: i for i, name in enumerate(PRIMITIVES)}
_SEP = ("sep_conv_3x3", "sep_conv_5x5")
_POOLS = ("max_pool_3x3", "avg_pool_3x3")
_DIL = ("dil_conv_3x3", "dil_conv_5x5")

# How the batched op computes, for A/B timings (benchmarks/search_step.py variant suffixes: +pwg, +ud3, +tdh, ...,
# see BE_OPTIONS there); the results are the same either way (tests/test_batched.py and tests/test_depthwise.py run
# every choice against the per-edge reference).
OPTIONS = {
    # the 1x1 convolutions of the stacked edges (pointwise convs, FactorizedReduce): "grouped" (groups=E, each
    # edge's weight) or "dense" (one block-diagonal weight: E x the FLOPs, but one GEMM instead of cuDNN's
    # grouped kernels with C/K channels per group, 5x slower on an H100); "auto": dense on CUDA, grouped elsewhere
    "pointwise": "auto",
    # channels_last runs: the gradient reaching each group's ops made channels_last (the backward of the
    # node sums/unbind hands back NCHW gradients, which send BN backward to its slow strided kernel and cuDNN
    # to layout conversions)
    "cl_grads": True,
    # the independent ops of a group (pools, skip, separable and dilated convs) on CUDA side streams, forked from
    # and joined back to the current stream: "capture" = only while a CUDA graph is captured (the graph then holds
    # parallel branches, their backward runs on the same streams; H100: B=256 143.8 -> 129.5 ms,
    # B=32 44.8 -> 34.0 ms, bit-identical results), "on" = eager too (launch-bound there: no gain expected), "off"
    "streams": "capture",
    # edges of a group that read the same state (group 0: 8 edges over the 2 cell inputs; later groups: all edges
    # read one node) share one pooling, one ReLU and one set of batch statistics for the pools' BNs, computed
    # once per distinct input instead of once per edge (each edge keeps its own running statistics and scale):
    # fewer bytes, a few more small kernels. Not yet timed on a GPU: off
    "dedup": False,
    # dilated depthwise convs as ordinary depthwise convs with zeros between the taps (3x3 dilation 2 -> 5x5,
    # 5x5 dilation 2 -> 9x9): on the H100 in NHWC, cuDNN ran the dilated ones in a direct kernel ~6x slower per
    # call than the 5x5 of sep_conv_5x5 (H100 profile). "native" (off), "3x3" (dil_conv_3x3 only), "all".
    # Not yet timed on a GPU
    "dilated": "native",
    # the convolution ops of a group as one chain: "5x5" = the first depthwise convs of sep_conv_3x3, sep_conv_5x5
    # and dil_conv_3x3 as ONE depthwise conv over the group's ReLU'd input with 3 filters per channel (5x5 kernels:
    # the 3x3 zero-padded, the dilated 3x3 undilated), their 1x1 convs as one dense conv, their BNs (the separable
    # convs' first, the dilated conv's only) as one BN; then both separable convs' second halves as one 5x5
    # depthwise conv, one 1x1 conv and one BN. "all" also takes dil_conv_5x5 in (9x9 kernels, 4 filters per
    # channel). The input is read once instead of 3-4 times and its gradient comes out of one convolution instead
    # of 3-4 summed ones; 3x fewer kernels for these ops. "off": each op its own chain. Not yet timed on a GPU
    "fuse": "off",
    # the depthwise convolutions (one filter per channel) of channels_last runs: "cudnn" (F.conv2d), "triton"
    # (models/depthwise.py: forward and both gradients as Triton kernels, dilation native; CUDA only, elsewhere
    # F.conv2d) or "hybrid" (Triton for the dilated convs and every weight gradient, cuDNN for the rest). Not yet
    # timed on a GPU
    "depthwise": "cudnn",
    # the pools (max_pool_3x3, avg_pool_3x3, and the reduction cells' 2x2 max pool of the bypassed channels) of
    # channels_last runs: "torch" or "triton" (models/pooling.py: forward and gradient as Triton kernels; torch's
    # NHWC pooling kernels ran 10-15x above their bytes' time on the H100). Not yet timed on a GPU
    "pool": "torch",
    # the convolution weights of a cell as one tensor (weight_pack): every edge's conv weights concatenated once per
    # forward (one cat, plus under autocast one cast to its dtype), each group's stacked weight a view of it, and
    # the block-diagonal 1x1 weights of "pointwise" dense gathered from it (one more kernel). False: a cat per
    # grouped conv, a multiply by eye(E) per block-diagonal weight (a multiply + sum in its backward) and, under
    # autocast, a cast per conv forward and per weight gradient: one search step's ops in the graph, counted on the
    # CPU with CUDA's choices: 8,381 -> 7,253 in float32, 9,766 -> 7,498 in bf16. Bit-identical.
    # Not yet timed on a GPU (benchmarks/RESULTS.md, "Experimental GPU options")
    "pack": True,
    # the sums of several same-shape tensors: a group's primitive outputs (a node's parts too where they are dense;
    # in these cells they are channel views), and the gradients of a group's input and of its ReLU (each read by
    # several ops): "torch" (chains of adds, and autograd's pairwise
    # accumulation) or "triton" (models/sums.py: one pass each, in float32; where it cannot run, torch's adds).
    # Also the gradients of each state's bypassed channels from the nodes that read them: sum_i beta_i * g_i in one
    # kernel over the nodes' gradients in place (sums.scaled_fan_out), and each node's betas'
    # gradients sum(g * rest_j) in one kernel reading g once (sums.dots). Counted on the CPU, a B=64 bf16 step:
    # 16.28 -> 15.01 GiB in 12,406 -> 11,760 ops (one-pass sums), -> 14.12 GiB in 11,311 ops (with the
    # bypassed channels' sums). Not yet timed on a GPU
    "sums": "torch",
}
_SIDE_STREAMS = {}  # device index -> [torch.cuda.Stream]
_SKIP_ROW = PRIMITIVES.index("skip_connect") - 1  # its row in the per-op scales (which leave out "none")


def _fused_members(mode: str):
    """OPTIONS["fuse"] -> (primitives of the fused first stage, their common kernel size), or None when off."""
    if mode not in ("off", "5x5", "all"):
        raise ValueError(f"batched_cell.OPTIONS['fuse'] = {mode!r}: off, 5x5 or all")
    if mode == "off":
        return None
    if mode == "5x5":
        return ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3"), 5
    return ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"), 9


def _buffer_sets(stride: int, mode: str):
    """The BN slots of one edge as the sets whose running statistics are one tensor per group: one set per slot,
    except with OPTIONS["fuse"] on, where the fused first stage's BNs are one set and the separable convs' last
    BNs another (each computed by one batch_norm call)."""
    fused = _fused_members(mode)
    if fused is None:
        return [[slot] for slot in bn_slots(stride)]
    first = [(p, "mid" if p in _SEP else "last") for p in fused[0]]
    second = [(p, "last") for p in _SEP]
    rest = [slot for slot in bn_slots(stride) if slot not in first and slot not in second]
    return [[slot] for slot in rest] + [first, second]


def conv_specs(stride: int):
    """(primitive, index in its Sequential or FactorizedReduce attribute) of every convolution of one edge whose
    weight the batched op reads, in a fixed order."""
    out = [(name, i) for name in _SEP for i in (1, 2, 5, 6)] + [(name, i) for name in _DIL for i in (1, 2)]
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
    the others are the stacked weights (E*co, ci, kh, kw), in order. Without dense keys the pack is the source."""

    def __init__(self, cell, groups, dense: bool, fused, device):
        keys, shapes, parts, dense_keys, off = [], [], [], set(), 0
        for gi, group in enumerate(groups):
            E = len(group.edges)
            for primitive, where in conv_specs(group.stride):
                co, ci, kh, kw = _conv_module(cell._ops[group.edges[0]]._ops, primitive, where).weight.shape
                keys.append((gi, primitive, where))
                parts.append(torch.arange(off, off + E * co * ci * kh * kw).view(E * co, ci, kh, kw))
                shapes.append(tuple(parts[-1].shape))
                off += parts[-1].numel()
                if dense and E > 1 and (kh, kw) == (1, 1) and not _fused_1x1(primitive, where, fused):
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


def _fused_1x1(primitive, where, fused) -> bool:
    """Whether OPTIONS["fuse"]'s chain builds this 1x1 weight into its own dense weight."""
    if fused is None:
        return False
    return (primitive in fused[0] and where == 2) or (primitive in _SEP and where == 6)


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


def edge_offset(node: int) -> int:
    """Index of the first incoming edge of intermediate node `node` (node i has 2 + i incoming edges)."""
    return sum(2 + i for i in range(node))


class Group:
    """Edges that read states available at the same time: `edges[k]` reads state `inputs[k]` (0, 1: the cell's
    inputs; t >= 2: node t-2) and feeds node `nodes[k]`; ordered by node, then input."""

    def __init__(self, edges, inputs, nodes, stride):
        self.edges, self.inputs, self.nodes, self.stride = list(edges), list(inputs), list(nodes), stride
        # inputs == distinct * repeats (group 0: [0, 1] * steps; later groups: [t] * E)
        distinct = list(dict.fromkeys(self.inputs))
        r = len(self.inputs) // len(distinct)
        self.repeats = r if distinct * r == self.inputs else 1


def plan(steps: int, reduction: bool):
    groups = []
    e = [(edge_offset(i) + j, j, i) for i in range(steps) for j in (0, 1)]
    groups.append(Group([x[0] for x in e], [x[1] for x in e], [x[2] for x in e], 2 if reduction else 1))
    for t in range(2, steps + 1):
        e = [(edge_offset(i) + t, t, i) for i in range(t - 1, steps)]
        groups.append(Group([x[0] for x in e], [x[1] for x in e], [x[2] for x in e], 1))
    return groups


# BatchNorm slots inside one edge's op: name -> accessor
_SLOTS = {
    "pool": lambda op: op[1],  # Sequential(pool, BatchNorm2d)
    "fr": lambda op: op.bn,  # FactorizedReduce (stride-2 skip_connect)
    "last": lambda op: op[-1],  # SepConv's second BN, DilConv's BN
    "mid": lambda op: op[3],  # SepConv's first BN
}


def bn_slots(stride: int):
    """(primitive, slot) of every BatchNorm of one edge, in a fixed order."""
    out = [("max_pool_3x3", "pool"), ("avg_pool_3x3", "pool")]
    if stride != 1:
        out.append(("skip_connect", "fr"))
    for name in _SEP:
        out += [(name, "mid"), (name, "last")]
    for name in _DIL:
        out.append((name, "last"))
    return out


class BatchedCellRunner:
    """The batched forward of one SearchCell, with the plan and the shared BN buffers it keeps."""

    def __init__(self, cell):
        self.groups = plan(cell._steps, cell.reduction)
        # {(group, primitive, slot): (first module, running_mean, running_var[, the whole set's mean, var])}
        self._shared = None
        self._layout = None  # OPTIONS["fuse"] the buffers were shared for
        self._counter = None
        self._index = {}  # (device, group, channels per edge) -> channel -> edge index
        self._compiled = None  # torch.compile(BatchedCellRunner._compute) after compile()

    # --- shared BN buffers ------------------------------------------------------------------------------
    def _bns(self, cell, group, primitive, slot):
        return [_SLOTS[slot](cell._ops[e]._ops[_IDX[primitive]]) for e in group.edges]

    def _alias(self, cell):
        shared, counter, self._layout = {}, None, OPTIONS["fuse"]
        for gi, group in enumerate(self.groups):
            for members in _buffer_sets(group.stride, self._layout):
                mods = [self._bns(cell, group, primitive, slot) for primitive, slot in members]
                rm = torch.cat([m.running_mean.detach() for ms in mods for m in ms])
                rv = torch.cat([m.running_var.detach() for ms in mods for m in ms])
                n, off = mods[0][0].running_mean.numel(), 0
                for (primitive, slot), ms in zip(members, mods):
                    for k, m in enumerate(ms):
                        m.running_mean = rm[off + k * n:off + (k + 1) * n]
                        m.running_var = rv[off + k * n:off + (k + 1) * n]
                        if counter is None:
                            counter = m.num_batches_tracked.detach().clone()
                        m.num_batches_tracked = counter
                    size = n * len(ms)
                    shared[(gi, primitive, slot)] = (ms[0], rm[off:off + size], rv[off:off + size])
                    off += size
                if len(members) > 1:  # the whole set, for the one batch_norm call over it
                    shared[(gi, *members[0])] = shared[(gi, *members[0])] + (rm, rv)
        self._shared, self._counter = shared, counter

    def _buffers_intact(self, cell) -> bool:
        """False after anything replaced the modules' buffers (model.to(), .double(), a module swap)."""
        if self._shared is None or self._layout != OPTIONS["fuse"]:
            return False
        for (gi, primitive, slot), (m, rm, rv, *_) in self._shared.items():
            if self._bns(cell, self.groups[gi], primitive, slot)[0] is not m:
                return False
            if m.running_mean.data_ptr() != rm.data_ptr() or m.running_var.data_ptr() != rv.data_ptr():
                return False
            if m.num_batches_tracked is not self._counter:
                return False
        return True

    # --- forward ----------------------------------------------------------------------------------------
    def _channel_index(self, device, cp):
        """channel -> edge index of every group's stacked channels, the groups one after the other (one gather of
        the per-op scales for the whole cell, split per group: one kernel each way instead of one per group)."""
        key = (device, "channels", cp)
        idx = self._index.get(key)
        if idx is None:
            edges = torch.tensor([e for g in self.groups for e in g.edges], dtype=torch.long)
            idx = edges.repeat_interleave(cp).to(device)
            self._index[key] = idx
        return idx

    def forward(self, cell, s0, s1, weights, edge_weights):
        """The eager bookkeeping (shared BN buffers still in place? the cell's BN counter; the channel -> edge
        index per group), then `compute`: the tensor work, which `compile()` may replace by a compiled copy."""
        if not self._buffers_intact(cell):
            self._alias(cell)
        if cell.training:
            with torch.no_grad():
                self._counter.add_(1)
        cp = cell.preprocess1[-1].num_features // cell._ops[0].k
        index = [self._channel_index(s1.device, cp)]
        fused = _fused_members(OPTIONS["fuse"])
        if OPTIONS["pack"] not in (True, False):
            raise ValueError(f"batched_cell.OPTIONS['pack'] = {OPTIONS['pack']!r}: True or False")
        w = cell.preprocess1[1].weight
        wdt = pack_dtype(w, s1.device.type) if OPTIONS["pack"] else None  # the packed weights' dtype if cast
        if _dense_pointwise(s1.device) or fused:  # eye(n) to mask block-diagonal weights, n = edges (x ops)
            dt = wdt or w.dtype  # the weights' dtype at the 1x1 convs (no cast of the mask at each use)
            sizes = {len(g.edges) * m for g in self.groups for m in ((1, 2, len(fused[0])) if fused else (1,))}
            index.append({n: self._eye(s1.device, dt, n) for n in sizes})
            if fused:  # the fused 1x1 conv's input channels: (channel, op) interleaved -> op-major
                for g in self.groups:
                    index[-1][("perm", len(g.edges))] = self._perm(s1.device, len(fused[0]), len(g.edges) * cp)
        if OPTIONS["streams"] != "off" and s1.is_cuda:  # created here, not in the middle of a graph capture
            _side_streams(s1.device, len(PRIMITIVES))
        pack = None
        if OPTIONS["pack"]:
            key = ("pack", s1.device, _dense_pointwise(s1.device), OPTIONS["fuse"])
            if key not in self._index:
                self._index[key] = PackPlan(cell, self.groups, key[2], fused, s1.device)
            zkey = ("zero", s1.device, w.dtype)
            if zkey not in self._index:
                self._index[zkey] = torch.zeros(1, dtype=w.dtype, device=s1.device)
            pack = (self._index[key], self._index[zkey])
        fn = self._compiled or BatchedCellRunner._compute
        return fn(self, cell, s0, s1, weights, edge_weights, index, pack, wdt)

    def _eye(self, device, dtype, n):
        key = ("eye", device, dtype, n)
        if key not in self._index:
            self._index[key] = torch.eye(n, dtype=dtype, device=device)
        return self._index[key]

    def _perm(self, device, n, c):
        key = ("perm", device, n, c)
        if key not in self._index:  # perm[ch * n + m] = m * c + ch
            self._index[key] = torch.arange(n * c).view(n, c).t().reshape(-1).to(device)
        return self._index[key]

    def compile(self, **options) -> None:
        """Run the tensor work through torch.compile (the cell's `--compile`); the bookkeeping stays eager. The
        unbound function is compiled and called with this runner, so a deep copy of the model computes with its
        own buffers (a compiled bound method would keep the original's)."""
        self._compiled = torch.compile(BatchedCellRunner._compute, **options)

    def _compute(self, cell, s0, s1, weights, edge_weights, index, pack=None, pack_dt=None):
        """The cell's tensor work. `pack`: (PackPlan, a zero) to take the conv weights from one weight_pack
        (OPTIONS["pack"]), None: each grouped conv concatenates its own."""
        states = [cell.preprocess0(s0), cell.preprocess1(s1)]
        packed = None if pack is None else (weight_pack(cell, self.groups, pack[0], pack[1], pack_dt), pack[0].dense)
        k = cell._ops[0].k
        cp = states[0].shape[1] // k
        nhwc = _is_nhwc(states[1])
        # per-op scale of every edge: softmax(alpha) * edge-normalized beta, as (ops, edges) for column gathers;
        # without "none" (it contributes zeros: its column would only cost a zero-filled gradient per group)
        scales = (weights[:, 1:] * edge_weights[:, None]).t()
        # in the activations' dtype (one cast): under CUDA autocast the addcmul of _assemble promotes to its widest
        # input, and float32 edge weights made every node state, the cell outputs and the ops reading them float32
        # in bf16 runs (plus a cast before each convolution); benchmarks/cuda_autocast.py shows it on the CPU
        beta_vec = edge_weights.to(states[1].dtype)
        betas = beta_vec.unbind(0)
        mixed = [[] for _ in range(cell._steps)]
        # per state: the partial channels the ops see, the bypassed rest (split, not sliced: one backward cat)
        heads, rests = [], []

        def split(state, stride):
            if k == 1:
                heads.append(state)
                return
            head, rest = state.split([cp, state.shape[1] - cp], dim=1)
            heads.append(head)
            rest = _pool(cell._ops[0].mp, rest) if stride != 1 else rest
            # read by the nodes after it (the cell's inputs: all), each times its edge's beta, as (K-1, cp) channel
            # groups (views: N, H, W, K-1, cp for NHWC, else N, K-1, cp, H, W), so the shuffle in _assemble needs
            # no reshape of their gradient (which would copy it). With OPTIONS["sums"] one alias per node, the
            # nodes hand back their gradients unscaled and one kernel computes sum_i beta_i * g_i (else torch's
            # multiplies, and one kernel for their sum where it runs)
            j = len(rests)
            nodes = range(max(0, j - 1), cell._steps)
            view = (lambda t: t.permute(0, 2, 3, 1).unflatten(3, (k - 1, cp))) if nhwc else \
                (lambda t: t.unflatten(1, (k - 1, cp)))
            scaled = _scaled_fan_out(view(rest), beta_vec, [edge_offset(i) + j for i in nodes]) if nodes else None
            if scaled is not None:
                rests.append({i: (a, True) for i, a in zip(nodes, scaled)})
            else:
                rests.append({i: (view(a), False) for i, a in _fan_out(rest, nodes).items()})

        # (ops, E * cp) per group: every channel's per-op scale
        sizes = [len(g.edges) * cp for g in self.groups]
        channel_scales = scales.index_select(1, index[0])
        group_scales = channel_scales.split(sizes, dim=1)
        # under autocast: the identity's scales in the activations' dtype, cast once for the cell, not per group
        act = states[1].dtype
        skip_scales = channel_scales[_SKIP_ROW].to(act).split(sizes) if act != scales.dtype else [None] * len(sizes)
        aux = index[1] if len(index) > 1 else None
        for gi, group in enumerate(self.groups):
            if gi == 0:
                split(states[0], group.stride)
                split(states[1], group.stride)
            rep = group.repeats if OPTIONS["dedup"] else 1
            distinct = [heads[j] for j in group.inputs[:len(group.inputs) // group.repeats]]
            X = torch.cat(distinct, dim=1) if len(distinct) > 1 else distinct[0]
            if group.repeats > rep:  # the edges' stacked inputs: the distinct ones repeated, one copy (its backward
                X = _repeat_channels(X, group.repeats)  # one sum, not an add per repeat as a cat's would be)
            Y = self._mixed(cell, gi, group, X, group_scales[gi], cell.training, aux, rep, packed, skip_scales[gi])
            if nhwc and OPTIONS["cl_grads"]:
                Y = _ChannelsLastGrad.apply(Y)
            if gi == 0:  # edges ordered (node, input 0/1): sum each node's two (dtype=: CUDA autocast would
                # otherwise run the sum in float32, and every state after it: see betas)
                for i, p in enumerate(Y.unflatten(1, (cell._steps, 2, cp)).sum(2, dtype=Y.dtype).unbind(1)):
                    mixed[i].append(p)
            else:  # unbind, not indexing: its backward is one stack, not a zero-filled copy per slice
                for node, p in zip(group.nodes, Y.unflatten(1, (len(group.edges), cp)).unbind(1)):
                    mixed[node].append(p)
            # node gi has all its incoming edges in groups 0..gi: complete now
            states.append(self._assemble(mixed[gi], rests, betas, gi, k, cp, nhwc))
            split(states[-1], 1)
        return torch.cat(states[-cell._multiplier:], dim=1)

    @staticmethod
    def _assemble(parts, rests, betas, node, k, cp, nhwc):
        m = _add_all(parts)
        if k == 1:
            return m.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        off = edge_offset(node)
        n, _, h, w = m.shape
        xs, deferred = zip(*(rests[j].pop(node) for j in range(2 + node)))  # (K-1, cp) channel-group views
        r = _WeightedSum.apply(len(xs), deferred, *betas[off:off + 2 + node], *xs)
        # shuffle(cat(mixed, rest)) with K groups: output channel c*K + g <- channel c of group g
        if nhwc:
            mm = m.permute(0, 2, 3, 1).unsqueeze(4)
            return torch.cat([mm, r.transpose(3, 4)], dim=4).reshape(n, h, w, cp * k).permute(0, 3, 1, 2)
        out = torch.cat([m.unsqueeze(2), r.transpose(1, 2)], dim=2)
        return out.reshape(n, cp * k, h, w)

    def _mixed(self, cell, gi, group, X, sc, training, aux=None, rep=1, packed=None, skip_scale=None):
        """sum over ops of scale * op(X) for every edge of the group at once: (N, E * cp, H', W'). `aux`: eye(n)
        per size n (the 1x1 convolutions with block-diagonal dense weights: OPTIONS["pointwise"], "fuse") and the
        fused 1x1 conv's input permutation. rep > 1: X holds the distinct inputs only, and the edges' stacked input
        is X repeated rep times along the channels (OPTIONS["dedup"]). `packed`: the stacked conv weights
        (weight_pack) and the keys among them already block-diagonal; None: concatenated here, conv by conv.
        `skip_scale`: sc's skip_connect row in X's dtype (None: cast here)."""
        ops = [cell._ops[e]._ops for e in group.edges]
        E = len(group.edges)
        cp = X.shape[1] * rep // E
        eyes = aux if _dense_pointwise(X.device) else None
        fused = _fused_members(OPTIONS["fuse"])
        todo = list(zip(PRIMITIVES[1:], sc.unbind(0)))  # sc has no row for "none" (zeros: nothing to add)
        # X and its ReLU are read by several ops: with OPTIONS["sums"] each reader gets its own alias, whose
        # gradients one kernel sums (else autograd's pairwise adds)
        x_readers = ["relu"] + [p for p, _ in todo if p in _POOLS or (p == "skip_connect" and group.stride == 1)]
        r_readers = [p for p, _ in todo if (p in _SEP + _DIL and not (fused and p in fused[0]))
                     or (p == "skip_connect" and group.stride != 1)] + (["fused"] if fused else [])
        xin = _fan_out(X, x_readers)

        def weight(primitive, index, attr=None):
            if packed is not None:
                return packed[0][(gi, primitive, index if attr is None else attr)]
            mods = [o[_IDX[primitive]][index] if attr is None else getattr(o[_IDX[primitive]], attr) for o in ops]
            return torch.cat([m.weight for m in mods], dim=0) if E > 1 else mods[0].weight

        def bn(y, primitive, slot, scale):
            m, rm, rv, *whole = self._shared[(gi, primitive, slot)]
            if whole:  # the first slot of a fused set: one batch_norm over the whole set's channels
                rm, rv = whole
            if scale is not None and scale.dtype != rm.dtype:  # under autocast: float32 like the running stats
                scale = scale.to(rm.dtype)  # (a bf16 input with float32 parameters is batch_norm's mixed mode)
            return F.batch_norm(y, rm, rv, scale, None, training, m.momentum, m.eps)

        def conv(y, primitive, index, groups):
            c = ops[0][_IDX[primitive]][index]
            w, dilation = weight(primitive, index), c.dilation
            if packed is not None and (gi, primitive, index) in packed[1]:  # block-diagonal already
                groups = 1
            elif eyes is not None and groups == E > 1 and tuple(c.kernel_size) == (1, 1):
                w, groups = _block_diagonal(w, eyes[E]), 1
            if groups == w.shape[0] > 1 and _triton_depthwise(y):  # dilation native, any kernel size
                return depthwise.depthwise_conv2d(y, w, c.stride, c.padding, dilation, OPTIONS["depthwise"])
            if tuple(dilation) != (1, 1) and _undilate(primitive):
                w, dilation = _dilate_weight(w, dilation), 1
            return F.conv2d(y, w, None, c.stride, c.padding, dilation, groups)

        def bn_repeated(y, primitive, slot, scale):
            """bn() of y repeated rep times along the channels: batch statistics once, each edge's running
            statistics updated with them (training), or each edge's own statistics (eval)."""
            m, rm, rv, *_ = self._shared[(gi, primitive, slot)]
            if training:
                yn = F.batch_norm(y, None, None, None, None, True, 0.0, m.eps)
                with torch.no_grad():  # as batch_norm updates them: unbiased variance, exponential average
                    var, mean = torch.var_mean(y.detach().to(rm.dtype), dim=(0, 2, 3), correction=1)
                    rm.lerp_(mean.repeat(rep), m.momentum)
                    rv.lerp_(var.repeat(rep), m.momentum)
                if yn.dtype != scale.dtype:  # autocast: scaled in float32 like batch_norm's mixed mode (and the
                    return _repeat_channels(yn, rep, scale).to(yn.dtype)  # scale's gradient reduced in float32)
                return _repeat_channels(yn, rep, scale)
            a = scale * torch.rsqrt(rv + m.eps)
            return _repeat_channels(y, rep, a.to(y.dtype), (-rm * a).to(y.dtype))

        R = F.relu(xin["relu"]) if rep == 1 else _repeat_channels(F.relu(xin["relu"]), rep)
        rin = _fan_out(R, r_readers)

        def branch(primitive, s):
            if primitive in _POOLS:
                pooled = _pool(ops[0][_IDX[primitive]][0], xin[primitive])
                if rep > 1:
                    return bn_repeated(pooled, primitive, "pool", s)
                return bn(pooled, primitive, "pool", s)
            if primitive == "skip_connect":
                if group.stride == 1:
                    s = skip_scale if skip_scale is not None else s.to(X.dtype)
                    if rep > 1:
                        return _repeat_channels(xin[primitive], rep, s)
                    return xin[primitive] * s[None, :, None, None]
                w1, w2 = weight(primitive, None, "conv_1"), weight(primitive, None, "conv_2")
                dense = packed is not None and (gi, primitive, "conv_1") in packed[1]  # block-diagonal already
                return bn(_factorized_reduce(rin[primitive], w1, w2, E, eyes, dense), primitive, "fr", s)
            if primitive in _SEP:  # relu, dw, pw, BN, relu, dw, pw, BN
                y = conv(conv(rin[primitive], primitive, 1, E * cp), primitive, 2, E)
                y = F.relu(bn(y, primitive, "mid", None))
                y = conv(conv(y, primitive, 5, E * cp), primitive, 6, E)
                return bn(y, primitive, "last", s)
            y = conv(conv(rin[primitive], primitive, 1, E * cp), primitive, 2, E)  # dilated: relu, dw, pw, BN
            return bn(y, primitive, "last", s)

        def fused_chain(scales):
            """The fused ops (OPTIONS["fuse"]): relu, one depthwise conv with n filters per channel, one 1x1 conv,
            one BN (the dilated convs end here), relu, one depthwise conv, one 1x1 conv, one BN (separable)."""
            members, k = fused
            n, c = len(members), E * cp
            first = ops[0][_IDX[members[0]]][1]
            w = []
            for primitive in members:
                wi = weight(primitive, 1)
                dilation = ops[0][_IDX[primitive]][1].dilation
                w.append(_pad_kernel(_dilate_weight(wi, dilation) if tuple(dilation) != (1, 1) else wi, k))
            # output channel ch * n + m: filter m of channel ch (a depthwise conv's channel multiplier)
            y = F.conv2d(rin["fused"], torch.stack(w, dim=1).flatten(0, 1), None, first.stride, k // 2, 1, c)
            # one 1x1 conv: block-diagonal over (op, edge), op-major outputs, inputs in the interleaved order
            w = _block_diagonal(torch.cat([weight(p, 2) for p in members]), aux[n * E])
            y = F.conv2d(y, w.index_select(1, aux[("perm", E)]))
            ones = scales[members[0]].new_ones(2 * c)
            y = bn(y, members[0], "mid", torch.cat([ones] + [scales[p] for p in members[2:]]))
            sep, *dil = y.split([2 * c] + [c] * (n - 2), dim=1)
            # the separable convs' second halves: one 5x5 depthwise conv, one 1x1 conv, one BN
            w, sep = torch.cat([_pad_kernel(weight(p, 5), 5) for p in _SEP]), F.relu(sep)
            y = depthwise.depthwise_conv2d(sep, w, 1, 2, 1, OPTIONS["depthwise"]) if _triton_depthwise(sep) else \
                F.conv2d(sep, w, None, 1, 2, 1, 2 * c)
            w = torch.cat([weight(p, 6) for p in _SEP])
            y = F.conv2d(y, _block_diagonal(w, eyes[2 * E]), None) if eyes is not None else \
                F.conv2d(y, w, None, 1, 0, 1, 2 * E)
            a, b = bn(y, _SEP[0], "last", torch.cat([scales[p] for p in _SEP])).split(c, dim=1)
            return _add_all([a, b, *dil])

        jobs = [lambda p=p, s=s: branch(p, s) for p, s in todo if not fused or p not in fused[0]]
        if fused:
            jobs.append(lambda: fused_chain(dict(todo)))
        if _use_streams(X):  # every main-stream tensor the jobs read (or save for their backward) is recorded:
            # the weight pack and the cast skip scales too, or their blocks could go to a main-stream allocation
            # while a side stream's kernel still reads them (no edge between the two in a captured graph)
            shared = [X, R, sc] + [t for t in (skip_scale,) if t is not None]
            if packed is not None:
                shared.append(next(iter(packed[0].values())))  # all views of one tensor: one record covers it
            out = _on_side_streams(jobs, shared)
        else:
            out = [job() for job in jobs]
        return _add_all(out)


def _use_streams(x: torch.Tensor) -> bool:
    mode = OPTIONS["streams"]
    if mode not in ("off", "capture", "on"):
        raise ValueError(f"batched_cell.OPTIONS['streams'] = {mode!r}: off, capture or on")
    if mode == "off" or not x.is_cuda or torch.compiler.is_compiling():
        return False
    if mode == "on":
        return True
    with torch.cuda.device(x.device):
        return torch.cuda.is_current_stream_capturing()


def _side_streams(device, n):
    streams = _SIDE_STREAMS.setdefault(torch.device(device).index, [])
    while len(streams) < n:
        streams.append(torch.cuda.Stream(device=device))
    return streams


def _on_side_streams(fns, inputs):
    """fns() each on its own side stream, forked from the current stream after `inputs` are ready and joined back
    before the results are used. The caching allocator is told which streams use which blocks (record_stream), so
    no block is reused while another stream may still read it; autograd runs each op's backward on the op's stream
    and synchronizes the streams it joins."""
    main = torch.cuda.current_stream(inputs[0].device)
    streams = _side_streams(main.device, len(fns))
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


def _repeat_channels(x, rep, scale=None, shift=None):
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


def _triton_sums(x) -> bool:
    mode = OPTIONS["sums"]
    if mode not in ("torch", "triton"):
        raise ValueError(f"batched_cell.OPTIONS['sums'] = {mode!r}: torch or triton")
    return mode == "triton" and sums.runs_on(x)


def _add_all(xs):
    """xs[0] + xs[1] + ...: one kernel with OPTIONS["sums"] (where it runs), else torch's adds in that order."""
    return sums.add_all(xs) if _triton_sums(xs[0]) else sums._pairwise(xs)


def _fan_out(x, readers) -> dict:
    """{reader: x}, as aliases whose gradients one kernel sums with OPTIONS["sums"] (where it runs)."""
    return sums.fan_out(x, readers) if _triton_sums(x) else dict.fromkeys(readers, x)


def _scaled_fan_out(x, w, idx):
    """Aliases of x for the nodes that read it times w[idx[i]] and hand back their gradients unscaled, one kernel
    summing them (OPTIONS["sums"], where it runs); None: the nodes scale their own gradients."""
    return sums.scaled_fan_out(x, w, idx) if _triton_sums(x) else None


def _is_nhwc(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _triton_depthwise(x) -> bool:
    mode = OPTIONS["depthwise"]
    if mode not in ("cudnn", *depthwise.MODES):
        raise ValueError(f"batched_cell.OPTIONS['depthwise'] = {mode!r}: cudnn, {', '.join(depthwise.MODES)}")
    # is_compiling first: available() reads the storage offset, a graph break under dynamo
    return mode != "cudnn" and not torch.compiler.is_compiling() and _is_nhwc(x) and depthwise.available(x)


def _pool(mod, x):
    """mod(x) for a search cell's nn.MaxPool2d / nn.AvgPool2d (count_include_pad=False), as the Triton kernels
    where OPTIONS["pool"] says so and they can run (channel stride 1: channels_last runs; CUDA)."""
    mode = OPTIONS["pool"]
    if mode not in ("torch", "triton"):
        raise ValueError(f"batched_cell.OPTIONS['pool'] = {mode!r}: torch or triton")
    if mode == "torch" or torch.compiler.is_compiling() or x.dim() != 4 or x.stride(1) != 1 or \
            not pooling.available(x):  # (is_compiling before available(): its storage offset breaks a graph)
        return mod(x)
    if isinstance(mod, torch.nn.MaxPool2d) and mod.dilation in (1, (1, 1)) and not mod.return_indices:
        kind = "max"
    elif isinstance(mod, torch.nn.AvgPool2d) and not mod.count_include_pad and mod.divisor_override is None:
        kind = "avg"
    else:
        return mod(x)
    return pooling.pool2d(x, kind, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode)


def _dense_pointwise(device) -> bool:
    mode = OPTIONS["pointwise"]
    if mode not in ("auto", "dense", "grouped"):
        raise ValueError(f"batched_cell.OPTIONS['pointwise'] = {mode!r}: auto, dense or grouped")
    return mode == "dense" or (mode == "auto" and device.type == "cuda")


def _undilate(primitive: str) -> bool:
    mode = OPTIONS["dilated"]
    if mode not in ("native", "3x3", "all"):
        raise ValueError(f"batched_cell.OPTIONS['dilated'] = {mode!r}: native, 3x3 or all")
    return mode == "all" or (mode == "3x3" and primitive == "dil_conv_3x3")


def _dilate_weight(w, dilation):
    """A (C, 1, k, k) kernel with dilation d as the (C, 1, d(k-1)+1, ...) kernel with zeros between its taps: the
    same convolution (same padding and stride) without dilation; the zeros get no gradient."""
    dh, dw = dilation
    kh, kw = w.shape[2], w.shape[3]
    out = w.new_zeros(w.shape[0], w.shape[1], dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    out[:, :, ::dh, ::dw] = w
    return out


def _pad_kernel(w, k):
    """A (C, 1, kh, kw) kernel zero-padded around to (C, 1, k, k): the same convolution with padding k // 2."""
    p = (k - w.shape[-1]) // 2
    return F.pad(w, (p, p, p, p)) if p else w


def _block_diagonal(w, eye):
    """(E*co, ci, kh, kw) weights of E groups -> the (E*co, E*ci, kh, kw) dense weight with them on the diagonal
    and exact zeros elsewhere (a multiply by eye(E): one kernel, and its backward hands each edge its block)."""
    E = eye.shape[0]
    co, ci, kh, kw = w.shape[0] // E, w.shape[1], w.shape[2], w.shape[3]
    dense = w.view(E, co, 1, ci, kh, kw) * eye.to(w.dtype).view(E, 1, E, 1, 1, 1)
    return dense.reshape(E * co, E * ci, kh, kw)


class _WeightedSum(torch.autograd.Function):
    """sum_j b_j * x_j (0-dim b_j, same-shape x_j: a node's bypassed channels, its edges' betas times their inputs'
    rests), computed as autograd's mul/addcmul chain would. Its backward takes 3 ops a term, g * b_j and
    sum(g * x_j), where addcmul's took 5 (it multiplies x_j and b_j by addcmul's `value` 1 first, one of them a
    full-size multiply). x_j's gradient comes out contiguous in x_j's shape, so the reshape behind a view x_j
    needs no copy. `deferred[j]`: x_j is an alias from sums.scaled_fan_out, which scales the gradient itself: x_j
    gets g unscaled (no multiply, nothing written). With OPTIONS["sums"] the betas' gradients come from one kernel
    (sums.dots: g read once, no products written)."""

    @staticmethod
    def forward(ctx, n, deferred, *args):
        bs, xs = args[:n], args[n:]
        ctx.n, ctx.deferred = n, tuple(deferred)
        ctx.dots = _triton_sums(xs[0])  # the betas' gradients as one kernel (sums.dots), where it runs
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
        # the gradients this pass reaches (next_functions: bs then xs, no entry for n and deferred): the weight
        # step's backward (inputs = the weights) needs no beta's, each a full-size multiply and reduction; nor the
        # arch step the first cell's rests' (deferred ones: handed back as they are, for free, and the fan-out
        # computes nothing where its input is not needed)
        need = [depthwise._wanted(ctx, 2 + i, i) for i in range(2 * n)]
        # eager, no graph of this backward wanted (create_graph: out= is not differentiable)
        eager = type(g) is torch.Tensor and not torch.compiler.is_compiling() and not torch.is_grad_enabled()
        wanted = [j for j in range(n) if need[j]]
        gbs = [None] * n
        if ctx.dots and eager and wanted:  # g read once for all of them, no product written
            for j, d in zip(wanted, sums.dots(g, [xs[j] for j in wanted], bs[wanted[0]].dtype)):
                gbs[j] = d
        else:
            for j in wanted:
                gbs[j] = (g * xs[j]).sum()
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
        return (None, None, *gbs, *gxs)


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity; its backward returns the gradient channels_last (OPTIONS["cl_grads"])."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous(memory_format=torch.channels_last)


def _factorized_reduce(R, w1, w2, E, eyes=None, dense=False):
    """Every edge's FactorizedReduce (after its ReLU, before its BN) over the stacked inputs: two stride-2 1x1
    convs, the second on the input shifted by one pixel (odd sizes padded); each edge's two halves side by side.
    `eyes`: make the weights block-diagonal dense ones; `dense`: they are already."""
    shifted = R[:, :, 1:, 1:]
    if R.shape[-1] % 2 or R.shape[-2] % 2:
        shifted = F.pad(shifted, (0, R.shape[-1] % 2, 0, R.shape[-2] % 2))
    groups = 1 if dense else E
    if eyes is not None and E > 1 and not dense:
        w1, w2, groups = _block_diagonal(w1, eyes[E]), _block_diagonal(w2, eyes[E]), 1
    a = F.conv2d(R, w1, None, 2, 0, 1, groups)
    b = F.conv2d(shifted, w2, None, 2, 0, 1, groups)
    n, _, h, w = a.shape
    half = a.shape[1] // E
    if _is_nhwc(a):  # channels_last out, as the per-edge op's cat along the channels gives (a 5-d cat of the
        # channel views below would come out NCHW: its BN, the group's sum and their gradients in mixed layouts)
        ab = [t.permute(0, 2, 3, 1).unflatten(3, (E, half)) for t in (a, b)]
        return torch.cat(ab, dim=4).reshape(n, h, w, E * 2 * half).permute(0, 3, 1, 2)
    return torch.cat([a.unflatten(1, (E, half)), b.unflatten(1, (E, half))], dim=2).reshape(n, E * 2 * half, h, w)
