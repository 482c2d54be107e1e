"""Evaluation (retraining) networks built from a genotype: NetworkCIFAR and NetworkImageNet.

Constructor order as in DARTS: (C, num_classes, layers, auxiliary, genotype). `forward` returns
(logits, logits_aux); logits_aux is None unless training with the auxiliary head.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..space.genotypes import load_genotype
from ..space.ops import OPS, FactorizedReduce, Identity, ReLUConvBN, drop_path


class EvalCell(nn.Module):
    def __init__(self, genotype, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        edges = genotype.reduce if reduction else genotype.normal
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        op_names, indices = zip(*edges)
        self.reduction = reduction
        self._steps = len(op_names) // 2
        self._concat = list(concat)
        self.multiplier = len(self._concat)
        self._indices = list(indices)
        self._ops = nn.ModuleList(
            OPS[name](C, 2 if reduction and index < 2 else 1, True) for name, index in zip(op_names, indices)
        )

    def forward(self, s0, s1, drop_prob: float = 0.0):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self._steps):
            op1, op2 = self._ops[2 * i], self._ops[2 * i + 1]
            h1 = op1(states[self._indices[2 * i]])
            h2 = op2(states[self._indices[2 * i + 1]])
            if self.training and drop_prob > 0.0:
                if not isinstance(op1, Identity):
                    h1 = drop_path(h1, drop_prob)
                if not isinstance(op2, Identity):
                    h2 = drop_path(h2, drop_prob)
            states.append(h1 + h2)
        return torch.cat([states[i] for i in self._concat], dim=1)


def _aux_forward(head, x):
    x = nn.functional.relu(x)
    # The published pooling (5x5) needs maps of at least 5 px (8 px CIFAR, 14 px ImageNet); smaller inputs such
    # as the 16-px digits get an adaptive 2x2 pooling instead. Identical parameters either way.
    x = head.pool(x) if min(x.shape[-2:]) >= 5 else nn.functional.adaptive_avg_pool2d(x, 2)
    x = head.features(x)
    x = nn.functional.adaptive_avg_pool2d(x, 1)  # 1x1 already at the published sizes
    return head.classifier(x.flatten(1))


class AuxiliaryHeadCIFAR(nn.Module):
    """Auxiliary classifier on 8x8 feature maps (CIFAR, after cell 2*layers//3)."""

    def __init__(self, C, num_classes):
        super().__init__()
        self.pool = nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False)
        self.features = nn.Sequential(
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        return _aux_forward(self, x)


class AuxiliaryHeadImageNet(nn.Module):
    """Auxiliary classifier on 14x14 feature maps (ImageNet). As in DARTS' released code, without the second BN."""

    def __init__(self, C, num_classes):
        super().__init__()
        self.pool = nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False)
        self.features = nn.Sequential(
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        return _aux_forward(self, x)


class _EvalNetwork(nn.Module):
    def _build_cells(self, genotype, C_prev_prev, C_prev, C_curr, layers, reduction_prev):
        self.cells = nn.ModuleList()
        C_to_auxiliary = None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = EvalCell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == 2 * layers // 3:
                C_to_auxiliary = C_prev
        return C_prev, C_to_auxiliary

    def _run_cells(self, s0, s1):
        logits_aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self._layers // 3 and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1)), logits_aux


class NetworkCIFAR(_EvalNetwork):
    def __init__(self, C, num_classes, layers, auxiliary, genotype, stem_multiplier=3):
        super().__init__()
        genotype = load_genotype(genotype)
        self._layers, self._auxiliary, self.drop_path_prob = layers, auxiliary, 0.0
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev, C_aux = self._build_cells(genotype, C_curr, C_curr, C, layers, False)
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadCIFAR(C_aux, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x):
        s0 = s1 = self.stem(x)
        return self._run_cells(s0, s1)


class NetworkImageNet(_EvalNetwork):
    def __init__(self, C, num_classes, layers, auxiliary, genotype):
        super().__init__()
        genotype = load_genotype(genotype)
        self._layers, self._auxiliary, self.drop_path_prob = layers, auxiliary, 0.0
        self.stem0 = nn.Sequential(
            nn.Conv2d(3, C // 2, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        C_prev, C_aux = self._build_cells(genotype, C, C, C, layers, True)
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadImageNet(C_aux, num_classes)
        # AvgPool2d(7) in DARTS at 224 px; adaptive pooling is identical there and also works on small inputs
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x):
        s0 = self.stem0(x)
        s1 = self.stem1(s0)
        return self._run_cells(s0, s1)


def count_parameters(model: nn.Module, exclude_auxiliary: bool = True) -> int:
    """Parameter count; the auxiliary head is excluded by default, as papers report."""
    return sum(p.numel() for n, p in model.named_parameters() if not (exclude_auxiliary and "auxiliary" in n))
