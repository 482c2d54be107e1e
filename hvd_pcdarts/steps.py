"""The training steps, each written once. The search (`search.Searcher`), the retraining (`train.Trainer`), their
CUDA-graph fast paths (`fastpath.GraphedSearchStep`, `fastpath.GraphedTrainStep`), the benchmarks and the tests
all run these.

- `arch_step`: the first-order PC-DARTS architecture step (DARTS' `architect.py` with `unrolled=False`): the loss
  of an architecture batch, the gradients of the alphas and betas only (`torch.autograd.grad`: no weight gradient
  is produced), averaged over the ranks with one named allreduce, then Adam.
- `weight_update`: what follows the backward of a weight batch: `hvd.DistributedOptimizer.synchronize()` waits for
  the gradient allreduces its backward hooks started, the averaged gradients are clipped, then `step()` inside
  `skip_synchronize()` (no second averaging).

Nothing here imports Horovod: the averaging of the architecture gradients comes in as a function, and the weight
optimizer is either a `hvd.DistributedOptimizer` or a plain torch optimizer whose gradients need no averaging (one
process) or were averaged already (the CUDA-graph steps).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def autocast(device_type: str, dtype):
    """Autocast of a forward pass to `dtype` (torch.bfloat16 for --bf16, torch.float16 for --amp); None: off.
    While a CUDA graph is captured, without autocast's cache of cast weights (a graph must not keep them)."""
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    capturing = device_type == "cuda" and torch.cuda.is_current_stream_capturing()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=not capturing)


@contextlib.contextmanager
def frozen(params):
    """requires_grad off for `params` inside the block. The architecture step of a compiled net runs under it:
    a compiled backward computes the gradient of every input that requires one, so without it the arch step
    would also compute (and drop) every weight gradient. The eager backward of torch.autograd.grad skips them
    by itself; the result is the same either way."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# --- the architecture step -------------------------------------------------------------------------------------
def arch_gradients(model: nn.Module, criterion, arch_params, x, y, autocast_dtype=None, freeze=(), scale: float = 1.0,
                   reg=None):
    """(loss, gradients of `arch_params`) on one architecture batch. `freeze`: the weights, for a compiled model
    (see `frozen`). `scale`: the loss scale of --amp; the gradients come back unscaled. `reg`: a regularizer of
    the architecture (`arch_reg`; computed outside autocast): its term joins the gradients, not the loss
    returned."""
    with frozen(freeze):
        with autocast(x.device.type, autocast_dtype):
            loss = criterion(model(x), y)
        total = loss + reg() if reg is not None else loss
        grads = torch.autograd.grad(total * scale if scale != 1.0 else total, arch_params)
    if scale != 1.0:
        grads = [g / scale for g in grads]
    return loss.detach(), list(grads)


def apply_arch_gradients(a_opt, arch_params, grads, average=None, skip_nonfinite: bool = False) -> bool:
    """Average `grads` over the ranks (`average`: a named grouped allreduce; None on one process), make them the
    parameters' .grad and step `a_opt`. `skip_nonfinite` (--amp): a float16 overflow skips the step, on every rank
    alike, since the gradients were averaged first. Returns whether it stepped."""
    if average is not None:
        grads = average(list(grads))
    if skip_nonfinite and not all(bool(torch.isfinite(g).all()) for g in grads):
        return False
    for p, g in zip(arch_params, grads):
        p.grad = g
    a_opt.step()
    return True


def arch_step(model: nn.Module, criterion, arch_params, a_opt, x, y, average=None, autocast_dtype=None, freeze=(),
              scaler=None, reg=None) -> torch.Tensor:
    """One architecture step on the batch (x, y); returns its loss."""
    scale = float(scaler.get_scale()) if scaler is not None else 1.0
    loss, grads = arch_gradients(model, criterion, arch_params, x, y, autocast_dtype, freeze, scale, reg)
    apply_arch_gradients(a_opt, arch_params, grads, average, skip_nonfinite=scaler is not None)
    return loss


# --- the weight update -----------------------------------------------------------------------------------------
def clip_gradients(params, max_norm: float) -> torch.Tensor:
    """The total norm of the parameters' (averaged) gradients, after clipping them to `max_norm` when it is > 0.
    The same on every rank: the runs' signal that a step diverged (non-finite)."""
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        return nn.utils.clip_grad_norm_(params, max_norm)
    return nn.utils.get_total_norm([p.grad for p in params])


