"""Batch norm as plain reductions (benchmarks/search_step.py variant `+bnc`; off in the scripts)."""

from __future__ import annotations

import torch
import torch.nn as nn


class CompositeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode forward is plain tensor ops (var_mean over N, H, W; then an elementwise
    normalize), differentiated by autograd. Same function as nn.BatchNorm2d (running statistics with the unbiased
    variance, momentum or cumulative average); evaluation mode is nn.BatchNorm2d's.

    Why: the search net's partial-channel ops normalize 4 to 16 channels over N*H*W up to 262,144 values each;
    the library BN kernels parallelize over channels and were 54% of the GPU time of a step (H100 profile,
    while a generic reduction splits each channel over many blocks. More kernels per BN, which a CUDA graph
    makes cheap; more saved activations (x - mean), which costs memory."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        x_in = x
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # statistics in float32 under bf16/fp16 autocast, as the library kernels keep them
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        n = x.numel() // x.shape[1]
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (n / max(n - 1, 1))
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        inv = torch.rsqrt(var + self.eps)
        y = (x - mean[None, :, None, None]) * inv[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x_in.dtype)


def use_composite_bn(module: nn.Module) -> nn.Module:
    """Turn every plain nn.BatchNorm2d into a CompositeBatchNorm2d in place (a class swap: the same parameter
    and buffer objects, so optimizers built before still hold them)."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = CompositeBatchNorm2d
    return module
