"""The PC-DARTS search supernet: partial-channel mixed ops with edge normalization.

Architecture parameters (`alphas_normal`, `alphas_reduce`: edges x ops; `betas_normal`, `betas_reduce`: edges)
are registered nn.Parameters so they broadcast, checkpoint and roll back with the module; they are exposed by
`arch_parameters()` and kept out of `weight_parameters()`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..space.genotypes import PRIMITIVES, Genotype
from ..space.ops import OPS, FactorizedReduce, ReLUConvBN, channel_shuffle
from .batched_cell import BatchedCellRunner, BatchedOptions

ARCH_PARAM_NAMES = ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce")


class MixedOp(nn.Module):
    """Partial-channel mixed op: the first C/K channels go through the softmax(alpha)-weighted candidate ops,
    the other channels bypass (max-pooled on stride-2 edges); concatenate, then shuffle with K groups."""

    def __init__(self, C: int, stride: int, k: int = 4):
        super().__init__()
        if C % k:
            raise ValueError(f"channels {C} must be divisible by the partial-channel K={k}")
        self.k = k
        self.stride = stride
        self.mp = nn.MaxPool2d(2, 2, ceil_mode=True)  # ceil: odd maps match the stride-2 ops
        self._ops = nn.ModuleList()
        for primitive in PRIMITIVES:
            op = OPS[primitive](C // k, stride, False)
            if "pool" in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(C // k, affine=False))
            self._ops.append(op)

    def forward(self, x, weights):
        dim = x.shape[1] // self.k
        xa, xb = x[:, :dim], x[:, dim:]
        mixed = sum(w * op(xa) for w, op in zip(weights, self._ops))
        if self.k == 1:  # every channel went through the ops (DARTS)
            return mixed
        if mixed.shape[2] != x.shape[2]:
            xb = self.mp(xb)
        return channel_shuffle(torch.cat([mixed, xb], dim=1), self.k)


class SearchCell(nn.Module):
    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, k=4,
                 batched_options=None):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier
        self.batched = False  # --batched-edges: models/batched_cell.py computes the same forward
        self.batched_options = batched_options or BatchedOptions()  # how it computes
        self._runner = None
        self._per_edge_compiled = None  # compile(): torch.compile(SearchCell._per_edge_forward)
        self._ops = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(MixedOp(C, stride, k))

    @property
    def runner(self) -> BatchedCellRunner:
        if self._runner is None:
            self._runner = BatchedCellRunner(self, self.batched_options)
        return self._runner

    def set_batched_options(self, options: BatchedOptions) -> None:
        self.batched_options = options
        if self._runner is not None:
            self._runner.set_options(options)

    def compile(self, **options) -> None:
        """torch.compile the cell's tensor work, per-edge and batched forward alike (`--compile`). Only the
        computation is compiled, not the module call, so the batched op's buffer bookkeeping stays eager."""
        self.runner.compile(**options)
        # the unbound function, called with self: a deep copy of the cell then computes with its own modules
        self._per_edge_compiled = torch.compile(SearchCell._per_edge_forward, **options)

    def forward(self, s0, s1, weights, edge_weights):
        if self.batched:
            return self.runner.forward(self, s0, s1, weights, edge_weights)
        fn = self._per_edge_compiled or SearchCell._per_edge_forward
        return fn(self, s0, s1, weights, edge_weights)

    def _per_edge_forward(self, s0, s1, weights, edge_weights):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            s = sum(edge_weights[offset + j] * self._ops[offset + j](h, weights[offset + j])
                    for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier:], dim=1)


def num_edges(steps: int) -> int:
    return sum(2 + i for i in range(steps))


def edge_softmax(betas: torch.Tensor, steps: int) -> torch.Tensor:
    """Edge normalization: softmax over each intermediate node's incoming edges, concatenated."""
    parts, start = [], 0
    for i in range(steps):
        n = 2 + i
        parts.append(F.softmax(betas[start:start + n], dim=-1))
        start += n
    return torch.cat(parts, dim=0)


