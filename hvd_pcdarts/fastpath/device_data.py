"""`--gpu-data`: the training images stay on the device as uint8 (CIFAR-10: 150 MB) and a whole batch is
augmented there in a few kernels (pad + random crop + horizontal flip [+ cutout], to float, normalize). The random
numbers are drawn per sample from the same seeded CPU generator, in the same order, as `data.SeededView` +
`data.make_transform` draw them, so a batch is *bit for bit* the eager loader's batch (same samples, same crops,
same flips, same values): results do not change with `--gpu-data`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import UsageError


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
        from ..data import _mix

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
