"""Faults: every process of a 2-rank search or retraining SIGKILLed part way, or stopped by SIGTERM/SIGUSR1
mid-epoch, then `--resume auto` finishes it with exactly the uninterrupted run's result; a kill during a
checkpoint write, or a full disk, leaves the previous one intact; a rerun never overwrites a finished run unless
asked to."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    REPO_ROOT,
    describe,
    horovodrun_cmd,
    kill_all,
    launch,
    launch_env,
    mpirun_cmd,
    python_exe,
    start,
)

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


ARGS = {"search": SEARCH_ARGS, "train": TRAIN_ARGS}


# The search's faults with 2 ranks (they must agree), the retraining's (the same RunLoop code) in one process.
RANKS = {"search": 2, "train": 1}
KINDS = [pytest.param("search", marks=pytest.mark.ranks), "train"]


def _cmd(kind, *extra, ranks=None):
    args = [*ARGS[kind], *map(str, extra)]
    return horovodrun_cmd(2, args) if (ranks or RANKS[kind]) == 2 else [python_exe(), *args]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """`finished(kind, ranks=2)`: the output folder of an uninterrupted run of ARGS[kind] (once per module)."""
    runs = {}

    def get(kind, ranks=2):
        if (kind, ranks) not in runs:
            out = tmp_path_factory.mktemp(kind) / "full"
            res = launch(_cmd(kind, "--output-dir", out, ranks=ranks), timeout=600)
            assert res.returncode == 0, describe(res)
            runs[kind, ranks] = out
        return runs[kind, ranks]

    return get


def _one_line_per_rank(res, ranks: int, status: int = 2) -> str:
    """The one stderr line that every rank printed, the same on all (no traceback). One process: its exit status
    is `status`; under horovodrun the launcher's own status is non-zero (and it adds its own report, a traceback
    of its RuntimeError, after the ranks' lines)."""
    if ranks == 1:
        assert res.returncode == status and len(res.stderr.strip().splitlines()) == 1, describe(res)
        return res.stderr.strip()
    assert res.returncode != 0, describe(res)
    assert not [ln for ln in res.stderr.splitlines() if ln.startswith("[") and "Traceback" in ln], describe(res)
    lines = {}
    for raw in res.stderr.splitlines():
        m = re.match(r"^\[(?:\d+,)?(\d+)\]<stderr>:(.*)$", raw)  # horovodrun's tags, or mpirun --tag-output's
        if m and m.group(2).strip():
            lines.setdefault(int(m.group(1)), []).append(m.group(2).strip())
    assert sorted(lines) == list(range(ranks)) and all(len(v) == 1 for v in lines.values()), describe(res)
    assert all(v == lines[0] for v in lines.values()), describe(res)
    return lines[0][0]


