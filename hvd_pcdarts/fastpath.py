"""Fast paths for the search and retraining steps. The eager code stays the reference; each fast path
here computes the same thing and is checked against it (tests/test_fastpath.py on the CPU, the CUDA-graph one in
benchmarks/run_device.sh on a GPU).

- `DeviceImages` / `DeviceLoader`: the training images stay on the device as uint8 (CIFAR-10: 150 MB) and a
  whole batch is augmented there in a few kernels (pad + random crop + horizontal flip [+ cutout], to float,
  normalize). The random numbers are drawn per sample from the same seeded CPU generator, in the same order, as
  `data.SeededView` + `data.make_transform` draw them, so a batch is *bit for bit* the eager loader's batch
  (same samples, same crops, same flips, same values): results do not change with `--gpu-data`.
- `GraphedSearchStep`: the forward+backward of the architecture step and of the weight step, each captured once
  as a CUDA graph (static input buffers; BatchNorm in training mode updates its running statistics inside the
  graph) and replayed every step. The gradient averaging over ranks (Horovod) and the optimizer steps run outside
  the graphs: Python gradient hooks do not replay inside a graph.
- `GraphedTrainStep`: the same for the retraining step of bin/train.py (one graph: loss with the auxiliary head
  and drop path, backward); drop-path masks stay those of the eager step (see the class).
- `to_channels_last`: the model's 4-d weights (and the input batches) in NHWC order.

This module imports no Horovod: gradient averaging is passed in as a function.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import UsageError


# --- device-resident data with batched augmentation ------------------------------------------------------------
@dataclass(frozen=True)
class AugmentSpec:
    """What `data.make_transform` does to a uint8 tensor image, in order: to float in [0, 1]; zero-pad by `pad`
    and random-crop back to the image size (when pad > 0); random horizontal flip (when `flip`); normalize;
    cutout of side `cutout` (when > 0, after normalization, as data.Cutout)."""

    mean: tuple
    std: tuple
    pad: int = 0
    flip: bool = False
    cutout: int = 0


def augment_spec(bundle, train: bool, augment: bool, dataset: str, cutout: int = 0) -> AugmentSpec:
    """The AugmentSpec equal to `data.make_transform(bundle, train, augment, dataset, cutout=cutout)` for tensor
    datasets (cifar10, cifar100, digits, synthetic); image-folder data (PIL) cannot live on the device."""
    if bundle.kind != "tensor":
        raise UsageError(f"--gpu-data needs a dataset held as tensors (cifar10, cifar100, digits, synthetic); "
                         f"{dataset} is decoded from image files: drop --gpu-data")
    pad, flip = 0, False
    if train and augment:
        if dataset == "digits":
            pad = 2
        elif dataset != "synthetic":
            pad, flip = 4, True
    return AugmentSpec(tuple(float(m) for m in bundle.mean), tuple(float(s) for s in bundle.std), pad, flip,
                       cutout if (train and augment) else 0)


def draw_params(spec: AugmentSpec, seeds, height: int, width: int) -> torch.Tensor:
    """Per-sample random numbers, (N, 5) int64: crop top, crop left, flip (0/1), cutout centre y, x.

    Sample n's numbers come from `torch.manual_seed(seeds[n])` followed by exactly the draws that torchvision's
    RandomCrop (`get_params`), RandomHorizontalFlip and data.Cutout make, in the same order, on a private
    generator (the global RNG is untouched). So they equal what the eager per-sample transform uses. Cost: about
    12 microseconds a sample on one CPU core (3 ms for 256)."""
    out = torch.zeros(len(seeds), 5, dtype=torch.int64)
    if spec.pad == 0 and not spec.flip and spec.cutout == 0:
        return out
    g = torch.Generator()  # the default CPU generator's algorithm (mt19937): same seed, same numbers
    rows = []
    for s in seeds:
        g.manual_seed(int(s))
        top = left = fl = cy = cx = 0
        if spec.pad > 0:
            top = int(torch.randint(0, 2 * spec.pad + 1, size=(1,), generator=g))
            left = int(torch.randint(0, 2 * spec.pad + 1, size=(1,), generator=g))
        if spec.flip:
            fl = int(bool(torch.rand(1, generator=g) < 0.5))
        if spec.cutout > 0:
            cy = int(torch.randint(0, height, (1,), generator=g))
            cx = int(torch.randint(0, width, (1,), generator=g))
        rows.append((top, left, fl, cy, cx))
    if rows:
        out = torch.tensor(rows, dtype=torch.int64)
    return out


def augment_batch(images: torch.Tensor, params: torch.Tensor, spec: AugmentSpec, dtype=torch.float32,
                  channels_last: bool = False) -> torch.Tensor:
    """Augment a uint8 batch (N, C, H, W) on its own device with per-sample `params` (from `draw_params`).

    Crop and flip are one gather; the float conversion and normalization are those of torchvision's
    ConvertImageDtype and Normalize (x / 255, then (x - mean) / std), so values are bit-identical to the eager
    transform. Returns (N, C, H, W) `dtype`, NHWC in memory when `channels_last`."""
    n, c, h, w = images.shape
    dev = images.device
    p = params.to(dev)
    x = images
    if spec.pad > 0 or spec.flip:
        if spec.pad > 0:
            x = nn.functional.pad(x, (spec.pad, spec.pad, spec.pad, spec.pad))
        ar_h = torch.arange(h, device=dev)
        ar_w = torch.arange(w, device=dev)
        rows = p[:, 0:1] + ar_h  # (N, H)
        flip = p[:, 2:3].bool()
        cols = p[:, 1:2] + torch.where(flip, (w - 1) - ar_w, ar_w)  # (N, W)
        bidx = torch.arange(n, device=dev)[:, None, None]
        x = x[bidx, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
        x = x.permute(0, 3, 1, 2)  # NCHW shape, NHWC memory
    # a tensor divisor, not the Python scalar 255: CUDA turns division by a scalar into multiplication by its
    # reciprocal (1 ulp off on some values); the loader's torchvision transform divides exactly, on the CPU
    x = x.to(dtype) / torch.full((1,), 255.0, dtype=dtype, device=dev)
    mean = torch.as_tensor(spec.mean, dtype=dtype, device=dev)[:, None, None]
    std = torch.as_tensor(spec.std, dtype=dtype, device=dev)[:, None, None]
    x = (x - mean) / std
    if spec.cutout > 0:
        half = spec.cutout // 2
        cy, cx = p[:, 3:4], p[:, 4:5]
        ys = torch.arange(h, device=dev)
        xs = torch.arange(w, device=dev)
        in_y = (ys >= (cy - half).clamp_min(0)) & (ys < (cy + half).clamp_max(h))  # (N, H)
        in_x = (xs >= (cx - half).clamp_min(0)) & (xs < (cx + half).clamp_max(w))  # (N, W)
        box = in_y[:, None, :, None] & in_x[:, None, None, :]
        x = x.masked_fill(box, 0.0)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=mf)


class DeviceImages:
    """A `data.SeededView` whose images live on `device` as uint8 and are augmented a batch at a time.

    `batch(positions)` returns (x, y, base_indices) for positions into the view, exactly as stacking
    `view[i]` for i in positions would (the per-sample seeds are the view's), but on the device."""

    def __init__(self, view, spec: AugmentSpec, device, dtype=torch.float32, channels_last: bool = False):
        from .data import _mix

        base = view.base
        if not (hasattr(base, "images") and hasattr(base, "labels")):
            raise UsageError("--gpu-data needs a dataset held as tensors (cifar10, cifar100, digits, synthetic)")
        idx = torch.as_tensor(view.indices, dtype=torch.long)
        self.view, self.spec, self.device, self.dtype, self.channels_last = view, spec, device, dtype, channels_last
        self.images = base.images[idx].to(device)  # uint8, (N, C, H, W)
        self.labels = torch.as_tensor(base.labels)[idx].to(device)
        self.base_indices = idx
        self._mix = _mix

    def __len__(self):
        return len(self.base_indices)

    def set_epoch(self, epoch: int) -> None:
        self.view.set_epoch(epoch)

    def batch(self, positions):
        pos = torch.as_tensor(list(positions), dtype=torch.long)
        base_idx = self.base_indices[pos]
        v = self.view
        h, w = self.images.shape[-2:]
        seeds = [self._mix(v.seed, v.stream, v.epoch, int(i)) for i in base_idx]
        params = draw_params(self.spec, seeds, h, w)
        pos_d = pos.to(self.device)
        x = augment_batch(self.images[pos_d], params, self.spec, self.dtype, self.channels_last)
        return x, self.labels[pos_d], base_idx


class DeviceLoader:
    """A drop-in replacement for a DataLoader over the same view: yields `DeviceImages.batch` results for the
    batches of `batch_sampler` (lists of positions), or of `sampler` cut into batches of `batch_size` (the last
    partial batch dropped when `drop_last`)."""

    def __init__(self, images: DeviceImages, batch_size: int | None = None, sampler=None, drop_last: bool = True,
                 batch_sampler=None):
        if (sampler is None) == (batch_sampler is None):
            raise ValueError("give either sampler (with batch_size) or batch_sampler")
        self.images, self.batch_size, self.sampler, self.drop_last = images, batch_size, sampler, drop_last
        self.batch_sampler = batch_sampler

    def __len__(self):
        if self.batch_sampler is not None:
            return len(self.batch_sampler)
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        if self.batch_sampler is not None:
            for positions in self.batch_sampler:
                yield self.images.batch(positions)
            return
        buf = []
        for i in self.sampler:
            buf.append(i)
            if len(buf) == self.batch_size:
                yield self.images.batch(buf)
                buf = []
        if buf and not self.drop_last:
            yield self.images.batch(buf)


# --- memory format ------------------------------------------------------------------------------------------------
def to_channels_last(model: nn.Module) -> nn.Module:
    """4-d weights in NHWC order, so that convolutions produce NHWC outputs (with NHWC inputs: any).

    1x1 kernels stay in the standard layout: for them both layouts hold the same order, but NHWC strides of a
    (O, I, 1, 1) tensor have a last stride of I, which byte views (distributed.tensors_checksum) refuse."""
    model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4 and p.stride(-1) != 1:
                p.data = p.data.clone(memory_format=torch.contiguous_format)
    return model


# --- batch norm as plain reductions ----------------------------------------------------------------------------
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


# --- torch.compile of the search cells (--compile) ----------------------------------------------------------
def compile_cells(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """`--compile`: torch.compile the tensor work of every search cell (SearchCell.compile), with static shapes.

    Compiled per cell, not as one network: smaller graphs compile faster, and cells of the same shape share the
    compiled code (at the default size all 8 cells differ; deeper nets repeat shapes). Each distinct cell compiles
    once per mode (weight step, architecture step, evaluation) during the first steps. The network's stem,
    softmaxes and classifier stay eager (a handful of kernels).
    `backend`: torch.compile's; the tests use "aot_eager" (the same graph capture and compiled autograd without
    inductor's code generation, which takes minutes on a small CPU)."""
    _raise_recompile_limits()
    for cell in model.cells:
        cell.compile(dynamic=False, backend=backend)
    return model


def compile_ops(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """`--compile` of bin/train.py: torch.compile every operation of the retraining network's cells that has
    weights (the preprocessing ReLU-conv-BNs, separable and dilated convolutions, factorized reductions), with
    static shapes, so that each op's batch norms and ReLUs fuse with their neighbours. Per op, not per cell: the
    drop path between an op and the node's sum draws random masks with a probability that changes every epoch,
    which would make a compiled cell recompile each epoch (and draw from inductor's generator, not torch's); the
    ops are pure functions of their input, shared by every instance of the same shape (one compile for all
    cells of a stage). Pools and identities have nothing to fuse and stay eager, as do the stem, the auxiliary
    head and the classifier."""
    _raise_recompile_limits()
    for cell in model.cells:
        for m in (cell.preprocess0, cell.preprocess1, *cell._ops):
            if any(True for _ in m.parameters()):
                m.compile(dynamic=False, backend=backend)
    return model


def compile_note(backend: str, device: torch.device, what: str) -> str:
    """The start line's words for a compiled run ("" when not compiled: backend None)."""
    if backend is None:
        return ""
    slow = backend == "inductor" and device.type == "cpu"
    return f"compiled {what} ({backend}{': many minutes of compiling on a CPU' if slow else ''}), "


def _raise_recompile_limits() -> None:
    import torch._dynamo

    cfg = torch._dynamo.config
    # one compiled entry per (shape, batch size, mode, memory format); dynamo keeps 8 by default
    for name, floor in (("recompile_limit", 256), ("cache_size_limit", 256), ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096)):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), floor))


