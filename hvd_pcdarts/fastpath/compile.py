"""`--compile`: torch.compile of the search cells (with `--batched-edges`) and of the retraining network's ops."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


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
