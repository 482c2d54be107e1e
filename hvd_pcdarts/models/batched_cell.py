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
step's graph (weight pack, `batched_ops.WeightedSum`, repeated inputs as one copy); tests/test_batched.py checks
equality in float64, benchmarks/search_step.py measures the speed, benchmarks/step_traffic.py counts the ops and
bytes.

How it computes is a BatchedOptions (models/batched_options.py) handed to the network. The groups: models/
batched_plan.py; the autograd Functions, stacked FactorizedReduce and side streams: models/batched_ops.py; the
weight pack: models/weight_pack.py. The untimed choices (dedup, dilated, fuse and the Triton kernels) are in
experimental/batched_variants.py, imported only when an option asks for one of them.
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F

from ..space.genotypes import PRIMITIVES
from . import batched_ops as bo
from .batched_options import BatchedOptions
from .batched_plan import SLOTS as _SLOTS
from .batched_plan import Group, bn_slots, edge_offset, plan
from .weight_pack import DIL as _DIL
from .weight_pack import SEP as _SEP
from .weight_pack import PackPlan, pack_dtype, weight_pack

__all__ = ["BatchedCellRunner", "BatchedOptions", "Group", "bn_slots", "edge_offset", "plan"]

_IDX = {name: i for i, name in enumerate(PRIMITIVES)}
_POOLS = ("max_pool_3x3", "avg_pool_3x3")
_SKIP_ROW = PRIMITIVES.index("skip_connect") - 1  # its row in the per-op scales (which leave out "none")


def _variants():
    """experimental/batched_variants.py, imported when an option asks for it."""
    from ..experimental import batched_variants

    return batched_variants


# One group's ops in a forward (BatchedCellRunner._mixed): `ops` the edges' ModuleLists, E edges, cp channels per
# edge, `eyes` eye(n) per size n where the 1x1 convs take block-diagonal dense weights (else None), `aux` those and
# the fused chain's permutations, `packed` the weight pack and its block-diagonal keys (or None), rep > 1: the
# group's distinct inputs only (dedup), `skip_scale` the identity's scales in the activations' dtype (or None),
# `xin` / `rin` the readers' aliases of the input and of its ReLU
_GroupOps = collections.namedtuple("_GroupOps", "gi group ops E cp training eyes aux packed rep skip_scale xin rin")