def uncompiled(on: bool = True):
    """Inside: compiled functions run eagerly instead of compiling a new variant (torch.compiler.set_stance). For
    the search-validation's last, smaller batch: one eager pass instead of compiling every cell once more."""
    return torch.compiler.set_stance("force_eager") if on else contextlib.nullcontext()


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


# --- CUDA graphs of the search step ---------------------------------------------------------------------------
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


class EagerSearchStep:
    """The eager search step of one rank without Horovod: `search.Searcher.arch_step` / `weight_step` with the
    averaging functions passed in (None on one rank). The reference that the fast paths are compared with, and
    the baseline of benchmarks/search_step.py."""

    def __init__(self, model: nn.Module, criterion, arch_params, weight_params, a_opt, w_opt, grad_clip: float = 0.0,
                 average_arch=None, autocast_dtype=None, channels_last: bool = False, freeze_weights: bool = False):
        self.model, self.criterion = model, criterion
        self.arch_params, self.weight_params = list(arch_params), list(weight_params)
        self.a_opt, self.w_opt, self.grad_clip = a_opt, w_opt, grad_clip
        self.average_arch, self.autocast_dtype, self.channels_last = average_arch, autocast_dtype, channels_last
        self.freeze_weights = freeze_weights  # the arch step under frozen(weights): for a compiled model

    def _autocast(self, x):
        if self.autocast_dtype is None:
            return torch.autocast(x.device.type, enabled=False)
        return torch.autocast(x.device.type, dtype=self.autocast_dtype)

    def _in(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def arch_step(self, x, y) -> torch.Tensor:
        x = self._in(x)
        self.a_opt.zero_grad(set_to_none=True)
        with frozen(self.weight_params if self.freeze_weights else []):
            with self._autocast(x):
                loss = self.criterion(self.model(x), y)
            grads = torch.autograd.grad(loss, self.arch_params)
        if self.average_arch is not None:
            grads = self.average_arch(list(grads))
        for p, g in zip(self.arch_params, grads):
            p.grad = g
        self.a_opt.step()
        return loss.detach().float()

    def weight_step(self, x, y):
        x = self._in(x)
        self.w_opt.zero_grad()
        with self._autocast(x):
            logits = self.model(x)
            loss = self.criterion(logits, y)
        loss.backward()
        norm = clip_gradients(self.weight_params, self.grad_clip)
        self.w_opt.step()
        return logits.detach(), loss.detach().float(), norm


def build_search(C: int = 16, layers: int = 8, partial_k: int = 4, num_classes: int = 10, seed: int = 2,
                 device="cpu", lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 3e-4,
                 arch_lr: float = 6e-4, arch_weight_decay: float = 1e-3, channels_last: bool = False,
                 batched_edges: bool = False, steps: int = 4):
    """A search network with the recipe's two optimizers (SGD for weights, Adam(0.5, 0.999) for alphas/betas),
    built as `search.Searcher` builds them: (model, arch_params, weight_params, a_opt, w_opt). `steps`: the
    intermediate nodes of a cell (the recipe's 4; fewer make a smaller cell of the same code paths)."""
    from .models import SearchNetwork

    torch.manual_seed(seed)
    model = SearchNetwork(C, num_classes, layers, steps=steps, multiplier=steps, partial_k=partial_k,
                          batched_edges=batched_edges).to(device)
    if channels_last:
        to_channels_last(model)
    arch, weights = model.arch_parameters(), model.weight_parameters()
    w_opt = torch.optim.SGD(weights, lr=lr, momentum=momentum, weight_decay=weight_decay)
    a_opt = torch.optim.Adam(arch, lr=arch_lr, betas=(0.5, 0.999), weight_decay=arch_weight_decay)
    return model, arch, weights, a_opt, w_opt


def _warmup(n: int) -> int:
    """Eager passes before a capture: at least one, so that what the model builds and caches at its first call
    (the batched op's index tensors, copied from the host, and its weight-pack plans; cuDNN/Triton choices) is made
    outside the graph, not in its private pool while capturing."""
    if int(n) < 1:
        raise ValueError(f"CUDA graph warm-up passes: {n}, need at least 1")
    return int(n)


class GraphedSearchStep:
    """The PC-DARTS first-order search step with the forward+backward of each half captured as a CUDA graph.

    Semantics are those of `search.Searcher.arch_step` / `weight_step` (the eager reference):
    - arch step: loss on the architecture batch, gradients of the architecture parameters only
      (torch.autograd.grad), averaged by `average_arch`, then `a_opt.step()`;
    - weight step: loss.backward() into the weights' .grad, averaged by `average_weights`, clipped to
      `grad_clip` (0: no clipping), then `w_opt.step()` (a plain optimizer: no Horovod hooks).

    Each graph is captured lazily at its first call, from that call's batch, after `warmup` eager passes on a
    side stream (cuDNN picks its algorithms there). Warm-up and capture change nothing: BN buffers are restored
    and the gradients set to None, so the first replay computes exactly the first eager step. The two graphs
    share one memory pool: that is safe because each call consumes its graph's outputs (gradients, loss,
    logits) before the other graph replays. Do not set the weights' .grad to None between steps (that is what
    optimizer.zero_grad() does): the graph writes into the .grad tensors it allocated at capture.
    Batch shapes must stay the same (drop_last loaders).
    """

    def __init__(self, model: nn.Module, criterion, arch_params, weight_params, a_opt, w_opt, grad_clip: float = 0.0,
                 average_arch=None, average_weights=None, autocast_dtype=None, channels_last: bool = False,
                 warmup: int = 3, freeze_weights: bool = False):
        self.model, self.criterion = model, criterion
        self.arch_params, self.weight_params = list(arch_params), list(weight_params)
        self.a_opt, self.w_opt, self.grad_clip = a_opt, w_opt, grad_clip
        self.average_arch, self.average_weights = average_arch, average_weights
        self.autocast_dtype, self.channels_last, self.warmup = autocast_dtype, channels_last, _warmup(warmup)
        self.freeze_weights = freeze_weights  # the arch step under frozen(weights): for a compiled model
        self.pool = torch.cuda.graph_pool_handle()
        self._arch = None  # (graph, x, y, loss, grads)
        self._weight = None  # (graph, x, y, logits, loss)

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast("cuda", enabled=False)
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def _static(self, x, y):
        mf = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.detach().clone().contiguous(memory_format=mf), y.detach().clone()

    def _arch_fwd_bwd(self, x, y):
        with frozen(self.weight_params if self.freeze_weights else []):
            with self._autocast():
                loss = self.criterion(self.model(x), y)
            grads = torch.autograd.grad(loss, self.arch_params)
        return loss.detach().float(), [g.detach() for g in grads]

    def _weight_fwd_bwd(self, x, y):
        with self._autocast():
            logits = self.model(x)
            loss = self.criterion(logits, y)
        # weights only: the eager step's backward also fills the alphas' .grad, which nobody reads (the arch step
        # replaces them); leaving them out keeps every tensor the graph writes owned by this graph
        torch.autograd.backward(loss, inputs=self.weight_params)
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
        out = [t.clone() for t in grads]
        if self.average_arch is not None:
            out = self.average_arch(out)
        self.a_opt.zero_grad(set_to_none=True)
        for p, t in zip(self.arch_params, out):
            p.grad = t
        self.a_opt.step()
        return loss.clone()

    def weight_step(self, x, y):
        if self._weight is None:
            sx, sy = self._static(x, y)
            g, (logits, loss) = self._capture(self._weight_fwd_bwd, sx, sy, clear=self.weight_params)
            missing = [i for i, p in enumerate(self.weight_params) if p.grad is None]
            if missing:
                raise RuntimeError(f"{len(missing)} weight parameters got no gradient in the captured step")
            self._weight = (g, sx, sy, logits, loss)
        g, sx, sy, logits, loss = self._weight
        sx.copy_(x, non_blocking=True)
        sy.copy_(y, non_blocking=True)
        g.replay()
        grads = [p.grad for p in self.weight_params]
        if self.average_weights is not None:
            avg = self.average_weights(grads)
            with torch.no_grad():
                for t, a in zip(grads, avg):
                    if a is not t:
                        t.copy_(a)
        norm = clip_gradients(self.weight_params, self.grad_clip)
        self.w_opt.step()
        return logits.clone(), loss.clone(), norm


def clip_gradients(params, max_norm: float) -> torch.Tensor:
    """The total norm of the parameters' (averaged) gradients, after clipping them to `max_norm` when it is > 0.
    The same on every rank: the runs' signal that a step diverged (non-finite)."""
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        return nn.utils.clip_grad_norm_(params, max_norm)
    return nn.utils.get_total_norm([p.grad for p in params])


# --- the retraining step (bin/train.py) -------------------------------------------------------------------------
def train_loss(model: nn.Module, criterion, x, y, aux_weight: float = 0.0):
    """The retraining loss of `train.Trainer`: criterion(logits) + aux_weight * criterion(auxiliary logits) (the
    auxiliary term when the network returns auxiliary logits and aux_weight > 0). Returns (logits, loss)."""
    logits, logits_aux = model(x)
    loss = criterion(logits, y)
    if logits_aux is not None and aux_weight > 0:
        loss = loss + aux_weight * criterion(logits_aux, y)
    return logits, loss


class EagerTrainStep:
    """The eager retraining step of one rank without Horovod: `train.Trainer`'s step (forward with drop path and
    auxiliary head, backward, gradients averaged by `average` (None on one rank), clipped to `grad_clip`, then
    `opt.step()`). The reference that GraphedTrainStep is compared with. Drop-path masks come from the CUDA/CPU
    generator as it stands at the call (train.py seeds it per (seed, epoch, step, rank) before each step)."""

    def __init__(self, model: nn.Module, criterion, params, opt, grad_clip: float = 0.0, aux_weight: float = 0.0,
                 average=None, channels_last: bool = False):
        self.model, self.criterion, self.params, self.opt = model, criterion, list(params), opt
        self.grad_clip, self.aux_weight, self.average = grad_clip, aux_weight, average
        self.channels_last = channels_last

    def step(self, x, y):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.opt.zero_grad()
        logits, loss = train_loss(self.model, self.criterion, x, y, self.aux_weight)
        loss.backward()
        have = [p for p in self.params if p.grad is not None]
        if self.average is not None:
            avg = self.average([p.grad for p in have])
            with torch.no_grad():
                for p, a in zip(have, avg):
                    if a is not p.grad:
                        p.grad.copy_(a)
        norm = clip_gradients(have, self.grad_clip)
        self.opt.step()
        return logits.detach(), loss.detach().float(), norm


class GraphedTrainStep:
    """The retraining step (`train.Trainer`'s eager step, see EagerTrainStep) with the forward+backward captured
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
        self.model, self.criterion, self.params, self.opt = model, criterion, list(params), opt
        self.autocast_dtype = autocast_dtype  # bf16 (--bf16): no loss scaling, so it can live in the graph
        self.grad_clip, self.aux_weight, self.average = grad_clip, aux_weight, average
        self.channels_last = channels_last
        self.warmup = _warmup(warmup)
        self.captures = 0
        self._graph = None  # (key, graph, x, y, logits, loss, parameters with a gradient)

    def _fwd_bwd(self, x, y):
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
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
        grads = [p.grad for p in have]
        if self.average is not None:
            avg = self.average(grads)
            with torch.no_grad():
                for t, a in zip(grads, avg):
                    if a is not t:
                        t.copy_(a)
        norm = clip_gradients(have, self.grad_clip)
        self.opt.step()
        return logits.clone(), loss.clone(), norm


def check_fast_flags(args, device: torch.device, world: int) -> None:
    """One clear usage error for fast-path flags that cannot work with this device or these other flags."""
    if getattr(args, "batched_edges", False) and getattr(args, "sync_bn", False):
        raise UsageError("--batched-edges and --sync-bn exclude each other (the batched cells compute their batch "
                         "norms themselves, unsynchronized): drop one")
    if getattr(args, "compile", False):
        if hasattr(args, "batched_edges") and not args.batched_edges:  # the search (train.py has no such flag)
            raise UsageError("--compile needs --batched-edges (the per-edge cells take about 20x longer to compile: "
                             "minutes per cell); add --batched-edges")
        if getattr(args, "sync_bn", False) and world > 1:
            raise UsageError("--compile and --sync-bn exclude each other on several ranks (the synchronized batch "
                             "norms allreduce inside every op): drop one")
    if getattr(args, "cuda_graph", False):
        if device.type != "cuda":
            raise UsageError("--cuda-graph needs a CUDA GPU and this run is on the CPU: drop --cuda-graph")
        for flag, bad in (("--amp", "amp"), ("--sync-bn", "sync_bn"), ("--fp16-allreduce", "fp16_allreduce"),
                          ("--fp64", "fp64")):
            if getattr(args, bad, False) and (bad != "sync_bn" or world > 1):
                raise UsageError(f"--cuda-graph and {flag} exclude each other (the graph holds no collectives "
                                 f"and no loss scaling): drop one")
        if getattr(args, "elastic", False):
            raise UsageError("--cuda-graph is not supported with --elastic yet: drop one")
