"""Comparing two finished train_search.py runs (tests of the fast paths that must not change a run), and a few
search steps of the eager and the CUDA-graphed step on a GPU."""

from __future__ import annotations

import json
import os

import torch

# A 2-rank float64 search (3 layers, two epochs of two arch + weight steps) with Horovod's per-tensor hooks
# (--grad-allreduce overlap): the batched-edge and compile equivalence tests compare their runs of it, and share the
# one both need (the conftest's `two_rank_search` runs each argument list once).
HOOKED_FP64 = ["--dataset", "digits", "--init-channels", "8", "--layers", "3", "--workers", "0", "--no-tensorboard",
               "--no-progress", "--epochs", "2", "--arch-start-epoch", "0", "--batch-size", "32", "--steps-per-epoch",
               "2", "--eval-steps", "1", "--no-augment", "--fp64", "--seed", "3", "--grad-allreduce", "overlap"]


def final_state(out):
    """(the checkpoint's model state_dict, the metrics.jsonl rows) of the run in output dir `out`."""
    model = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return model, metrics


def assert_same_runs(a, b, epochs=(0, 1)):
    """Two final_state()s of float64 runs: every checkpoint entry and every epoch's losses equal."""
    (ma, ra), (mb, rb) = a, b
    assert list(ma) == list(mb)
    for k in ma:
        assert torch.allclose(ma[k].double(), mb[k].double(), rtol=1e-7, atol=1e-9), k
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb] == list(epochs)
    for x, y in zip(ra, rb):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-9 and abs(x["valid_loss"] - y["valid_loss"]) < 1e-9


def cuda_search_steps(mode: str, batched: bool = False, channels_last: bool = False, steps: int = 3, options=None):
    """`steps` arch + weight steps of fastpath's EagerSearchStep (mode "eager") or GraphedSearchStep ("graph") on
    the GPU, from the same initial weights and batches: (losses, parameters, floating-point buffers). `options`:
    the batched cells' BatchedOptions."""
    import torch.nn as nn

    from hvd_pcdarts import fastpath as fp
    from hvd_pcdarts.steps import SearchStep

    model, arch, weights, a_opt, w_opt = fp.build_search(8, 5, 4, seed=4, device="cuda", channels_last=channels_last,
                                                         batched_edges=batched, batched_options=options)
    cls = fp.GraphedSearchStep if mode == "graph" else SearchStep
    step = cls(model, nn.CrossEntropyLoss(), arch, weights, a_opt, w_opt, grad_clip=5.0, channels_last=channels_last)
    g = torch.Generator().manual_seed(9)
    losses = []
    for _ in range(steps):
        xa, ya = torch.randn(8, 3, 16, 16, generator=g).cuda(), torch.randint(0, 10, (8,), generator=g).cuda()
        xw, yw = torch.randn(8, 3, 16, 16, generator=g).cuda(), torch.randint(0, 10, (8,), generator=g).cuda()
        losses += [float(step.arch_step(xa, ya)), float(step.weight_step(xw, yw)[1])]
    return (losses, [p.detach().clone() for p in model.parameters()],
            [b.detach().clone() for b in model.buffers() if b.is_floating_point()])


def rel_diff(ref, new) -> float:
    """||new - ref|| / ||ref|| over lists of tensors."""
    num = sum(float((a - b).double().pow(2).sum()) for a, b in zip(ref, new)) ** 0.5
    return num / sum(float(a.double().pow(2).sum()) for a in ref) ** 0.5
