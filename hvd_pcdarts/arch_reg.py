"""Regularization of the architecture loss (`--arch-reg`).

`beta-decay` (β-DARTS, Ye et al., CVPR 2022): the architecture loss adds λ(t) · mean over the edges of both cells
of logsumexp(α_edge). Its gradient, λ · softmax(α_edge) / edges, pulls every α of an edge down in proportion to
its weight, which keeps the α of the leading operations from running away (the skip-connect collapse).

The schedule is the one of the β-DARTS code (`weights = 0 + 50*epoch/100` in its architect, a 100-epoch search):
λ rises linearly with the epoch, λ(e) = W · e / epochs for the 0-based epoch e, from 0 at the first epoch towards
W = `--arch-reg-weight` (default 50, the code's) at the end; it is constant within an epoch.
"""

from __future__ import annotations

import torch

ARCH_REGS = ("beta-decay",)
DEFAULT_WEIGHT = 50.0


def beta_decay_loss(alphas) -> torch.Tensor:
    """Mean over the edges (the rows of every tensor in `alphas`) of logsumexp over the operations."""
    return torch.cat([a.reshape(-1, a.shape[-1]) for a in alphas]).logsumexp(dim=-1).mean()


class BetaDecay:
    """`reg()` -> λ · beta_decay_loss(alphas), the term the architecture step adds to its loss. λ is a tensor
    filled in place by `set_epoch`, so a captured CUDA graph of the architecture step reads the current value."""

    def __init__(self, alphas, weight: float, epochs: int):
        self.alphas, self.weight, self.epochs = list(alphas), float(weight), int(epochs)
        self.lam = torch.zeros((), dtype=self.alphas[0].dtype, device=self.alphas[0].device)

    def at(self, epoch: int) -> float:
        """λ in `epoch`."""
        return self.weight * epoch / self.epochs

    def set_epoch(self, epoch: int) -> None:
        self.lam.fill_(self.at(epoch))

    def __call__(self) -> torch.Tensor:
        return self.lam * beta_decay_loss(self.alphas)


def make_arch_reg(name, weight, model, epochs: int):
    """The regularizer of `--arch-reg name` for a SearchNetwork `model` (its alphas; the betas stay out), or None."""
    if name is None:
        return None
    return BetaDecay([model.alphas_normal, model.alphas_reduce],
                     DEFAULT_WEIGHT if weight is None else weight, epochs)
