"""`--sync-bn`: batch norm whose training statistics are those of the global batch over all ranks (its collectives
go through `horovod.py`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import horovod as dist


class _NamedSumAllreduce(torch.autograd.Function):
    """Sum-allreduce whose forward and backward collectives carry fixed names, so Horovod's response cache
    recognizes them step after step (unnamed ones get a new name per call and are negotiated every time)."""

    @staticmethod
    def forward(ctx, t, name):
        ctx.name = name
        return dist.allreduce(t, name=f"{name}.fwd", average=False)

    @staticmethod
    def backward(ctx, grad):
        return dist.allreduce(grad.contiguous(), name=f"{ctx.name}.bwd", average=False), None


_BN_COUNTER = [0]


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all ranks.

    The per-channel sums and sums of squares are Sum-allreduced (differentiable: the backward allreduces the
    gradient), so it works on CPU and GPU alike - unlike hvd.SyncBatchNorm, which refuses CPU tensors. In eval
    mode it is an ordinary BatchNorm2d (no communication).
    """

    def forward(self, x):
        if not self.training or dist.size() == 1:
            return super().forward(x)
        C = x.shape[1]
        xf = x if x.dtype == torch.float64 else x.float()
        # shift by the running mean (identical on every rank) so E[d^2] - E[d]^2 keeps float32 precision
        shift = (self.running_mean.detach() if self.running_mean is not None
                 else torch.zeros(C, device=x.device)).to(xf.dtype)
        d = xf - shift[None, :, None, None]
        local = torch.cat([d.sum(dim=(0, 2, 3)), (d * d).sum(dim=(0, 2, 3)),
                           torch.tensor([x.numel() / C], device=x.device, dtype=xf.dtype)])
        if not hasattr(self, "_sync_name"):
            _BN_COUNTER[0] += 1
            self._sync_name = f"syncbn.{_BN_COUNTER[0]}"
        tot = _NamedSumAllreduce.apply(local, self._sync_name)
        n = tot[-1]
        dmean = tot[:C] / n
        var = (tot[C:2 * C] / n - dmean * dmean).clamp_min(0.0)
        mean = dmean + shift
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach().to(self.running_var.dtype), alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by GlobalBatchNorm2d, keeping parameters, buffers and settings."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        new = GlobalBatchNorm2d(module.num_features, eps=module.eps, momentum=module.momentum,
                                affine=module.affine, track_running_stats=module.track_running_stats)
        ref = next(iter(module.state_dict().values()), None)
        if ref is not None and ref.is_floating_point():
            new = new.to(device=ref.device, dtype=ref.dtype)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child))
    return module
