"""`--cuda-graph`: the forward+backward of the search step's two halves, and of the retraining step, captured
once as CUDA graphs and replayed every step. The steps are those of `steps.py`: the captured functions are its
`arch_gradients`, `search_loss` and `train_loss`, and after a replay its `apply_arch_gradients` and
`weight_update` run as in the eager step. The gradient averaging over ranks runs outside the graphs (Python
gradient hooks do not replay inside a graph), so the weight optimizer is a plain torch optimizer and the
gradients are averaged by a function passed in (a named grouped allreduce)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..steps import (
    SearchStep,
    TrainStep,
    apply_arch_gradients,
    arch_gradients,
    autocast,
    search_loss,
    train_loss,
    weight_update,
)


def _bn_buffers(model: nn.Module):
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


class BNSnapshot:
    """The values of every BatchNorm buffer, to put back after a warm-up/capture. `restore` looks the buffers up
    again: the first forward of a batched cell (`--batched-edges`) replaces its edges' BN buffers with views of
    shared ones, so the tensors seen before a first forward are no longer the model's after it (restoring into
    them changed nothing: found on an H200, where the warm-up and capture updates stayed in the statistics)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.values = [b.detach().clone() for b in _bn_buffers(model)]

    def restore(self) -> None:
        bufs = _bn_buffers(self.model)
        if len(bufs) != len(self.values):
            raise RuntimeError("the model's BatchNorm buffers changed in number since the snapshot")
        with torch.no_grad():
            for b, v in zip(bufs, self.values):
                b.copy_(v)


def _warmup(n: int) -> int:
    """Eager passes before a capture: at least one, so that what the model builds and caches at its first call
    (the batched op's index tensors, copied from the host, and its weight-pack plans; cuDNN/Triton choices) is made
    outside the graph, not in its private pool while capturing."""
    if int(n) < 1:
        raise ValueError(f"CUDA graph warm-up passes: {n}, need at least 1")
    return int(n)


def _average_in_place(grads, average) -> None:
    """Replace each gradient by its average over the ranks (`average`: a function of the list; None: one rank)."""
    if average is None:
        return
    with torch.no_grad():
        for t, a in zip(grads, average(list(grads))):
            if a is not t:
                t.copy_(a)


class GraphedSearchStep(SearchStep):
    """The PC-DARTS first-order search step with the forward+backward of each half captured as a CUDA graph.

    The steps are `steps.SearchStep`'s: the arch graph holds `arch_gradients`, the weight graph the forward of
    `search_loss` and the backward into the weights' .grad; after a replay, the architecture gradients go through
    `apply_arch_gradients`, the weight gradients are averaged by `average_weights` and `weight_update` clips them
    and steps `w_opt` (a plain optimizer: no Horovod hooks).

    Each graph is captured lazily at its first call, from that call's batch, after `warmup` eager passes on a
    side stream (cuDNN picks its algorithms there). Warm-up and capture change nothing: BN buffers are restored
    and the gradients set to None, so the first replay computes exactly the first eager step. The two graphs
    share one memory pool: that is safe because each call consumes its graph's outputs (gradients, loss,
    logits) before the other graph replays. Do not set the weights' .grad to None between steps (that is what
    optimizer.zero_grad() does): the graph writes into the .grad tensors it allocated at capture.
    Batch shapes must stay the same (drop_last loaders).
    """

    def __init__(self, model: nn.Module, criterion, arch_params, weights, a_opt, w_opt, grad_clip: float = 0.0,
                 average_arch=None, average_weights=None, autocast_dtype=None, channels_last: bool = False,
                 warmup: int = 3, freeze_weights: bool = False, arch_reg=None):
        super().__init__(model, criterion, arch_params, weights, a_opt, w_opt, grad_clip, average_arch,
                         autocast_dtype, None, freeze_weights, channels_last, arch_reg)
        self.average_weights, self.warmup = average_weights, _warmup(warmup)
        self.pool = torch.cuda.graph_pool_handle()
        self._arch = None  # (graph, x, y, loss, grads)
        self._weight = None  # (graph, x, y, logits, loss)

    def _static(self, x, y):
        mf = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.detach().clone().contiguous(memory_format=mf), y.detach().clone()

    def _arch_fwd_bwd(self, x, y):
        loss, grads = arch_gradients(self.model, self.criterion, self.arch_params, x, y, self.autocast_dtype,
                                     self.freeze, reg=self.arch_reg)
        return loss.float(), [g.detach() for g in grads]

    def _weight_fwd_bwd(self, x, y):
        with autocast("cuda", self.autocast_dtype):
            logits, loss = search_loss(self.model, self.criterion, x, y)
        # weights only: the eager step's backward also fills the alphas' .grad, which nobody reads (the arch step
        # replaces them); leaving them out keeps every tensor the graph writes owned by this graph
        torch.autograd.backward(loss, inputs=self.weights)
        return logits.detach(), loss.detach().float()

    def _capture(self, fn, x, y, clear):
        """Warm up `fn` on a side stream, then capture it; `clear` are the parameters whose .grad `fn` writes
        (set to None first, so the captured backward allocates them instead of accumulating into them)."""
        bn = BNSnapshot(self.model)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                for p in clear:
                    p.grad = None
                fn(x, y)
        torch.cuda.current_stream().wait_stream(side)
        for p in clear:
            p.grad = None
        g = torch.cuda.CUDAGraph()
        # thread_local: Horovod's background thread may touch CUDA while this thread captures
        with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
            out = fn(x, y)
        torch.cuda.synchronize()
        bn.restore()
        return g, out

    def arch_step(self, x, y) -> torch.Tensor:
        if self._arch is None:
            sx, sy = self._static(x, y)
            g, (loss, grads) = self._capture(self._arch_fwd_bwd, sx, sy, clear=[])
            self._arch = (g, sx, sy, loss, grads)
        g, sx, sy, loss, grads = self._arch
        sx.copy_(x, non_blocking=True)
        sy.copy_(y, non_blocking=True)
        g.replay()
        apply_arch_gradients(self.a_opt, self.arch_params, [t.clone() for t in grads], self.average_arch)
        return loss.clone()

    def weight_step(self, x, y):
        if self._weight is None:
            sx, sy = self._static(x, y)
            g, (logits, loss) = self._capture(self._weight_fwd_bwd, sx, sy, clear=self.weights)
            missing = [i for i, p in enumerate(self.weights) if p.grad is None]
            if missing:
                raise RuntimeError(f"{len(missing)} weight parameters got no gradient in the captured step")
            self._weight = (g, sx, sy, logits, loss)
        g, sx, sy, logits, loss = self._weight
        sx.copy_(x, non_blocking=True)
        sy.copy_(y, non_blocking=True)
        g.replay()
        _average_in_place([p.grad for p in self.weights], self.average_weights)
        norm = weight_update(self.w_opt, self.weights, self.grad_clip)
        return logits.clone(), loss.clone(), norm