def _files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.ranks
@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(ARGS))
def test_two_rank_resume_after_sigkill_equals_uninterrupted(kind, finished, tmp_path):
    args, full = ARGS[kind], finished(kind)
    part = tmp_path / "part"
    epoch = _kill_part_way(args, part, tmp_path)
    assert 1 <= epoch < 4, "the kill came too late to test a resume"
    res = launch(horovodrun_cmd(2, [*args, "--output-dir", part, "--resume", "auto"]), timeout=600)
    assert res.returncode == 0, describe(res)
    assert f"resumed from {part / 'checkpoint.pt'} at epoch {epoch}" in res.stdout
    a, b = _model(full), _model(part)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"
    if kind == "search":
        ga = json.loads((full / "genotype.json").read_text())
        gb = json.loads((part / "genotype.json").read_text())
        assert ga["genotype"] == gb["genotype"]
    epochs = [json.loads(line)["epoch"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", KINDS)
def test_rerun_into_a_finished_run_is_refused_unless_overwrite(kind, finished, tmp_path):
    """The same command again into a finished run's folder: one line naming --resume auto and --overwrite (on
    every rank), status 2, the folder byte-for-byte as it was; with --overwrite a new run replaces it."""
    run = tmp_path / "run"
    shutil.copytree(finished(kind, RANKS[kind]), run)
    before = _files(run)
    res = launch(_cmd(kind, "--output-dir", run), timeout=300)
    line = _one_line_per_rank(res, RANKS[kind])
    assert "already holds a run" in line and "--resume auto" in line and "--overwrite" in line, line
    assert _files(run) == before
    (run / "notes.txt").write_text("mine")  # not a run's output: --overwrite keeps it
    res = launch(_cmd(kind, "--epochs", "2", "--steps-per-epoch", "1", "--output-dir", run, "--overwrite",
                      ranks=1), timeout=300)
    assert res.returncode == 0, describe(res)
    log = (run / "log.txt").read_text()
    assert "--overwrite: replaced the earlier run" in log and "checkpoint.pt" in log, log
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_stops_every_rank_with_exit_3(kind, finished, tmp_path):
    """A finished run resumed for two more epochs at --lr 1e6: every rank stops in the first of them with one
    line `non-finite <train|arch|valid> loss at epoch 5 step S`, status 3; checkpoint, genotype and metrics stay
    the finished run's."""
    run = tmp_path / "run"
    shutil.copytree(finished(kind, RANKS[kind]), run)
    before = _files(run)
    res = launch(_cmd(kind, "--epochs", "6", "--lr", "1e6", "--output-dir", run, "--resume", "auto"), timeout=300)
    line = _one_line_per_rank(res, RANKS[kind], status=3)
    assert re.match(r"^train(_search)?\.py: error: non-finite (train|arch|valid) loss at epoch 5 step [1-3]: ",
                    line), line
    for name in ("checkpoint.pt", "metrics.jsonl", "genotype.json" if kind == "search" else "best.pt"):
        assert _files(run)[name] == before[name], name


@pytest.mark.parametrize("kind", KINDS)
def test_a_full_disk_keeps_the_previous_checkpoint(kind, finished, tmp_path):
    """The run folder on a tmpfs with room for one checkpoint, not two: the second epoch's checkpoint write fails,
    every rank stops with the same line (status 1), the first checkpoint loads, no temporary file is left."""
    size = (finished(kind, RANKS[kind]) / "checkpoint.pt").stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    # one checkpoint (train: and its best.pt twin) and the small files, not a second checkpoint beside it
    room = size * (2 if kind == "train" else 1) + min(size // 2, 512 * 1024)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "run"
        res = launch(_cmd(kind, "--output-dir", out), timeout=300)
        line = _one_line_per_rank(res, RANKS[kind], status=1)
        assert "cannot write the run's outputs" in line and "No space left on device" in line, line
        assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


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


def _stopped_from_outside(cmd, out, sig, tmp_path) -> subprocess.CompletedProcess:
    """Start `cmd`; once the first epoch's checkpoint exists, send `sig` to the launched process (one rank's own
    process, or mpirun, which forwards SIGUSR1 to every rank); its result once it ends."""
    files = [open(tmp_path / name, "w+") for name in ("stop.out", "stop.err")]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=files[0], stderr=files[1], stdin=subprocess.DEVNULL,
                            env=launch_env(), cwd=str(REPO_ROOT), start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=600)
    finally:
        kill_all(str(out), proc)
    texts = []
    for f in files:
        f.seek(0)
        texts.append(f.read())
        f.close()
    return subprocess.CompletedProcess(cmd, proc.returncode, *texts)


# How the stop signal comes: NAME@STEP[:RANK] = the testing aid --raise-signal (that rank, or every rank, sends
# itself SIGNAME after global step STEP: a fixed step mid-epoch), else from outside once the first epoch is saved.
STOPS = [
    pytest.param("search", 2, "USR1@5:1", marks=pytest.mark.ranks, id="search-2ranks-one-rank-signalled"),
    pytest.param("train", 2, "mpirun-USR1", marks=pytest.mark.ranks, id="train-2ranks-usr1-to-mpirun"),
    pytest.param("search", 1, "TERM@4", id="search-1rank"),
    pytest.param("train", 1, "outside-TERM", id="train-1rank-sigterm"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kind,ranks,how", STOPS)
def test_a_stop_signal_checkpoints_the_step_and_resume_equals_uninterrupted(kind, ranks, how, finished, tmp_path):
    """SIGTERM or SIGUSR1, to every rank or to one: every rank stops after the step in progress with one line
    `stopped by SIG... at epoch E step S` and status 75, rank 0's checkpoint holds that step (and each rank's BN
    statistics); `--resume auto` continues there (`resumed from ... at epoch E step S`) and ends equal to the
    uninterrupted run: parameters, BN statistics, genotype and every epoch's metrics to 1e-6."""
    full, part = finished(kind, ranks), tmp_path / "part"
    if "@" in how:
        res = launch(_cmd(kind, "--output-dir", part, "--raise-signal", how, ranks=ranks), timeout=600)
    elif how == "mpirun-USR1":
        cmd = mpirun_cmd(2, [*ARGS[kind], "--output-dir", part])
        res = _stopped_from_outside([cmd[0], "--tag-output", *cmd[1:]], part, signal.SIGUSR1, tmp_path)
        assert res.returncode == 75, describe(res)  # mpirun passes the ranks' status on
    else:
        res = _stopped_from_outside(_cmd(kind, "--output-dir", part, ranks=1), part, signal.SIGTERM, tmp_path)
    line = _one_line_per_rank(res, ranks, status=75)
    m = re.match(r"^train(?:_search)?\.py: stopped by (SIGTERM|SIGUSR1) (at epoch (\d) step (\d)|after epoch \d): "
                 r"checkpoint\.pt written; continue with --resume auto$", line)
    assert m, line
    assert m.group(1) == ("SIGTERM" if "TERM" in how else "SIGUSR1")
    ckpt = torch.load(part / "checkpoint.pt", weights_only=True)
    if "@" in how:  # 3 steps per epoch
        assert (m.group(3), m.group(4)) == {"USR1@5:1": ("2", "2"), "TERM@4": ("2", "1")}[how], line
    if m.group(3):
        assert (ckpt["epoch"] + 1, ckpt["step"]) == (int(m.group(3)), int(m.group(4)))
        assert len(ckpt["rank_buffers"]) == ranks
    assert line.split(": ", 1)[1] in (part / "log.txt").read_text()

    res = launch(_cmd(kind, "--output-dir", part, "--resume", "auto", ranks=ranks), timeout=600)
    assert res.returncode == 0, describe(res)
    if m.group(3):
        assert f"resumed from {part / 'checkpoint.pt'} at epoch {m.group(3)} step {m.group(4)}" in res.stdout
    a, b = _model(full), _model(part)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, part)]
    assert [r["epoch"] for r in rows[1]] == [0, 1, 2, 3]
    for ra, rb in zip(*rows):
        for key in ra:
            if key.endswith(("loss", "acc", "top1", "top5")):
                assert abs(ra[key] - rb[key]) <= 1e-6 * max(1.0, abs(ra[key])), (key, ra, rb)
    if kind == "search":
        assert [r["genotype"] for r in rows[0]] == [r["genotype"] for r in rows[1]]


def test_atomic_writes_give_ordinary_file_permissions(tmp_path):
    """Outputs are readable as any new file is (0666 less the umask), not private as a bare temporary file."""
    from hvd_pcdarts.checkpoint import atomic_save, atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(str(tmp_path / "a.json"), "{}\n")
        atomic_save({"x": torch.zeros(1)}, str(tmp_path / "c.pt"))
    finally:
        os.umask(old)
    for name in ("a.json", "c.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