class SearchNetwork(nn.Module):
    """`SearchNetwork(C, num_classes, layers, steps=4, multiplier=4, stem_multiplier=3, partial_k=4,
    stem='cifar', batched_edges=False, batched_options=None)`. `stem='imagenet'` gives the three-conv stride-2 stem
    of the 224-px ImageNet search; `batched_edges=True` computes each cell with the batched mixed op
    (models/batched_cell.py: the same parameters and results, fewer and larger kernels), the way a
    `batched_options` (a BatchedOptions; default: BatchedOptions()) chooses."""

    def __init__(self, C, num_classes, layers, steps=4, multiplier=4, stem_multiplier=3, partial_k=4,
                 stem="cifar", arch_init_scale=1e-3, batched_edges=False, batched_options=None):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if batched_options is not None and not isinstance(batched_options, BatchedOptions):
            raise TypeError(f"batched_options must be a BatchedOptions, got {type(batched_options).__name__}")
        self._C, self._num_classes, self._layers = C, num_classes, layers
        self._steps, self._multiplier, self.partial_k, self.stem_type = steps, multiplier, partial_k, stem
        if stem == "cifar":
            C_curr = stem_multiplier * C
            self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
            C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
            reduction_prev = False
        else:
            self.stem0 = nn.Sequential(
                nn.Conv2d(3, C // 2, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(C // 2, C, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C),
            )
            self.stem1 = nn.Sequential(
                nn.ReLU(inplace=True),
                nn.Conv2d(C, C, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C),
            )
            C_prev_prev, C_prev, C_curr = C, C, C
            reduction_prev = True
        self.cells = nn.ModuleList()
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, partial_k,
                              batched_options)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        k, n_ops = num_edges(steps), len(PRIMITIVES)
        self.alphas_normal = nn.Parameter(arch_init_scale * torch.randn(k, n_ops))
        self.alphas_reduce = nn.Parameter(arch_init_scale * torch.randn(k, n_ops))
        self.betas_normal = nn.Parameter(arch_init_scale * torch.randn(k))
        self.betas_reduce = nn.Parameter(arch_init_scale * torch.randn(k))
        self.set_batched_edges(batched_edges)

    def set_batched_edges(self, on: bool = True) -> "SearchNetwork":
        """Switch every cell between the per-edge forward (the reference) and the batched mixed op."""
        for cell in self.cells:
            cell.batched = bool(on)
        return self

    def set_batched_options(self, options: BatchedOptions) -> "SearchNetwork":
        """How every cell's batched mixed op computes from the next forward on (a BatchedOptions)."""
        if not isinstance(options, BatchedOptions):
            raise TypeError(f"batched options must be a BatchedOptions, got {type(options).__name__}")
        for cell in self.cells:
            cell.set_batched_options(options)
        return self

    # --- parameter groups -------------------------------------------------------------------------------
    def arch_parameters(self):
        return [getattr(self, n) for n in ARCH_PARAM_NAMES]

    def named_arch_parameters(self):
        return [(n, getattr(self, n)) for n in ARCH_PARAM_NAMES]

    def named_weight_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if n not in ARCH_PARAM_NAMES]

    def weight_parameters(self):
        return [p for _, p in self.named_weight_parameters()]

    # --- forward ---------------------------------------------------------------------------------------
    def forward(self, x):
        if self.stem_type == "cifar":
            s0 = s1 = self.stem(x)
        else:
            s0 = self.stem0(x)
            s1 = self.stem1(s0)
        w_normal = F.softmax(self.alphas_normal, dim=-1)
        w_reduce = F.softmax(self.alphas_reduce, dim=-1)
        e_normal = edge_softmax(self.betas_normal, self._steps)
        e_reduce = edge_softmax(self.betas_reduce, self._steps)
        for cell in self.cells:
            if cell.reduction:
                s0, s1 = s1, cell(s0, s1, w_reduce, e_reduce)
            else:
                s0, s1 = s1, cell(s0, s1, w_normal, e_normal)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))

    # --- the derived cell --------------------------------------------------------------------------------
    def genotype(self, skip_cap: int | None = None) -> Genotype:
        """The derived cells (`derive_genotype`); `skip_cap` applies to the normal cell."""
        return derive_genotype({n: getattr(self, n) for n in ARCH_PARAM_NAMES}, self._steps, skip_cap,
                               self._multiplier)

    def arch_state(self) -> dict:
        """Raw (unnormalized) architecture parameters as nested lists, for genotype.json and metrics."""
        return {n: getattr(self, n).detach().cpu().double().tolist() for n in ARCH_PARAM_NAMES}


def derive_genotype(arch: dict, steps: int, skip_cap: int | None = None, multiplier: int | None = None) -> Genotype:
    """Both cells derived (`derive_cell`) from `arch` (ARCH_PARAM_NAMES -> tensor), `skip_cap` on the normal cell;
    a cell's output concatenates its last `multiplier` intermediate nodes (default: all `steps`)."""
    multiplier = steps if multiplier is None else multiplier
    normal = derive_cell(arch["alphas_normal"], arch["betas_normal"], steps, skip_cap)
    reduce = derive_cell(arch["alphas_reduce"], arch["betas_reduce"], steps)
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal=normal, normal_concat=concat, reduce=reduce, reduce_concat=concat)


def derive_cell(alphas: torch.Tensor, betas: torch.Tensor, steps: int, skip_cap: int | None = None):
    """PC-DARTS derivation: per node, weight each incoming edge's op probabilities softmax(alpha) by the node's
    edge-normalized softmax(beta); keep the two edges with the largest non-`none` value; take each kept edge's
    best non-`none` op. Ties resolve to the lower index, as Python's stable sort does in the original.

    `skip_cap` (P-DARTS, Chen et al. 2019): at most that many `skip_connect` in the cell, the strongest ones (ties:
    the earlier edge); every other edge that chose it takes its best op other than `none` and `skip_connect`. The
    edges stay those chosen above."""
    W = F.softmax(alphas.detach().double().cpu(), dim=-1)
    E = edge_softmax(betas.detach().double().cpu(), steps)
    none, skip = PRIMITIVES.index("none"), PRIMITIVES.index("skip_connect")

    def best(w_row, banned):
        return max((k for k in range(len(w_row)) if k not in banned), key=lambda k: (float(w_row[k]), -k))

    gene, rows, start = [], [], 0
    for i in range(steps):
        n = 2 + i
        w = W[start:start + n] * E[start:start + n, None]
        strength = [max(float(w[j, k]) for k in range(w.shape[1]) if k != none) for j in range(n)]
        for j in sorted(range(n), key=lambda j: -strength[j])[:2]:
            gene.append((PRIMITIVES[best(w[j], {none})], j))
            rows.append(w[j])
        start += n
    if skip_cap is not None:
        skips = [i for i, (op, _) in enumerate(gene) if op == "skip_connect"]
        kept = set(sorted(skips, key=lambda i: (-float(rows[i][skip]), i))[:skip_cap])
        gene = [(PRIMITIVES[best(rows[i], {none, skip})], j) if i in skips and i not in kept else (op, j)
                for i, (op, j) in enumerate(gene)]
    return gene
