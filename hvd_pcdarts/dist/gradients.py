"""Averaging the weight gradients over the ranks (`--grad-allreduce`): hvd.DistributedOptimizer's hooks or one
flat allreduce after backward; both through `horovod.py`, within a replica's ranks under --replicas."""

from __future__ import annotations

import contextlib

import torch

from . import horovod as dist

GRAD_ALLREDUCE_MODES = ("auto", "overlap", "flat")


def grad_allreduce_mode(requested: str, device: torch.device) -> str:
    """`--grad-allreduce auto`: `flat` on the CPU, `overlap` on GPUs (see weight_optimizer)."""
    if requested == "auto":
        return "flat" if device.type == "cpu" else "overlap"
    return requested


def weight_optimizer(optimizer, named_parameters, mode: str, fp16_allreduce: bool = False, name: str = "grads"):
    """The optimizer of the weights with its gradient averaging over the ranks; both modes offer
    hvd.DistributedOptimizer's interface (`synchronize()`, `skip_synchronize()`, `step()`), used by
    steps.weight_update.

    - `overlap`: hvd.DistributedOptimizer: one allreduce per gradient tensor, started by backward hooks while
      backward still runs (overlaps communication with computation on GPUs).
    - `flat`: after backward, every gradient averaged as ONE flat tensor (one collective a step), see
      FlatAveraging. On a CPU there is no idle device for the hooks' allreduces to hide behind, and Horovod's
      handling of the search net's ~1,400 gradient tensors costs the compute threads CPU time; none of
      hvd.DistributedOptimizer's own settings closes that: 2-rank scaling efficiency on 2 cores, measured in one
      run of benchmarks/scaling.py (benchmarks/RESULTS.md, "DistributedOptimizer settings on the CPU"):
      overlap 0.89-0.91, `groups=K` (K grouped allreduces, each once its gradients exist) 0.82-0.88 and slower
      with shorter cycle times, flat 0.95-1.0. Same numbers as overlap up to summation order.
    """
    if mode == "overlap":
        return dist.distributed_optimizer(optimizer, named_parameters, fp16_allreduce)
    if mode != "flat":
        raise ValueError(f"unknown gradient allreduce mode {mode!r}")
    cls = type("FlatAveraging" + type(optimizer).__name__, (FlatAveraging, type(optimizer)), {})
    flat = cls(optimizer.param_groups, **optimizer.defaults)  # as hvd.DistributedOptimizer wraps an optimizer
    flat.load_state_dict(optimizer.state_dict())
    flat._flat_init(fp16_allreduce, name)
    return flat


class FlatAveraging:
    """Mixin over a torch optimizer class: `synchronize()` averages the gradients of all parameters over the
    ranks as one flat tensor (concatenated, one allreduce, copied back; fp16 on the wire with
    `--fp16-allreduce`); `step()` synchronizes first unless inside `skip_synchronize()` or already synchronized
    since the last step, as hvd.DistributedOptimizer does, so GradScaler and clipping work the same way."""

    def _flat_init(self, fp16: bool, name: str):
        self._flat_fp16, self._flat_name = fp16, name
        self._flat_synced, self._flat_skip = False, False

    def synchronize(self):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        flat_average(grads, self._flat_name, self._flat_fp16)
        self._flat_synced = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        self._flat_skip = True
        try:
            yield
        finally:
            self._flat_skip = False

    def step(self, closure=None):
        if not self._flat_skip and not self._flat_synced:
            self.synchronize()
        self._flat_synced = False
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True):
        self._flat_synced = False
        return super().zero_grad(set_to_none=set_to_none)


def flat_average(tensors: list[torch.Tensor], name: str, fp16: bool = False) -> None:
    """Average `tensors` over the ranks IN PLACE with one allreduce per dtype: concatenate, allreduce, copy back."""
    if dist.size() == 1 or not tensors:
        return
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for i, group in enumerate(by_dtype.values()):
        flat = torch.cat([t.reshape(-1) for t in group])
        wire = flat.half() if fp16 and flat.is_floating_point() else flat
        avg = dist.allreduce(wire, name=f"{name}.flat{i}", average=True)
        if avg.dtype != flat.dtype:
            avg = avg.to(flat.dtype)
        with torch.no_grad():
            torch._foreach_copy_(group, [a.view_as(t) for a, t in zip(avg.split([t.numel() for t in group]), group)])
