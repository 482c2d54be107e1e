"""How decided a search is, every epoch (key `diagnostics` of metrics.jsonl, TensorBoard `diagnostics/...`):
per edge the margin between the two largest entries of softmax(alpha) and its entropy (nats; log 8 = 2.08 is a
uniform edge), per node the edge-normalized betas, the derived normal cell's skip connections, and whether the
derived genotype differs from the one before. A function of the architecture parameters only, which every rank
holds identically (the epoch's consistency check compares them).

The rules of `--early-stop` (DARTS+) read them: `skip:N` holds once the derived normal cell has >= N skip
connections, `stable:K` once the derived genotype has not changed for K epochs of architecture training."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .models.search_network import edge_softmax
from .space.genotypes import node_edges


def cell_diagnostics(alphas: torch.Tensor, betas: torch.Tensor, steps: int) -> dict:
    """{"margin": [per edge], "entropy": [per edge], "betas": [per node: its incoming edges' weights]}."""
    p = F.softmax(alphas.detach().double().cpu(), dim=-1)
    top2 = p.topk(2, dim=-1).values
    entropy = -(p * p.clamp_min(1e-300).log()).sum(dim=-1)
    e = edge_softmax(betas.detach().double().cpu(), steps)
    nodes = [e[r.start:r.stop].tolist() for r in node_edges(steps)]
    return {"margin": (top2[:, 0] - top2[:, 1]).tolist(), "entropy": entropy.tolist(), "betas": nodes}


def search_diagnostics(model, genotype, changed: bool) -> dict:
    """The diagnostics of `model` (a SearchNetwork) whose derived genotype is `genotype`; `changed`: whether it
    differs from the one derived at the end of the epoch before, or from the initial architecture."""
    steps = model._steps
    return {"normal": cell_diagnostics(model.alphas_normal, model.betas_normal, steps),
            "reduce": cell_diagnostics(model.alphas_reduce, model.betas_reduce, steps),
            "normal_skips": sum(op == "skip_connect" for op, _ in genotype.normal),
            "genotype_changed": changed}


def early_stop_rule(text: str) -> tuple[str, int]:
    """`skip:N` (N >= 0) or `stable:K` (K >= 1), as (kind, number): the argparse type of --early-stop."""
    kind, _, number = text.partition(":")
    if kind in ("skip", "stable") and number.isdigit() and int(number) >= (kind == "stable"):
        return kind, int(number)
    raise argparse.ArgumentTypeError(f"expected skip:N (N >= 0) or stable:K (K >= 1), got {text!r}")


def early_stop_holds(rules, normal_skips: int, stable_epochs: int):
    """(rule, why) of the first of `rules` ((kind, number) pairs) that holds, or None."""
    for kind, n in rules:
        if kind == "skip" and normal_skips >= n:
            return f"skip:{n}", f"the derived normal cell holds {normal_skips} skip_connect (>= {n})"
        if kind == "stable" and stable_epochs >= n:
            return f"stable:{n}", f"the derived genotype has not changed for {stable_epochs} epoch(s) (>= {n})"
    return None
