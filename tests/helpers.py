"""Shared test helpers: launching subprocesses (plain python, horovodrun, mpirun) with the project environment.

Import as ``from helpers import launch`` (tests/conftest.py puts this directory on sys.path).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = REPO_ROOT / ".venv" / "bin"
DEFAULT_TIMEOUT = 120


def python_exe() -> str:
    """The project's interpreter: .venv/bin/python when present, else the one running the tests."""
    p = VENV_BIN / "python"
    return str(p) if p.exists() else sys.executable


def find_exe(name: str) -> str | None:
    """An executable from .venv/bin first, then from PATH; None if absent."""
    p = VENV_BIN / name
    if p.exists() and os.access(p, os.X_OK):
        return str(p)
    return shutil.which(name)


def launch_env(extra: dict | None = None) -> dict:
    """os.environ plus: .venv/bin first on PATH, Open MPI allowed to run as root, the repo on PYTHONPATH, one
    OpenMP thread per process (several ranks share the cores). Keys of `extra` mapped to None are removed."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
    env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def launch(cmd: list, timeout: float = DEFAULT_TIMEOUT, env: dict | None = None, cwd=None,
           input: str | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` (a list; items are str()-ed) to completion with `launch_env(env)`, capturing text stdout/stderr.

    The command runs in its own session; on timeout its whole process group (launcher and ranks) is killed and
    the returned CompletedProcess has returncode -9 and the output collected so far, with a note on stderr.
    """
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            text=True, env=launch_env(env), cwd=str(cwd or REPO_ROOT), start_new_session=True)
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, -9, out, (err or "") + f"\n[launch] TIMEOUT after {timeout}s: "
                                                                          f"{' '.join(cmd)}\n")


def describe(res: subprocess.CompletedProcess) -> str:
    """A readable dump of a finished command for assertion messages."""
    return (f"command: {' '.join(map(str, res.args))}\nexit status: {res.returncode}\n"
            f"--- stdout ---\n{res.stdout[-6000:]}\n--- stderr ---\n{res.stderr[-6000:]}")


def horovodrun_cmd(np_: int, script_args: list, controller: str = "gloo", hosts: str | None = None) -> list:
    """`horovodrun --gloo|--mpi -np N -H localhost:N python ARGS...`."""
    exe = find_exe("horovodrun") or "horovodrun"
    return [exe, f"--{controller}", "-np", str(np_), "-H", hosts or f"localhost:{np_}", python_exe(),
            *map(str, script_args)]


def mpirun_cmd(np_: int, script_args: list) -> list:
    """Open MPI `mpirun --allow-run-as-root --oversubscribe -np N python ARGS...`."""
    return [find_exe("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np_),
            python_exe(), *map(str, script_args)]


_TAG = re.compile(r"^\[[0-9,]+\]<std(?:out|err)>:")


def output_lines(text: str) -> list[str]:
    """Lines of launcher output with horovodrun/mpirun rank tags (``[1]<stdout>:``, ``[1,0]<stdout>:``) removed.
    Open MPI's --tag-output can glue a tag to the end of another rank's line; those tags are split off too."""
    lines = []
    for raw in text.splitlines():
        for piece in re.split(r"(?=\[[0-9,]+\]<std(?:out|err)>:)", raw):
            piece = _TAG.sub("", piece).strip()
            if piece:
                lines.append(piece)
    return lines


_PROGRESS = re.compile(r"^(?:\[(?:\d+,)?(\d+)\]<stdout>:)?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d epoch (\d+)/(\d+) step "
                       r"(\d+)/(\d+) \| (\d+) img/s \| loss (\d+\.\d+) \| ETA epoch (\d+[hm]\d+[ms]), run "
                       r"(\d+[hm]\d+[ms])$")


def progress_lines(text: str) -> list[dict]:
    """The plain progress lines in launcher output (the runs' progress when stderr is no terminal):
    {rank (None untagged), epoch, epochs, step, steps, images_per_s, loss}."""
    out = []
    for line in text.splitlines():
        m = _PROGRESS.match(line.strip())
        if m:
            rank, e, n, i, k, ips, loss = m.groups()[:7]
            out.append(dict(rank=None if rank is None else int(rank), epoch=int(e), epochs=int(n), step=int(i),
                            steps=int(k), images_per_s=int(ips), loss=float(loss)))
    return out


def assert_progress_lines(stdout: str, epochs: int, steps: int) -> None:
    """A run whose output was a pipe: rank 0, and only rank 0, printed at least two progress lines in every epoch,
    in step order, none at an epoch's last step (its epoch line follows)."""
    lines = progress_lines(stdout)
    assert lines and all(p["rank"] in (None, 0) for p in lines), stdout[-3000:]
    assert all(p["epochs"] == epochs and p["steps"] == steps and p["images_per_s"] > 0 for p in lines), lines
    for e in range(1, epochs + 1):
        at = [p["step"] for p in lines if p["epoch"] == e]
        assert len(at) >= 2 and at == sorted(at) and at[-1] < steps, (e, at)


def rank_reports(folder) -> dict:
    """{rank: JSON value} from the files `rank<r>.json` that each rank of a test script wrote into `folder`.
    Tests read what several ranks report from such files: a launcher may glue two ranks' output lines together."""
    out = {}
    for p in Path(folder).glob("rank*.json"):
        out[int(p.stem[len("rank"):])] = json.loads(p.read_text())
    return out


def png_tree(root, classes=3, n_train=10, n_val=5, size=20, seed=0):
    """An ImageFolder tree of PNGs under root/{train,val}/class<c>/<i>.png: a gray level per class plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = Path(root) / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                noise = rng.randint(0, 30, (size, size, 3)).astype(np.uint8)
                img = np.full((size, size, 3), 40 + 80 * c, dtype=np.uint8) + noise
                Image.fromarray(img).save(d / f"{i}.png")


def start(cmd: list, log_path, env: dict | None = None, cwd=None) -> subprocess.Popen:
    """Start `cmd` in the background in its own session, stdout and stderr into `log_path`."""
    log = open(log_path, "w")
    try:
        return subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=launch_env(env), cwd=str(cwd or REPO_ROOT),
                                start_new_session=True)
    finally:
        log.close()


def processes_with(marker: str) -> list[int]:
    """PIDs of the processes whose command line contains `marker` (e.g. a unique output folder)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(d.name))
    return pids


def process_env(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def kill_all(marker: str, proc: subprocess.Popen | None = None) -> None:
    """SIGKILL every process of a run: the launcher's session and every process whose command line holds
    `marker` (horovodrun starts its ranks in process groups of their own)."""
    if proc is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in processes_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc is not None:
        proc.wait()
