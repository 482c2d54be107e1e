"""Real two-node runs on one machine: hosts node0 and node1 are network namespaces on a private bridge, each with
its own address, host name and sshd; jobs are launched over SSH from a third namespace, the controller `ctl`
(see tests/cluster/cluster.sh). 1 slot per node.

- search + retrain under `horovodrun -H node0:1,node1:1 --network-interfaces hvdeth0` (Gloo), `horovodrun
  --hostfile hostfiles/two_nodes_1slot` (Gloo, interfaces found by horovodrun itself) and `mpirun -H node0,node1`
  with the flags of docs/launch.md: the same genotype (and retraining) as the same 2-rank run on localhost;
- the cluster doctor under each launcher places rank 0 on node0 and rank 1 on node1, and names node1 when the
  dataset is missing there only;
- a cut link (node1's veth down mid-search): without --elastic every rank ends within a bounded time with a clear
  error and the last checkpoint intact; with --elastic and a discovery script that drops node1, the search
  finishes on node0.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import torch
from helpers import REPO_ROOT, describe, find_exe, horovodrun_cmd, launch, output_lines, python_exe

pytestmark = [pytest.mark.slow, pytest.mark.ranks]

SEARCH = str(REPO_ROOT / "bin" / "train_search.py")
TRAIN = str(REPO_ROOT / "bin" / "train.py")
DOCTOR = str(REPO_ROOT / "bin" / "doctor.py")
HOSTFILE = str(REPO_ROOT / "hostfiles" / "two_nodes_1slot")
DISCOVER = str(REPO_ROOT / "hostfiles" / "discover_hosts.sh")
IFACE = "hvdeth0"
TINY = ["--dataset", "digits", "--init-channels", "8", "--layers", "3", "--workers", "0", "--no-tensorboard",
        "--no-progress", "--eval-steps", "2"]
# architecture steps from epoch 0, so the genotype depends on the distributed arch gradients
SEARCH_ARGS = TINY + ["--epochs", "2", "--arch-start-epoch", "0", "--batch-size", "32", "--steps-per-epoch", "2",
                      "--no-augment", "--seed", "3"]
TRAIN_ARGS = TINY + ["--batch-size", "32", "--epochs", "1", "--steps-per-epoch", "2", "--seed", "0",
                     "--cutout-length", "4", "--drop-path-prob", "0.1"]
# a Gloo collective that waits longer than this fails (Horovod's default is 30 s); shorter than the ssh
# keep-alive of the test cluster (5 s x 6), so the surviving rank reports the failure before ssh does
GLOO_TIMEOUT = 15
ROW = re.compile(r"^(\d+)\s{2,}(\S+)\s{2,}")
LAUNCHERS = ["horovodrun", "horovodrun-hostfile", "mpirun"]


def _horovodrun() -> str:
    exe = find_exe("horovodrun")
    if exe is None:
        pytest.fail("horovodrun not found in .venv/bin or on PATH: run `make setup`")
    return exe


def launcher_cmd(kind: str, args: list, extra: list | None = None) -> list:
    """The command line a user would type on the head node, for 2 ranks on node0 and node1."""
    py = python_exe()
    extra = list(extra or [])
    if kind == "horovodrun":
        return [_horovodrun(), "--gloo", "-np", "2", "-H", "node0:1,node1:1", "--network-interfaces", IFACE,
                *extra, py, *args]
    if kind == "horovodrun-hostfile":  # no --network-interfaces: horovodrun finds the common interface itself
        return [_horovodrun(), "--gloo", "-np", "2", "--hostfile", HOSTFILE, *extra, py, *args]
    if kind == "mpirun":
        exe = find_exe("mpirun")
        if exe is None:
            pytest.skip("mpirun (Open MPI) is not installed")
        return [exe, "-np", "2", "-H", "node0,node1", "-bind-to", "none", "-map-by", "slot",
                "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "PYTHONUNBUFFERED",
                "-mca", "pml", "ob1", "-mca", "btl", "^openib",
                "-mca", "btl_tcp_if_include", IFACE, "-mca", "oob_tcp_if_include", IFACE, *extra, py, *args]
    raise ValueError(kind)


def _genotype(out):
    return json.loads((out / "genotype.json").read_text())


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _doctor_hosts(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in map(ROW.match, output_lines(text)) if m}


@pytest.fixture(scope="module")
def localhost_reference(tmp_path_factory):
    """The same search and retraining, 2 ranks on localhost (no SSH, no second host)."""
    base = tmp_path_factory.mktemp("localhost")
    res = launch(horovodrun_cmd(2, [SEARCH, *SEARCH_ARGS, "--output-dir", base / "search"]), timeout=600)
    assert res.returncode == 0, describe(res)
    res = launch(horovodrun_cmd(2, [TRAIN, "--genotype", base / "search" / "genotype.json", *TRAIN_ARGS,
                                    "--output-dir", base / "train"]), timeout=600)
    assert res.returncode == 0, describe(res)
    return base


def test_hostfile_is_horovodrun_clean():
    from horovod.runner.common.util.hosts import parse_host_files

    assert parse_host_files(HOSTFILE) == "node0:1,node1:1"


@pytest.mark.parametrize("kind", LAUNCHERS)
def test_doctor_search_and_retrain_across_two_nodes(cluster, localhost_reference, kind, tmp_path):
    # the doctor: one rank on each node, all consistent
    res = cluster.ctl(launcher_cmd(kind, [DOCTOR, "--dataset", "digits", "--output-dir", tmp_path / "search"]),
                      timeout=180)
    assert res.returncode == 0, describe(res)
    assert _doctor_hosts(res.stdout) == {0: "node0", 1: "node1"}, describe(res)
    assert "on 2 host(s)" in res.stdout and "doctor: OK" in res.stdout, describe(res)

    # the search: same genotype and architecture as on localhost
    out = tmp_path / "search"
    res = cluster.ctl(launcher_cmd(kind, [SEARCH, *SEARCH_ARGS, "--output-dir", out]), timeout=600)
    assert res.returncode == 0, describe(res)
    ref = _genotype(localhost_reference / "search")
    got = _genotype(out)
    assert got["genotype"] == ref["genotype"]
    for k in ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"):
        diff = float((torch.tensor(got[k]) - torch.tensor(ref[k])).abs().max())
        assert diff < 1e-5, f"{k} differs from the localhost run by {diff}"
    assert [m["world_size"] for m in _metrics(out)] == [2, 2]

    # the retraining of that genotype: same losses and accuracies as on localhost
    tr = tmp_path / "train"
    res = cluster.ctl(launcher_cmd(kind, [TRAIN, "--genotype", out / "genotype.json", *TRAIN_ARGS,
                                          "--output-dir", tr]), timeout=600)
    assert res.returncode == 0, describe(res)
    (m,) = _metrics(tr)
    (r,) = _metrics(localhost_reference / "train")
    assert m["world_size"] == 2
    for key in ("train_loss", "test_loss", "test_top1", "test_top5"):
        assert m[key] == pytest.approx(r[key], rel=1e-5, abs=1e-6), (key, m, r)
    assert (tr / "checkpoint.pt").exists() and (tr / "best.pt").exists()


def _fake_cifar10(root):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (base / name).write_bytes(b"x" * 100)
    return root


@pytest.mark.parametrize("kind", ["horovodrun", "mpirun"])
def test_doctor_names_the_node_without_data(cluster, kind, tmp_path):
    data = _fake_cifar10(tmp_path / "data")  # one path, seen by every node ...
    cluster.hide("node1", data)  # ... except node1, where jobs find an empty folder there
    try:
        res = cluster.ctl(launcher_cmd(kind, [DOCTOR, "--dataset", "cifar10", "--data-dir", data,
                                              "--output-dir", tmp_path / "o"]), timeout=180)
    finally:
        cluster.unhide("node1")
    assert res.returncode == 1 if kind == "mpirun" else res.returncode != 0, describe(res)
    assert _doctor_hosts(res.stdout) == {0: "node0", 1: "node1"}, describe(res)
    problems = [ln for ln in output_lines(res.stdout) if ln.startswith("PROBLEM:")]
    assert any(ln.startswith("PROBLEM: data: cifar10 missing on host node1 (rank 1:") for ln in problems), problems
    assert not any("node0" in ln for ln in problems), problems
    assert "doctor: FAILED" in res.stdout


def _wait_for_epochs(proc, out, n, timeout, log):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (status {proc.returncode}) before epoch {n}:\n"
                                 f"{log.read_text()[-6000:]}")
        time.sleep(0.3)
    raise AssertionError(f"no epoch {n} within {timeout} s:\n{log.read_text()[-6000:]}")


def _stop(proc):
    if proc.poll() is None:
        subprocess.run(["kill", "-9", f"-{proc.pid}"], capture_output=True)
        proc.wait()


FAULT_ARGS = TINY + ["--epochs", "12", "--arch-start-epoch", "0", "--batch-size", "32", "--steps-per-epoch", "2",
                     "--no-augment", "--seed", "3"]
BOUND_S = 90  # the job must be over this long after the cut (expected: 15-30 s)


# What bounds the job when a node vanishes: under Gloo the collective timeout (each surviving rank then prints one
# line and exits 1, and horovodrun stops the others); under mpirun TCP keep-alives on Open MPI's daemon links
# (mpirun then reports the lost daemon and its node, and every daemon kills its ranks).
FAULT_FLAGS = {
    "horovodrun": ["--gloo-timeout-seconds", str(GLOO_TIMEOUT)],
    "mpirun": ["-mca", "oob_tcp_keepalive_time", "10", "-mca", "oob_tcp_keepalive_intvl", "5",
               "-mca", "oob_tcp_keepalive_probes", "3"],
}


@pytest.mark.parametrize("kind", ["horovodrun", "mpirun"])
def test_cut_link_without_elastic_ends_every_rank_with_a_clear_error(cluster, kind, tmp_path):
    out = tmp_path / "cut"
    log = tmp_path / "cut.log"
    proc = cluster.start_ctl(launcher_cmd(kind, [SEARCH, *FAULT_ARGS, "--output-dir", out], extra=FAULT_FLAGS[kind]),
                             log)
    try:
        _wait_for_epochs(proc, out, 2, 300, log)
        cluster.cut("node1")
        t_cut = time.time()
        try:
            rc = proc.wait(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise AssertionError(f"the job was still running {BOUND_S} s after node1's link was cut:\n"
                                 f"{log.read_text()[-6000:]}") from None
        took = time.time() - t_cut
        text = log.read_text()
        assert rc != 0, text[-6000:]
        # every rank is gone: the launcher's ssh sessions, rank 0 on node0 and the cut-off rank 1 on node1
        left = cluster.wait_no_processes(str(out), 2 * GLOO_TIMEOUT + 30)
        assert not left, f"processes of the job still alive after the cut: {left}"
    finally:
        _stop(proc)
        cluster.heal("node1")
    lines = output_lines(text)
    if kind == "horovodrun":
        clear = [ln for ln in lines if "error: rank 0 on host node0 lost contact with the other ranks" in ln]
        assert "Traceback" not in "\n".join(ln for ln in text.splitlines() if ln.startswith("[0]")), text[-6000:]
    else:
        clear = [ln for ln in lines if re.match(r"Remote daemon: \S+ on node node1$", ln)]
        assert "ORTE has lost communication with a remote daemon" in text, text[-6000:]
    assert clear, f"no clear error ({took:.0f} s after the cut):\n{text[-6000:]}"
    # the last good checkpoint is intact: it loads and holds the epochs logged before the failure
    done = len(_metrics(out))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 2 <= ckpt["epoch"] == done < 12, (ckpt["epoch"], done)
    assert all(torch.isfinite(t).all() for k, t in ckpt["model"].items() if t.is_floating_point())
    print(f"{kind}: the job ended {took:.1f} s after the cut; checkpoint at epoch {done}")


def _has_elastic() -> bool:
    res = launch([python_exe(), SEARCH, "--help"], timeout=120)
    return "--elastic" in res.stdout


ELASTIC_ARGS = TINY + ["--epochs", "4", "--arch-start-epoch", "0", "--batch-size", "32", "--steps-per-epoch", "3",
                       "--no-augment", "--seed", "3", "--elastic", "--commit-interval", "2"]


def test_cut_link_with_elastic_finishes_on_the_survivor(cluster, tmp_path):
    if not _has_elastic():
        pytest.skip("needs --elastic (bin/train_search.py --help does not offer it)")
    hosts = tmp_path / "hosts"
    hosts.write_text("node0:1\nnode1:1\n")
    out = tmp_path / "elastic"
    log = tmp_path / "elastic.log"
    cmd = [_horovodrun(), "--gloo", "-np", "2", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", DISCOVER, "--network-interfaces", IFACE,
           "--gloo-timeout-seconds", str(GLOO_TIMEOUT), python_exe(), SEARCH, *ELASTIC_ARGS, "--output-dir", out]
    proc = cluster.start_ctl(cmd, log, env={"HVD_PCDARTS_HOSTS_FILE": hosts})
    try:
        _wait_for_epochs(proc, out, 2, 300, log)
        cluster.cut("node1")
        t_cut = time.time()
        hosts.write_text("node0:1\n")  # discovery no longer lists the lost host
        try:
            rc = proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise AssertionError(f"the elastic job did not finish:\n{log.read_text()[-8000:]}") from None
        took = time.time() - t_cut
        text = log.read_text()
        assert rc == 0, text[-8000:]
        left = cluster.wait_no_processes(str(out), 2 * GLOO_TIMEOUT + 30)
        assert not left, f"processes of the job still alive: {left}"
    finally:
        _stop(proc)
        cluster.heal("node1")
    m = _metrics(out)
    assert [r["epoch"] for r in m] == list(range(4)), text[-8000:]
    assert m[0]["world_size"] == 2 and m[-1]["world_size"] == 1, [r["world_size"] for r in m]
    assert _genotype(out)["genotype"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 4
    print(f"elastic: finished on node0 {took:.1f} s after the cut; world sizes {[r['world_size'] for r in m]}")
