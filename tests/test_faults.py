"""Faults: every process of a 2-rank search or retraining SIGKILLed part way, then `--resume auto` finishes it
with exactly the uninterrupted run's result; a kill during a checkpoint write leaves the previous one intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO_ROOT, describe, horovodrun_cmd, kill_all, launch, launch_env, start

SEARCH = str(REPO_ROOT / "bin" / "train_search.py")
TRAIN = str(REPO_ROOT / "bin" / "train.py")
COMMON = ["--dataset", "digits", "--init-channels", "8", "--layers", "3", "--workers", "0", "--no-tensorboard",
          "--no-progress", "--eval-steps", "2"]
SEARCH_ARGS = [SEARCH, *COMMON, "--epochs", "4", "--arch-start-epoch", "1", "--batch-size", "64",
               "--steps-per-epoch", "3", "--seed", "5"]
TRAIN_ARGS = [TRAIN, "--genotype", "PCDARTS", *COMMON, "--epochs", "4", "--batch-size", "64", "--steps-per-epoch",
              "3", "--seed", "5", "--cutout-length", "4", "--drop-path-prob", "0.2", "--lr", "0.05"]


def _model(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]


def _kill_part_way(args, out, tmp_path):
    """Start a 2-rank run, SIGKILL every process once the first checkpoint exists, return its epoch."""
    proc = start(horovodrun_cmd(2, [*args, "--output-dir", out]), tmp_path / "killed.log")
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not (out / "checkpoint.pt").exists():
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "killed.log").read_text()[-3000:])
            time.sleep(0.1)
    finally:
        kill_all(str(out), proc)
    return torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]


@pytest.mark.ranks
@pytest.mark.slow
@pytest.mark.parametrize("args", [SEARCH_ARGS, TRAIN_ARGS], ids=["search", "train"])
def test_two_rank_resume_after_sigkill_equals_uninterrupted(args, tmp_path):
    full = tmp_path / "full"
    res = launch(horovodrun_cmd(2, [*args, "--output-dir", full]), timeout=600)
    assert res.returncode == 0, describe(res)
    part = tmp_path / "part"
    epoch = _kill_part_way(args, part, tmp_path)
    assert 1 <= epoch < 4, "the kill came too late to test a resume"
    res = launch(horovodrun_cmd(2, [*args, "--output-dir", part, "--resume", "auto"]), timeout=600)
    assert res.returncode == 0, describe(res)
    assert f"resumed from {part / 'checkpoint.pt'} at epoch {epoch}" in res.stdout
    a, b = _model(full), _model(part)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"
    if args is SEARCH_ARGS:
        ga = json.loads((full / "genotype.json").read_text())
        gb = json.loads((part / "genotype.json").read_text())
        assert ga["genotype"] == gb["genotype"]
    epochs = [json.loads(line)["epoch"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]


_SLOW_SAVE = r"""
import os, sys, time, torch
sys.path.insert(0, sys.argv[2])
from hvd_pcdarts import checkpoint
real_fsync = os.fsync
def slow_fsync(fd):
    print("writing", flush=True)
    time.sleep(60)
    real_fsync(fd)
checkpoint.os.fsync = slow_fsync
checkpoint.atomic_save({"format": "x", "w": torch.full((1000,), 2.0)}, sys.argv[1])
"""


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    from hvd_pcdarts.checkpoint import atomic_save, load_checkpoint

    path = tmp_path / "checkpoint.pt"
    atomic_save({"format": "x", "w": torch.ones(1000)}, str(path))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(path), str(REPO_ROOT)], env=launch_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # the new bytes are in the temporary file now
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = load_checkpoint(str(path))
    assert torch.equal(ck["w"], torch.ones(1000))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    assert leftovers and all(n.startswith(".checkpoint.pt.") and n.endswith(".tmp") for n in leftovers)
    # the next run's output folder setup removes the dead write's temporary file
    from hvd_pcdarts.checkpoint import remove_stale_temporaries

    remove_stale_temporaries(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
