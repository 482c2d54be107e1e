"""The `cluster` fixture: two test hosts node0, node1 (network namespaces with sshd) and a controller `ctl`,
built by tests/cluster/cluster.sh and torn down afterwards - also when a test fails or pytest is interrupted.

Skips (does not fail) where the machine does not allow it: not root, no sshd, no network namespaces.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers import describe, launch, launch_env

HERE = Path(__file__).resolve().parent
CLUSTER_SH = HERE / "cluster.sh"
LOCK_PATH = "/tmp/hvd-pcdarts-cluster.lock"
IFACE = "hvdeth0"
NODES = ("node0", "node1")


class Cluster:
    """Commands on the test cluster. Jobs are launched from the controller `ctl`, as from a cluster's head node."""

    iface = IFACE
    nodes = NODES

    def sh(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        res = subprocess.run([str(CLUSTER_SH), *map(str, args)], capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(describe(res))
        return res

    def ctl_cmd(self, cmd: list) -> list:
        return [str(CLUSTER_SH), "ctl", *map(str, cmd)]

    def ctl(self, cmd: list, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` on the controller with the project's environment (helpers.launch: .venv first on PATH,
        Open MPI allowed as root, the repo on PYTHONPATH); its whole process group dies on timeout."""
        return launch(self.ctl_cmd(cmd), timeout=timeout, env=env)

    def start_ctl(self, cmd: list, log_path, env: dict | None = None) -> subprocess.Popen:
        """Start `cmd` on the controller in the background (own session), stdout+stderr into `log_path`."""
        with open(log_path, "w") as log:
            return subprocess.Popen(self.ctl_cmd(cmd), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=launch_env(env), cwd=str(HERE.parent.parent),
                                    start_new_session=True)

    def cut(self, node: str) -> None:
        self.sh("cut", node)

    def heal(self, node: str) -> None:
        self.sh("heal", node)

    def hide(self, node: str, path) -> None:
        self.sh("hide", node, path)

    def unhide(self, node: str) -> None:
        self.sh("unhide", node)

    def pids(self, host: str) -> list[int]:
        res = subprocess.run(["ip", "netns", "pids", f"hvdc-{host}"], capture_output=True, text=True, timeout=30)
        return [int(p) for p in res.stdout.split()]

    def processes_with(self, host: str, marker: str) -> list[str]:
        """Command lines of the processes on `host` (its network namespace) that contain `marker`."""
        out = []
        for pid in self.pids(host):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                out.append(f"{pid}: {cmdline.strip()}")
        return out

    def wait_no_processes(self, marker: str, timeout: float) -> list[str]:
        """Wait until no process on any host holds `marker`; returns those left after `timeout` (empty = ok)."""
        deadline = time.time() + timeout
        while True:
            left = [f"{h}: {p}" for h in ("ctl", *NODES) for p in self.processes_with(h, marker)]
            if not left or time.time() > deadline:
                return left
            time.sleep(0.5)


def _down() -> None:
    subprocess.run([str(CLUSTER_SH), "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def cluster():
    # one cluster per machine at a time: another test session waits for it (the names are fixed)
    lock = open(LOCK_PATH, "w")
    deadline = time.time() + 1800
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.time() > deadline:
                lock.close()
                pytest.skip("another test session has held the namespace cluster for 30 minutes")
            time.sleep(2)
    atexit.register(_down)  # also if pytest dies before the finalizer (the next `up` cleans up too)
    try:
        res = subprocess.run([str(CLUSTER_SH), "up"], capture_output=True, text=True, timeout=180,
                             env=dict(os.environ))
        if res.returncode == 77:
            reason = next((ln[len("SKIP: "):] for ln in res.stderr.splitlines() if ln.startswith("SKIP: ")),
                          res.stderr.strip())
            pytest.skip(f"no namespace cluster on this machine: {reason}")
        assert res.returncode == 0, f"tests/cluster/cluster.sh up failed:\n{describe(res)}"
        yield Cluster()
    finally:
        _down()
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
