"""Horovod Elastic: a search started on 3 workers loses one to SIGKILL mid-epoch and finishes on the other 2.

Real processes: `horovodrun -np 3 --min-np 2 --max-np 3 --host-discovery-script hostfiles/discover_hosts.sh`
with three host names of this machine (Horovod blacklists the whole host of a failed worker, so each worker
gets a host name of its own: localhost, 127.0.0.1 and the machine's name or address).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

import pytest
from helpers import REPO_ROOT, find_exe, kill_all, process_env, processes_with, python_exe, start

SCRIPT = str(REPO_ROOT / "bin" / "train_search.py")
TRAIN = str(REPO_ROOT / "bin" / "train.py")
DISCOVER = str(REPO_ROOT / "hostfiles" / "discover_hosts.sh")
COMMIT = 3
STEPS = 6  # per epoch: two commits an epoch (kept small: 3 ranks on a 2-core machine)
ARGS = ["--dataset", "digits", "--init-channels", "8", "--layers", "3", "--workers", "0", "--no-tensorboard",
        "--no-progress", "--epochs", "3", "--arch-start-epoch", "1", "--batch-size", "48",
        "--steps-per-epoch", str(STEPS), "--eval-steps", "1", "--elastic", "--commit-interval", str(COMMIT)]
TRAIN_ARGS = ["--genotype", "PCDARTS", "--dataset", "digits", "--init-channels", "8", "--layers", "3", "--workers",
              "0", "--no-tensorboard", "--no-progress", "--epochs", "3", "--batch-size", "48", "--steps-per-epoch",
              str(STEPS), "--eval-steps", "1", "--cutout-length", "4", "--lr", "0.05", "--elastic", "--commit-interval",
              str(COMMIT)]


def _local_names() -> list[str]:
    try:
        from horovod.runner.util.network import get_local_host_addresses
    except Exception:
        return []
    local = get_local_host_addresses()
    names = []
    for cand in ["localhost", "127.0.0.1", socket.gethostname(), *sorted(local)]:
        try:
            addr = socket.gethostbyname(cand)
        except OSError:
            continue
        if addr in local and cand not in names:
            names.append(cand)
    return names


def _wait_for(pred, timeout, proc, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (status {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _elastic_job(tmp_path, script_args, np_: int, start_hosts: int, after_epoch1):
    """Run an elastic job on `start_hosts` of three local host names (-np np_, --min-np 2, --max-np 3); once
    epoch 1 is in metrics.jsonl call after_epoch1(first_metrics_record, workers by rank, hosts_file, names).
    Returns (exit status, log text, metrics records)."""
    names = _local_names()
    if len(names) < 3 or not find_exe("horovodrun"):
        pytest.skip(f"needs horovodrun and three host names of this machine (found {names})")
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"{n}:1\n" for n in names[:start_hosts]))
    out = tmp_path / "out"
    cmd = [find_exe("horovodrun"), "-np", str(np_), "--min-np", "2", "--max-np", "3", "--host-discovery-script",
           DISCOVER, python_exe(), *script_args, "--output-dir", out]
    log = tmp_path / "log.txt"
    proc = start(cmd, log, env={"HVD_PCDARTS_HOSTS_FILE": hosts})
    metrics = out / "metrics.jsonl"
    try:
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 400, proc, "epoch 1")
        workers = {process_env(p).get("HOROVOD_RANK"): p for p in processes_with(str(out))
                   if process_env(p).get("HOROVOD_ELASTIC") == "1"}
        after_epoch1(json.loads(metrics.read_text().splitlines()[0]), workers, hosts, names)
        proc.wait(timeout=600)
    finally:
        kill_all(str(out), proc)
    recs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return proc.returncode, log.read_text(), recs


def _kill_mid_epoch(rank: int):
    def act(first, workers, hosts, names):
        assert first["world_size"] == 3 and set(workers) >= {"0", "1", "2"}, workers
        time.sleep(0.4 * first["epoch_time_s"])  # the middle of the second epoch
        os.kill(workers[str(rank)], signal.SIGKILL)
    return act


@pytest.mark.ranks
@pytest.mark.slow
@pytest.mark.parametrize("victim,comm", [(2, "flat"), (0, "overlap")], ids=["kill-rank2-flat", "kill-rank0-overlap"])
def test_elastic_search_survives_a_killed_worker(tmp_path, victim, comm):
    """comm: how the weight gradients are averaged (--grad-allreduce): flat (the CPU default) and overlap
    (hvd.DistributedOptimizer's hooks, the GPU default) both survive a reset."""
    trace = tmp_path / "trace"
    rc, text, recs = _elastic_job(tmp_path, [SCRIPT, *ARGS, "--trace-indices", trace, "--grad-allreduce", comm], 3, 3,
                                  _kill_mid_epoch(victim))
    assert rc == 0, text[-5000:]
    # a valid genotype
    from hvd_pcdarts.space.genotypes import load_genotype

    geno = load_genotype(str(tmp_path / "out" / "genotype.json"))
    assert len(geno.normal) == 8 and len(geno.reduce) == 8
    # every epoch once; 3 workers before the kill, 2 after
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    assert recs[0]["world_size"] == 3 and recs[2]["world_size"] == 2
    # the survivors agree on every parameter (checked over ranks at every epoch end and at the end)
    assert re.search(r"all 2 rank\(s\) hold identical parameters", text), text[-3000:]
    m = re.search(r"elastic: (\d+) reset\(s\), (\d+) step\(s\) redone", text)
    assert m, text[-3000:]
    resets, redone = int(m.group(1)), int(m.group(2))
    assert resets == 1 and 0 <= redone <= COMMIT
    # the traces show every step of every epoch (the killed worker's only up to its last commit)
    steps = {(r["epoch"], r["step"]) for f in trace.iterdir() for r in map(json.loads, f.read_text().splitlines())
             if r["kind"] == "weight"}
    assert sorted(steps) == [(e, s) for e in range(3) for s in range(STEPS)]
    print(f"elastic (rank {victim} killed): {redone} step(s) redone")


@pytest.mark.ranks
@pytest.mark.slow
def test_elastic_retraining_survives_a_killed_worker(tmp_path):
    rc, text, recs = _elastic_job(tmp_path, [TRAIN, *TRAIN_ARGS], 3, 3, _kill_mid_epoch(1))
    assert rc == 0, text[-5000:]
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    assert recs[0]["world_size"] == 3 and recs[2]["world_size"] == 2
    m = re.search(r"all 2 rank\(s\) hold identical parameters .*elastic: 1 reset\(s\), (\d+) step\(s\) redone", text)
    assert m and int(m.group(1)) <= COMMIT, text[-3000:]
    import torch

    ck = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 3 and ck["world_size"] == 2
    print(f"elastic retraining (rank 1 killed): {m.group(1)} step(s) redone")


@pytest.mark.ranks
@pytest.mark.slow
def test_elastic_search_takes_in_a_new_worker(tmp_path):
    """A host added to the discovery file joins the running job: it is synced from rank 0 (no collective before
    the elastic loop, so it cannot hang), and the rest of the work is split over 3 ranks."""
    def add_host(first, workers, hosts, names):
        hosts.write_text("".join(f"{n}:1\n" for n in names[:3]))

    rc, text, recs = _elastic_job(tmp_path, [SCRIPT, *ARGS], 2, 2, add_host)
    assert rc == 0, text[-5000:]
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    assert recs[0]["world_size"] == 2 and recs[-1]["world_size"] == 3
    assert re.search(r"all 3 rank\(s\) hold identical parameters", text), text[-3000:]


def test_a_reset_without_horovods_sync_syncs_before_the_loop_goes_on():
    """Horovod skips state.sync() after a removal-only host update; a worker joining the same re-formed ring
    syncs all the same, so the survivors must too before their next collective (else: a hang, the new worker in
    its broadcasts, the survivors in the next allgather). ensure_synced() syncs once after every reset, never
    twice. Size-1 Horovod in this process."""
    import torch.nn as nn

    from hvd_pcdarts.dist import horovod as dist

    dist.init()
    st = dist.elastic_state({"model": nn.Linear(2, 2)}, epoch=0)
    calls = []
    real_sync = st.sync
    st.sync = lambda: (calls.append(1), real_sync())
    st.sync()  # what Horovod's wrapper does first
    st.ensure_synced()
    assert len(calls) == 1  # synced since the start: nothing more
    st.on_reset()  # a reset whose HostsUpdatedInterrupt said skip_sync
    st.ensure_synced()
    st.ensure_synced()
    assert len(calls) == 2
    st.on_reset()
    st.sync()  # a reset after which Horovod did sync
    st.ensure_synced()
    assert len(calls) == 3