class BatchedCellRunner:
    """The batched forward of one SearchCell, with the plan and the shared BN buffers it keeps; `options`: a
    BatchedOptions (default: BatchedOptions())."""

    def __init__(self, cell, options: BatchedOptions | None = None):
        self.groups = plan(cell._steps, cell.reduction)
        # {(group, primitive, slot): (first module, running_mean, running_var[, the whole set's mean, var])}
        self._shared = None
        self._layout = None  # options.fuse the buffers were shared for
        self._counter = None
        self._index = {}  # (device, group, channels per edge) -> channel -> edge index
        self._compiled = None  # torch.compile(BatchedCellRunner._compute) after compile()
        self.set_options(options or BatchedOptions())

    def set_options(self, options: BatchedOptions) -> None:
        """Compute with `options` from the next forward on (the BN buffers are shared anew if `fuse` changed)."""
        if not isinstance(options, BatchedOptions):
            raise TypeError(f"batched options must be a BatchedOptions, got {type(options).__name__}")
        self.options = options
        # (primitives of the fused first stage, their kernel size), or None
        self._fused = _variants().fused_members(options.fuse) if options.fuse != "off" else None

    # --- shared BN buffers ------------------------------------------------------------------------------
    def _bns(self, cell, group, primitive, slot):
        return [_SLOTS[slot](cell._ops[e]._ops[_IDX[primitive]]) for e in group.edges]

    def _buffer_sets(self, stride):
        """The BN slots of one edge as the sets whose running statistics are one tensor per group: one set per
        slot (the fused chain's sets: experimental/batched_variants.buffer_sets)."""
        if self._fused is None:
            return [[slot] for slot in bn_slots(stride)]
        return _variants().buffer_sets(bn_slots(stride), self._fused)

    def _alias(self, cell):
        shared, counter, self._layout = {}, None, self.options.fuse
        for gi, group in enumerate(self.groups):
            for members in self._buffer_sets(group.stride):
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
        if self._shared is None or self._layout != self.options.fuse:
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
        opts, fused, device = self.options, self._fused, s1.device
        cp = cell.preprocess1[-1].num_features // cell._ops[0].k
        index = [self._channel_index(device, cp)]
        w = cell.preprocess1[1].weight
        wdt = pack_dtype(w, device.type) if opts.pack else None  # the packed weights' dtype if cast
        if self._dense_pointwise(device) or fused:  # eye(n) to mask block-diagonal weights, n = edges (x ops)
            dt = wdt or w.dtype  # the weights' dtype at the 1x1 convs (no cast of the mask at each use)
            sizes = {len(g.edges) * m for g in self.groups for m in ((1, 2, len(fused[0])) if fused else (1,))}
            index.append({n: self._eye(device, dt, n) for n in sizes})
            if fused:  # the fused 1x1 conv's input channels: (channel, op) interleaved -> op-major
                _variants().add_permutations(index[-1], self._index, self.groups, len(fused[0]), cp, device)
        if opts.streams != "off" and s1.is_cuda:  # created here, not in the middle of a graph capture
            bo.side_streams(device, len(PRIMITIVES))
        pack = self._pack(cell, device, w.dtype) if opts.pack else None
        fn = self._compiled or BatchedCellRunner._compute
        return fn(self, cell, s0, s1, weights, edge_weights, index, pack, wdt)

    def _pack(self, cell, device, dtype):
        """(the cell's PackPlan, a one-element zero of the weights' dtype), cached per device and choice."""
        key = ("pack", device, self._dense_pointwise(device), self.options.fuse)
        if key not in self._index:
            stacked = _variants().fused_stacked_1x1(self._fused) if self._fused else None
            self._index[key] = PackPlan(cell, self.groups, key[2], device, stacked)
        zkey = ("zero", device, dtype)
        if zkey not in self._index:
            self._index[zkey] = torch.zeros(1, dtype=dtype, device=device)
        return self._index[key], self._index[zkey]

    def _eye(self, device, dtype, n):
        key = ("eye", device, dtype, n)
        if key not in self._index:
            self._index[key] = torch.eye(n, dtype=dtype, device=device)
        return self._index[key]

    def _dense_pointwise(self, device) -> bool:
        mode = self.options.pointwise
        return mode == "dense" or (mode == "auto" and device.type == "cuda")

    def compile(self, **options) -> None:
        """Run the tensor work through torch.compile (the cell's `--compile`); the bookkeeping stays eager. The
        unbound function is compiled and called with this runner, so a deep copy of the model computes with its
        own buffers (a compiled bound method would keep the original's)."""
        self._compiled = torch.compile(BatchedCellRunner._compute, **options)

    def _compute(self, cell, s0, s1, weights, edge_weights, index, pack=None, pack_dt=None):
        """The cell's tensor work. `pack`: (PackPlan, a zero) to take the conv weights from one weight_pack
        (options.pack), None: each grouped conv concatenates its own."""
        states = [cell.preprocess0(s0), cell.preprocess1(s1)]
        packed = None if pack is None else (weight_pack(cell, self.groups, pack[0], pack[1], pack_dt), pack[0].dense)
        k = cell._ops[0].k
        cp = states[0].shape[1] // k
        nhwc = bo.is_nhwc(states[1])
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
                self._split(cell, states[0], group.stride, beta_vec, heads, rests, nhwc)
                self._split(cell, states[1], group.stride, beta_vec, heads, rests, nhwc)
            Y = self._group(cell, gi, group, heads, group_scales[gi], aux, packed, skip_scales[gi], nhwc)
            if gi == 0:  # edges ordered (node, input 0/1): sum each node's two (dtype=: CUDA autocast would
                # otherwise run the sum in float32, and every state after it: see betas)
                for i, p in enumerate(Y.unflatten(1, (cell._steps, 2, cp)).sum(2, dtype=Y.dtype).unbind(1)):
                    mixed[i].append(p)
            else:  # unbind, not indexing: its backward is one stack, not a zero-filled copy per slice
                for node, p in zip(group.nodes, Y.unflatten(1, (len(group.edges), cp)).unbind(1)):
                    mixed[node].append(p)
            # node gi has all its incoming edges in groups 0..gi: complete now
            states.append(self._assemble(mixed[gi], rests, betas, gi, k, cp, nhwc))
            self._split(cell, states[-1], 1, beta_vec, heads, rests, nhwc)
        return torch.cat(states[-cell._multiplier:], dim=1)

    def _split(self, cell, state, stride, beta_vec, heads, rests, nhwc):
        """A state's partial channels (appended to `heads`) and its bypassed rest (max-pooled on stride-2 edges),
        read by the nodes after it (the cell's inputs: all), each times its edge's beta, as (K-1, cp) channel
        groups (views: N, H, W, K-1, cp for NHWC, else N, K-1, cp, H, W), so the shuffle in _assemble needs no
        reshape of their gradient (which would copy it): {node: (view, deferred)} appended to `rests`. With the
        Triton sums one alias per node, the nodes hand back their gradients unscaled and one kernel computes
        sum_i beta_i * g_i (deferred); else torch's multiplies."""
        k = cell._ops[0].k
        if k == 1:
            heads.append(state)
            return
        cp = state.shape[1] // k
        head, rest = state.split([cp, state.shape[1] - cp], dim=1)
        heads.append(head)
        rest = self._pool(cell._ops[0].mp, rest) if stride != 1 else rest
        j = len(rests)
        nodes = range(max(0, j - 1), cell._steps)
        view = (lambda t: t.permute(0, 2, 3, 1).unflatten(3, (k - 1, cp))) if nhwc else \
            (lambda t: t.unflatten(1, (k - 1, cp)))
        scaled = None
        if nodes and self.options.sums != "torch":
            scaled = _variants().scaled_fan_out(view(rest), beta_vec, [edge_offset(i) + j for i in nodes])
        if scaled is not None:
            rests.append({i: (a, True) for i, a in zip(nodes, scaled)})
        else:
            rests.append({i: (view(a), False) for i, a in self._fan_out(rest, nodes).items()})

    def _group(self, cell, gi, group, heads, sc, aux, packed, skip_scale, nhwc):
        """The group's mixed ops over its edges' stacked inputs: (N, E * cp, H', W')."""
        rep = group.repeats if self.options.dedup else 1
        distinct = [heads[j] for j in group.inputs[:len(group.inputs) // group.repeats]]
        X = torch.cat(distinct, dim=1) if len(distinct) > 1 else distinct[0]
        if group.repeats > rep:  # the edges' stacked inputs: the distinct ones repeated, one copy (its backward
            X = bo.repeat_channels(X, group.repeats)  # one sum, not an add per repeat as a cat's would be)
        Y = self._mixed(cell, gi, group, X, sc, cell.training, aux, rep, packed, skip_scale)
        if nhwc and self.options.cl_grads:
            Y = bo.ChannelsLastGrad.apply(Y)
        return Y

    def _assemble(self, parts, rests, betas, node, k, cp, nhwc):
        m = self._add_all(parts)
        if k == 1:
            return m.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        off = edge_offset(node)
        n, _, h, w = m.shape
        xs, deferred = zip(*(rests[j].pop(node) for j in range(2 + node)))  # (K-1, cp) channel-group views
        dots = self.options.sums != "torch" and _variants().sums_run_on(xs[0])
        r = bo.WeightedSum.apply(len(xs), deferred, dots, *betas[off:off + 2 + node], *xs)
        # shuffle(cat(mixed, rest)) with K groups: output channel c*K + g <- channel c of group g
        if nhwc:
            mm = m.permute(0, 2, 3, 1).unsqueeze(4)
            return torch.cat([mm, r.transpose(3, 4)], dim=4).reshape(n, h, w, cp * k).permute(0, 3, 1, 2)
        out = torch.cat([m.unsqueeze(2), r.transpose(1, 2)], dim=2)
        return out.reshape(n, cp * k, h, w)

    # --- the group's ops --------------------------------------------------------------------------------
    def _mixed(self, cell, gi, group, X, sc, training, aux=None, rep=1, packed=None, skip_scale=None):
        """sum over ops of scale * op(X) for every edge of the group at once: (N, E * cp, H', W'). `aux`: eye(n)
        per size n (the 1x1 convolutions with block-diagonal dense weights: options.pointwise, fuse) and the
        fused 1x1 conv's input permutation. rep > 1: X holds the distinct inputs only, and the edges' stacked input
        is X repeated rep times along the channels (dedup). `packed`: the stacked conv weights (weight_pack) and
        the keys among them already block-diagonal; None: concatenated here, conv by conv. `skip_scale`: sc's
        skip_connect row in X's dtype (None: cast here)."""
        E, fused = len(group.edges), self._fused
        todo = list(zip(PRIMITIVES[1:], sc.unbind(0)))  # sc has no row for "none" (zeros: nothing to add)
        # X and its ReLU are read by several ops: with the Triton sums each reader gets its own alias, whose
        # gradients one kernel sums (else autograd's pairwise adds)
        x_readers = ["relu"] + [p for p, _ in todo if p in _POOLS or (p == "skip_connect" and group.stride == 1)]
        r_readers = [p for p, _ in todo if (p in _SEP + _DIL and not (fused and p in fused[0]))
                     or (p == "skip_connect" and group.stride != 1)] + (["fused"] if fused else [])
        xin = self._fan_out(X, x_readers)
        R = F.relu(xin["relu"]) if rep == 1 else bo.repeat_channels(F.relu(xin["relu"]), rep)
        g = _GroupOps(gi, group, [cell._ops[e]._ops for e in group.edges], E, X.shape[1] * rep // E, training,
                      aux if self._dense_pointwise(X.device) else None, aux, packed, rep, skip_scale, xin,
                      self._fan_out(R, r_readers))
        jobs = [lambda p=p, s=s: self._branch(g, p, s) for p, s in todo if not fused or p not in fused[0]]
        if fused:
            jobs.append(lambda: _variants().fused_chain(self, g, dict(todo)))
        if bo.use_streams(X, self.options.streams):  # every main-stream tensor the jobs read (or save for their
            # backward) is recorded: the weight pack and the cast skip scales too, or their blocks could go to a
            # main-stream allocation while a side stream's kernel still reads them (no edge between the two in a
            # captured graph)
            shared = [X, R, sc] + [t for t in (skip_scale,) if t is not None]
            if packed is not None:
                shared.append(next(iter(packed[0].values())))  # all views of one tensor: one record covers it
            out = bo.on_side_streams(jobs, shared)
        else:
            out = [job() for job in jobs]
        return self._add_all(out)

    def _branch(self, g, primitive, s):
        """scale s times one primitive's op over the group's stacked edges."""
        if primitive in _POOLS:
            pooled = self._pool(g.ops[0][_IDX[primitive]][0], g.xin[primitive])
            if g.rep > 1:
                return _variants().bn_repeated(self._shared[(g.gi, primitive, "pool")], pooled, s, g.rep,
                                               g.training)
            return self._bn(g, pooled, primitive, "pool", s)
        if primitive == "skip_connect":
            if g.group.stride == 1:
                s = g.skip_scale if g.skip_scale is not None else s.to(g.xin[primitive].dtype)
                if g.rep > 1:
                    return bo.repeat_channels(g.xin[primitive], g.rep, s)
                return g.xin[primitive] * s[None, :, None, None]
            w1, w2 = self._weight(g, primitive, None, "conv_1"), self._weight(g, primitive, None, "conv_2")
            dense = g.packed is not None and (g.gi, primitive, "conv_1") in g.packed[1]  # block-diagonal already
            y = bo.factorized_reduce(g.rin[primitive], w1, w2, g.E, g.eyes, dense)
            return self._bn(g, y, primitive, "fr", s)
        if primitive in _SEP:  # relu, dw, pw, BN, relu, dw, pw, BN
            y = self._conv(g, self._conv(g, g.rin[primitive], primitive, 1, g.E * g.cp), primitive, 2, g.E)
            y = F.relu(self._bn(g, y, primitive, "mid", None))
            y = self._conv(g, self._conv(g, y, primitive, 5, g.E * g.cp), primitive, 6, g.E)
            return self._bn(g, y, primitive, "last", s)
        # dilated: relu, dw, pw, BN
        y = self._conv(g, self._conv(g, g.rin[primitive], primitive, 1, g.E * g.cp), primitive, 2, g.E)
        return self._bn(g, y, primitive, "last", s)

    def _weight(self, g, primitive, index, attr=None):
        """The group's edges' weights of one conv, stacked along the output channels."""
        if g.packed is not None:
            return g.packed[0][(g.gi, primitive, index if attr is None else attr)]
        mods = [o[_IDX[primitive]][index] if attr is None else getattr(o[_IDX[primitive]], attr) for o in g.ops]
        return torch.cat([m.weight for m in mods], dim=0) if g.E > 1 else mods[0].weight

    def _bn(self, g, y, primitive, slot, scale):
        m, rm, rv, *whole = self._shared[(g.gi, primitive, slot)]
        if whole:  # the first slot of a fused set: one batch_norm over the whole set's channels
            rm, rv = whole
        if scale is not None and scale.dtype != rm.dtype:  # under autocast: float32 like the running stats
            scale = scale.to(rm.dtype)  # (a bf16 input with float32 parameters is batch_norm's mixed mode)
        return F.batch_norm(y, rm, rv, scale, None, g.training, m.momentum, m.eps)

    def _conv(self, g, y, primitive, index, groups):
        c = g.ops[0][_IDX[primitive]][index]
        w, dilation = self._weight(g, primitive, index), c.dilation
        if g.packed is not None and (g.gi, primitive, index) in g.packed[1]:  # block-diagonal already
            groups = 1
        elif g.eyes is not None and groups == g.E > 1 and tuple(c.kernel_size) == (1, 1):
            w, groups = bo.block_diagonal(w, g.eyes[g.E]), 1
        opts = self.options
        if groups == w.shape[0] > 1 and opts.depthwise != "cudnn" and _variants().triton_depthwise(y):
            return _variants().depthwise_conv2d(y, w, c.stride, c.padding, dilation, opts.depthwise)
        if opts.dilated != "native" and tuple(dilation) != (1, 1) and _variants().undilate(primitive, opts.dilated):
            w, dilation = _variants().dilate_weight(w, dilation), 1
        return F.conv2d(y, w, None, c.stride, c.padding, dilation, groups)

    # --- the experimental choices, where one is made --------------------------------------------------------
    def _pool(self, mod, x):
        return mod(x) if self.options.pool == "torch" else _variants().pool(mod, x)

    def _add_all(self, xs):
        """xs[0] + xs[1] + ...: torch's adds in that order, or one kernel with the Triton sums (where it runs)."""
        return bo.add_chain(xs) if self.options.sums == "torch" else _variants().add_all(xs)

    def _fan_out(self, x, readers) -> dict:
        """{reader: x}, or aliases whose gradients one kernel sums with the Triton sums (where it runs)."""
        return dict.fromkeys(readers, x) if self.options.sums == "torch" else _variants().fan_out(x, readers)
