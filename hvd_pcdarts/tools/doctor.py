"""The cluster doctor: check a cluster before a long job, from inside the job's own launcher.

Run it with the same launcher, hosts and flags as the real job (``mpirun ... python bin/doctor.py`` or
``horovodrun ... python bin/doctor.py``). Every rank describes itself (host, ranks, GPUs, CUDA/NCCL/torch/Horovod/
Python versions, the dataset at ``--data-dir`` with a fingerprint of its file list, free space for
``--output-dir``) and takes part in a Horovod allreduce whose result is known in advance. Rank 0 prints one table
(a row per rank), then one line per inconsistency; every rank exits with the same status: 0 when all is well,
1 when anything is inconsistent. The checks themselves and the findings over all ranks are in `doctor_checks.py`;
here: the gathering, the watchdog, the table and the run.

Gathering uses mpi4py when the MPI world has more than one process (``mpirun``, ``horovodrun`` with the MPI
controller) - so a broken Horovod shows up in the table instead of hanging the job - and Horovod's own
``allgather_object`` otherwise (``horovodrun --gloo``, where every process is an MPI singleton).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

from ..errors import UsageError
from .doctor_checks import DATASETS, allreduce_check, analyze, horovod_error, horovod_status, local_record, scan_share

# torch and Horovod (via ..dist.horovod) are imported where needed, so that a bad command line is answered at once.

FAKE_MISSING_ENV = "HVD_PCDARTS_DOCTOR_FAKE_MISSING_DATA_RANK"


def launcher_rank() -> int:
    """This process's rank as the launcher announced it (before any initialization); 0 when unknown."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "HOROVOD_RANK"):
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v)
    return 0


# --- gathering ------------------------------------------------------------------------------------------------
class _MPIGroup:
    kind = "mpi4py"

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)


class _HorovodGroup:
    kind = "horovod"

    def __init__(self):
        from ..dist import horovod as distributed

        self.rank = distributed.rank()
        self.size = distributed.size()

    def allgather(self, obj):
        from ..dist import horovod as distributed

        return distributed.allgather_object(obj) if self.size > 1 else [obj]

    def bcast(self, obj):
        from ..dist import horovod as distributed

        return distributed.broadcast_object(obj, root_rank=0, name="doctor.verdict")


def _mpi_world():
    """mpi4py's COMM_WORLD, or None when mpi4py is unusable."""
    try:
        from mpi4py import MPI
    except Exception:  # not installed, or no MPI library
        return None
    return MPI.COMM_WORLD


class _Watchdog:
    """Ends this process with a clear line if a collective step never finishes (a rank died or hangs)."""

    def __init__(self, seconds: float, rank: int):
        self.step = "start-up"
        self.rank = rank
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        threading.Thread(target=self._run, daemon=True).start()

    @contextlib.contextmanager
    def paused(self):
        """Local work of unknown length (no collective in it): the clock stops meanwhile, and the ranks that
        finish first may then wait as long again for the others to finish theirs."""
        t0, left = time.monotonic(), self.deadline - time.monotonic()
        self.deadline = float("inf")
        try:
            yield
        finally:
            now = time.monotonic()
            self.deadline = now + left + (now - t0)

    def _run(self):
        while time.monotonic() < self.deadline:
            time.sleep(0.5)
        if self.rank == 0:
            print(f"doctor: FAILED: no answer from the other ranks within {self.seconds:.0f} s during "
                  f"'{self.step}' (a rank hung, died or cannot reach the others)", file=sys.stderr, flush=True)
        os._exit(1)


# --- the table ----------------------------------------------------------------------------------------------
def format_table(records: list[dict]) -> str:
    def gpu_cell(g):
        if g.get("error"):
            return "error"
        if not g["count"]:
            return "0"
        names = sorted(set(g["names"]))
        return f"{g['count']} ({', '.join(names)})"

    def ar_cell(a):
        if a.get("skipped"):
            return "skipped"
        if a["timed_out"]:
            return "TIMEOUT"
        if a["error"]:
            return "ERROR"
        return f"{'ok' if a['ok'] else 'WRONG'} {a['value']:g} ({a.get('device', 'cpu')}, {a['ms']} ms)"

    def data_cell(d):
        return f"{d['fingerprint']}" if d["present"] else "MISSING"

    def free_cell(o):
        if o["error"] or o["free_gb"] is None:
            return "error"
        return f"{o['free_gb']:.1f} GB" + ("" if o["writable"] else " (read-only)")

    header = ["rank", "host", "local", "gpus", "cuda", "nccl", "torch", "horovod", "python", "data", "free",
              "allreduce"]
    rows = [[str(r["rank"]), r["host"], "-" if r["local_rank"] is None else str(r["local_rank"]),
             gpu_cell(r["gpus"]), r["cuda"] or "none", r["nccl"] or "none", r["torch"],
             f"{r['horovod']} ({r['horovod_build']})" if r["horovod"] else "MISSING", r["python"],
             data_cell(r["data"]), free_cell(r["output"]), ar_cell(r["allreduce"])] for r in records]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- the whole check ------------------------------------------------------------------------------------------
def _validate(args) -> None:
    if args.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r} (choose from {', '.join(DATASETS)})")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout:g}")
    if args.min_free_gb < 0:
        raise UsageError(f"--min-free-gb must be >= 0, got {args.min_free_gb:g}")
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json):
            raise UsageError(f"--json {args.json} is a folder; give a file path")
        if not os.path.isdir(parent):
            raise UsageError(f"--json {args.json}: folder {parent} does not exist")
    if args.simulate_missing_data_on_rank is not None and args.simulate_missing_data_on_rank < 0:
        raise UsageError(f"--simulate-missing-data-on-rank must be >= 0, got {args.simulate_missing_data_on_rank}")