class GraphedTrainStep(TrainStep):
    """The retraining step (`steps.TrainStep`) with the forward+backward captured
    as one CUDA graph: loss with the auxiliary head, drop path, backward into the parameters' .grad. Outside the
    graph: averaging of the gradients over ranks (`average`, a named grouped allreduce in train.py; hooks of a
    Horovod DistributedOptimizer do not replay in a graph, so `opt` is a plain optimizer), clipping to
    `grad_clip`, `opt.step()`.

    Drop path stays exact. Its masks are drawn inside the graph by the same bernoulli_ kernels as in the eager
    forward; CUDA graphs keep RNG kernels graph-safe (each replay reads the generator's seed and offset as they
    stand at the replay, then advances the offset by what the graph consumed), so after the same
    `torch.manual_seed` a replay draws the very masks the eager step draws. Warm-up and capture leave the CUDA
    generator as they found it (its state is saved and restored), as they leave the BN statistics. The drop
    probability is a Python float baked into the graph (and 0 removes the drop-path ops altogether), so the graph
    is captured again whenever `model.drop_path_prob` (or the training mode, or the batch shape) changes: once
    an epoch while train.py ramps the probability; `captures` counts the captures.

    As in GraphedSearchStep: do not set the parameters' .grad to None between steps (optimizer.zero_grad() does
    that); the graph writes into the .grad tensors it allocated at capture. Parameters that get no gradient (an
    auxiliary head with aux_weight 0) keep .grad None and are skipped, as in the eager step.
    """

    def __init__(self, model: nn.Module, criterion, params, opt, grad_clip: float = 0.0, aux_weight: float = 0.0,
                 average=None, channels_last: bool = False, warmup: int = 3, autocast_dtype=None):
        # bf16 (--bf16): no loss scaling, so it can live in the graph
        super().__init__(model, criterion, params, opt, grad_clip, aux_weight, autocast_dtype, None, channels_last)
        self.average, self.warmup = average, _warmup(warmup)
        self.captures = 0
        self._graph = None  # (key, graph, x, y, logits, loss, parameters with a gradient)

    def _fwd_bwd(self, x, y):
        with autocast("cuda", self.autocast_dtype):
            logits, loss = train_loss(self.model, self.criterion, x, y, self.aux_weight)
        loss.backward()
        return logits.detach(), loss.detach().float()

    def _capture(self, x, y):
        bn = BNSnapshot(self.model)
        rng = torch.cuda.get_rng_state(x.device)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                for p in self.params:
                    p.grad = None
                self._fwd_bwd(x, y)
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:
            p.grad = None
        g = torch.cuda.CUDAGraph()
        # thread_local: Horovod's background thread may touch CUDA while this thread captures
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            out = self._fwd_bwd(x, y)
        torch.cuda.synchronize()
        bn.restore()
        torch.cuda.set_rng_state(rng, x.device)
        return g, out

    def step(self, x, y):
        key = (bool(self.model.training), float(getattr(self.model, "drop_path_prob", 0.0)), tuple(x.shape),
               x.dtype, tuple(y.shape))
        if self._graph is None or self._graph[0] != key:
            self._graph = None  # the old graph and its memory go first
            for p in self.params:
                p.grad = None
            mf = torch.channels_last if self.channels_last else torch.contiguous_format
            sx, sy = x.detach().clone().contiguous(memory_format=mf), y.detach().clone()
            g, (logits, loss) = self._capture(sx, sy)
            have = [p for p in self.params if p.grad is not None]
            if not have:
                raise RuntimeError("no parameter got a gradient in the captured training step")
            self._graph = (key, g, sx, sy, logits, loss, have)
            self.captures += 1
        _, g, sx, sy, logits, loss, have = self._graph
        sx.copy_(x, non_blocking=True)
        sy.copy_(y, non_blocking=True)
        g.replay()
        _average_in_place([p.grad for p in have], self.average)
        norm = weight_update(self.opt, have, self.grad_clip)
        return logits.clone(), loss.clone(), norm
