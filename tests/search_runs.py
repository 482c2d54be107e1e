"""Comparing two finished train_search.py runs (tests of the fast paths that must not change a run)."""

from __future__ import annotations

import json
import os

import torch


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