def weight_update(opt, params, grad_clip: float, scaler=None) -> torch.Tensor:
    """After the backward of a weight batch: average, (unscale,) clip, step. Returns the gradient norm.

    `opt`: a `hvd.DistributedOptimizer` (synchronize() waits for the allreduces its backward hooks started; the
    step then runs inside skip_synchronize(), as Horovod prescribes for clipping), or a plain torch optimizer
    whose gradients need no averaging or were averaged already. `scaler`: the GradScaler of --amp."""
    averaged_by_opt = hasattr(opt, "skip_synchronize")
    if averaged_by_opt:
        opt.synchronize()
    if scaler is not None:
        scaler.unscale_(opt)
    norm = clip_gradients(params, grad_clip)
    with opt.skip_synchronize() if averaged_by_opt else contextlib.nullcontext():
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return norm


def weight_step(forward, opt, params, grad_clip: float, device_type: str, autocast_dtype=None, scaler=None):
    """`forward()` -> (logits, loss) under autocast, backward (scaled under --amp), `weight_update`. Returns
    (logits, loss, gradient norm)."""
    opt.zero_grad()
    with autocast(device_type, autocast_dtype):
        logits, loss = forward()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    norm = weight_update(opt, params, grad_clip, scaler)
    return logits.detach(), loss.detach(), norm


# --- the search and retraining steps of one rank ---------------------------------------------------------------
def search_optimizers(model: nn.Module, lr: float, momentum: float, weight_decay: float, arch_lr: float,
                      arch_weight_decay: float):
    """The recipe's two optimizers of a search network: (SGD over the weights, Adam(0.5, 0.999) over the alphas
    and betas)."""
    w_opt = torch.optim.SGD(model.weight_parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=arch_lr, betas=(0.5, 0.999), weight_decay=arch_weight_decay)
    return w_opt, a_opt


def search_loss(model: nn.Module, criterion, x, y):
    """(logits, loss) of the search network on a batch."""
    logits = model(x)
    return logits, criterion(logits, y)


class SearchStep:
    """The search step of one rank: `arch_step` on a batch of the architecture half, `weight_step` on a batch of
    the weight half (`search.Searcher` calls both, the architecture step first). `average_arch`: the named
    allreduce average of the architecture gradients (None on one process); `w_opt`: see `weight_update`;
    `arch_reg`: the regularizer of --arch-reg, or None. `fastpath.GraphedSearchStep` replays the same steps from
    CUDA graphs."""

    def __init__(self, model: nn.Module, criterion, arch_params, weights, a_opt, w_opt, grad_clip: float = 0.0,
                 average_arch=None, autocast_dtype=None, scaler=None, freeze_weights: bool = False,
                 channels_last: bool = False, arch_reg=None):
        self.model, self.criterion, self.arch_reg = model, criterion, arch_reg
        self.arch_params, self.weights = list(arch_params), list(weights)
        self.a_opt, self.w_opt, self.grad_clip, self.average_arch = a_opt, w_opt, grad_clip, average_arch
        self.autocast_dtype, self.scaler, self.channels_last = autocast_dtype, scaler, channels_last
        self.freeze = self.weights if freeze_weights else ()  # a compiled model: see `frozen`

    def _in(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def arch_step(self, x, y) -> torch.Tensor:
        return arch_step(self.model, self.criterion, self.arch_params, self.a_opt, self._in(x), y, self.average_arch,
                         self.autocast_dtype, self.freeze, self.scaler, self.arch_reg)

    def weight_step(self, x, y):
        x = self._in(x)
        return weight_step(lambda: search_loss(self.model, self.criterion, x, y), self.w_opt, self.weights,
                           self.grad_clip, x.device.type, self.autocast_dtype, self.scaler)


def train_loss(model: nn.Module, criterion, x, y, aux_weight: float = 0.0):
    """The retraining loss: criterion(logits) + aux_weight * criterion(auxiliary logits) (the auxiliary term when
    the network returns auxiliary logits and aux_weight > 0). Returns (logits, loss)."""
    logits, logits_aux = model(x)
    loss = criterion(logits, y)
    if logits_aux is not None and aux_weight > 0:
        loss = loss + aux_weight * criterion(logits_aux, y)
    return logits, loss


class TrainStep:
    """The retraining step of one rank: forward with drop path and auxiliary head, backward, `weight_update`.
    Drop-path masks come from the generator as it stands at the call (`train.Trainer` seeds it per (seed, epoch,
    step, rank) before each step). `fastpath.GraphedTrainStep` replays the same step from a CUDA graph."""

    def __init__(self, model: nn.Module, criterion, params, opt, grad_clip: float = 0.0, aux_weight: float = 0.0,
                 autocast_dtype=None, scaler=None, channels_last: bool = False):
        self.model, self.criterion, self.params, self.opt = model, criterion, list(params), opt
        self.grad_clip, self.aux_weight = grad_clip, aux_weight
        self.autocast_dtype, self.scaler, self.channels_last = autocast_dtype, scaler, channels_last

    def step(self, x, y):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return weight_step(lambda: train_loss(self.model, self.criterion, x, y, self.aux_weight), self.opt,
                           self.params, self.grad_clip, x.device.type, self.autocast_dtype, self.scaler)