def _fake_missing_rank(args) -> int | None:
    if args.simulate_missing_data_on_rank is not None:
        return args.simulate_missing_data_on_rank
    v = os.environ.get(FAKE_MISSING_ENV, "").strip()
    if not v:
        return None
    if not v.isdigit():
        raise UsageError(f"{FAKE_MISSING_ENV}={v!r} must be a rank number")
    return int(v)


def _start(watchdog: _Watchdog):
    """(group, Horovod initialized, why Horovod does not import on this rank or None): the gathering group, with
    Horovod initialized only where every rank can import it (its init is collective and would hang otherwise)."""
    from ..dist import horovod as distributed

    comm = _mpi_world()
    if comm is not None and comm.Get_size() > 1:
        group = _MPIGroup(comm)
        watchdog.rank = group.rank
        watchdog.step = "checking that every rank imports Horovod"
        err = horovod_error()
        errors = group.allgather(err)
        if all(e is None for e in errors):
            watchdog.step = "Horovod initialization"
            distributed.init()
            return group, True, err
        return group, False, err
    # horovodrun --gloo (each process is an MPI singleton) or a single process: Horovod gathers.
    watchdog.step = "Horovod initialization"
    distributed.init()  # a missing Horovod ends here with one line (exit 1)
    group = _HorovodGroup()
    watchdog.rank = group.rank
    return group, True, None


def _own_record(args, group, hvd_info: dict, hvd_initialized: bool, fake_rank: int | None,
                watchdog: _Watchdog) -> dict:
    """This rank's record: what it sees, its --scan-data share, and the allreduce check (or why it was skipped)."""
    record = local_record(group.rank, args.dataset, args.data_dir, args.output_dir, hvd_info,
                          fake_missing=fake_rank == group.rank)
    if getattr(args, "scan_data", False):
        watchdog.step = "reading every image (--scan-data)"
        with watchdog.paused():
            record["scan"] = scan_share(args, group.rank, group.size)
    if hvd_initialized:
        watchdog.step = "the allreduce check"
        record["allreduce"] = allreduce_check(hvd_info["rank"], hvd_info["size"], args.timeout,
                                              hvd_info["local_rank"])
    else:
        record["allreduce"] = {"skipped": "Horovod is unavailable on some rank", "ok": False, "timed_out": False,
                               "error": None, "value": None, "expected": None, "ms": None}
    return record


def _report(args, records: list[dict], group, hvd_info: dict, out) -> int:
    """Rank 0: the table, the notes and problems, the verdict line, and --json; returns the exit status."""
    problems, notes = analyze(records, args.dataset, args.min_free_gb, group.size)
    status = 1 if problems else 0
    hosts = len({r["host"] for r in records})
    ctrl = hvd_info.get("controller") or "unavailable"
    print(f"hvd-pcdarts cluster doctor: {len(records)} rank(s) on {hosts} host(s); dataset {args.dataset} at "
          f"{os.path.abspath(args.data_dir)}; gathered with {group.kind}; Horovod controller {ctrl}", file=out)
    print(format_table(records), file=out)
    for n in notes:
        print(f"note: {n}", file=out)
    for p in problems:
        print(f"PROBLEM: {p}", file=out)
    print(f"doctor: {'OK' if not problems else f'FAILED: {len(problems)} problem(s)'}", file=out)
    out.flush()
    if args.json:
        from ..checkpoint import atomic_write_text

        payload = {"ok": not problems, "dataset": args.dataset, "data_dir": os.path.abspath(args.data_dir),
                   "output_dir": os.path.abspath(args.output_dir), "world_size": group.size,
                   "gathered_with": group.kind, "horovod_controller": hvd_info.get("controller"),
                   "problems": problems, "notes": notes, "ranks": records}
        try:
            atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
        except OSError as e:
            print(f"error: --json {args.json}: cannot write: {e.strerror or e}", file=sys.stderr, flush=True)
            status = 2
    return status


def run(args, out=sys.stdout) -> int:
    """Run the doctor on this rank; returns the exit status every rank agrees on (0 ok, 1 problems).

    `args` has: dataset, data_dir, output_dir, json, timeout, min_free_gb, simulate_missing_data_on_rank and
    optionally scan_data.
    """
    _validate(args)
    fake_rank = _fake_missing_rank(args)
    watchdog = _Watchdog(3 * args.timeout + 30, launcher_rank())
    group, hvd_initialized, err = _start(watchdog)

    hvd_info = horovod_status(hvd_initialized, err)
    if fake_rank is not None and fake_rank >= group.size:
        raise UsageError(f"--simulate-missing-data-on-rank {fake_rank}: there are only {group.size} ranks")
    record = _own_record(args, group, hvd_info, hvd_initialized, fake_rank, watchdog)
    stuck = record["allreduce"]["timed_out"]
    if stuck and group.kind == "horovod":
        # Horovod cannot gather for us while its own collective is stuck.
        if group.rank == 0:
            print(f"doctor: FAILED: the Horovod allreduce did not finish within {args.timeout:g} s on rank 0 "
                  f"(host {record['host']}); a rank is missing or the network between hosts is blocked",
                  file=sys.stderr, flush=True)
        os._exit(1)

    watchdog.step = "gathering the reports"
    records = sorted(group.allgather(record), key=lambda r: r["rank"])
    status = _report(args, records, group, hvd_info, out) if group.rank == 0 else 0
    watchdog.step = "sharing the verdict"
    status = group.bcast(status)
    if stuck:  # a Horovod thread is still blocked: a normal interpreter exit could wait on it forever
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
