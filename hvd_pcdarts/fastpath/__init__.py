"""Fast paths of the search and retraining steps, each computing what the eager step of `steps.py` computes and
checked against it (tests/test_fastpath.py and tests/test_compile.py on the CPU; the CUDA-graph paths in
benchmarks/run_device.sh on a GPU):

- `device_data`: `--gpu-data`, the training set on the device as uint8, batches augmented there;
- `compile`: `--compile`, torch.compile of the search cells or of the retraining network's ops;
- `graphs`: `--cuda-graph`, each step's forward+backward replayed from a CUDA graph;
- here: `--channels-last`, the checks of the flags against device and each other, and `build_search`, the search
  network with the recipe's optimizers for the benchmarks and tests.

Nothing here imports Horovod: gradient averaging is passed in as a function.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UsageError
from ..steps import search_optimizers
from .compile import compile_cells, compile_note, compile_ops, uncompiled
from .device_data import AugmentSpec, DeviceImages, DeviceLoader, augment_batch, augment_spec, draw_params
from .graphs import BNSnapshot, GraphedSearchStep, GraphedTrainStep

__all__ = ["AugmentSpec", "BNSnapshot", "DeviceImages", "DeviceLoader", "GraphedSearchStep", "GraphedTrainStep",
           "augment_batch", "augment_spec", "build_search", "check_fast_flags", "compile_cells", "compile_note",
           "compile_ops", "draw_params", "to_channels_last", "uncompiled"]


def to_channels_last(model: nn.Module) -> nn.Module:
    """4-d weights in NHWC order, so that convolutions produce NHWC outputs (with NHWC inputs: any).

    1x1 kernels stay in the standard layout: for them both layouts hold the same order, but NHWC strides of a
    (O, I, 1, 1) tensor have a last stride of I, which byte views (dist.horovod.tensors_checksum) refuse."""
    model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4 and p.stride(-1) != 1:
                p.data = p.data.clone(memory_format=torch.contiguous_format)
    return model


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


def build_search(C: int = 16, layers: int = 8, partial_k: int = 4, num_classes: int = 10, seed: int = 2,
                 device="cpu", lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 3e-4,
                 arch_lr: float = 6e-4, arch_weight_decay: float = 1e-3, channels_last: bool = False,
                 batched_edges: bool = False, steps: int = 4, batched_options=None):
    """A search network with the recipe's two optimizers (SGD for weights, Adam(0.5, 0.999) for alphas/betas),
    built as `search.Searcher` builds it: (model, arch_params, weight_params, a_opt, w_opt). `steps`: the
    intermediate nodes of a cell (the recipe's 4; fewer make a smaller cell of the same code paths);
    `batched_options`: a models.batched_options.BatchedOptions for the batched cells (default: the defaults)."""
    from ..models import SearchNetwork

    torch.manual_seed(seed)
    model = SearchNetwork(C, num_classes, layers, steps=steps, multiplier=steps, partial_k=partial_k,
                          batched_edges=batched_edges, batched_options=batched_options).to(device)
    if channels_last:
        to_channels_last(model)
    w_opt, a_opt = search_optimizers(model, lr, momentum, weight_decay, arch_lr, arch_weight_decay)
    return model, model.arch_parameters(), model.weight_parameters(), a_opt, w_opt
