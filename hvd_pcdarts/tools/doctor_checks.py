"""The cluster doctor's checks: what one rank sees (the dataset and a fingerprint of its file list, free space for
the output folder, GPUs, versions, Horovod's build, an allreduce whose result is known in advance, a --scan-data
share), and the findings over all ranks' records (`analyze`: one line per problem or note). `doctor.py` runs them
under the job's launcher and prints the table."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import socket
import threading
import time

from ..errors import UsageError
from .images import walk_files

# torch and Horovod (via ..dist.horovod) are imported where needed, so that a bad command line is answered at once.

DATASETS = ("cifar10", "cifar100", "digits", "imagefolder", "synthetic")
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
}
VERSION_FIELDS = ("torch", "horovod", "horovod_build", "cuda", "nccl", "python")


# --- what one rank sees ---------------------------------------------------------------------------------------
def horovod_error() -> str | None:
    """None when horovod.torch imports; otherwise its one-line error."""
    from ..dist import horovod as distributed

    try:
        distributed.hvd()
    except SystemExit as e:
        return str(e).removeprefix("error: ")
    return None


def _fingerprint(root: str, relpaths) -> str:
    h = hashlib.sha1()
    for rel in sorted(relpaths):
        size = os.path.getsize(os.path.join(root, rel))
        h.update(f"{rel}\0{size}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:12]


def dataset_status(dataset: str, data_dir: str) -> dict:
    """``{"present": bool, "detail": str, "fingerprint": str | None, "files": int}`` for this process."""
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")
    if dataset in ("digits", "synthetic"):
        return {"present": True, "detail": "built in", "fingerprint": "builtin", "files": 0}
    if not os.path.isdir(data_dir):
        what = "is not a folder" if os.path.exists(data_dir) else "does not exist"
        return {"present": False, "detail": f"{data_dir} {what}", "fingerprint": None, "files": 0}
    try:
        if dataset in CIFAR_FILES:
            sub, names = CIFAR_FILES[dataset]
            rel = [os.path.join(sub, n) for n in names]
            missing = [r for r in rel if not os.path.isfile(os.path.join(data_dir, r))]
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                return {"present": False, "detail": f"missing {', '.join(missing[:3])}{more} in {data_dir}",
                        "fingerprint": None, "files": len(rel) - len(missing)}
        else:  # imagefolder: DATA/train/<class>/<images> (and DATA/val/... when there)
            train = os.path.join(data_dir, "train")
            classes = sorted(c for c in os.listdir(train) if os.path.isdir(os.path.join(train, c))) \
                if os.path.isdir(train) else []
            rel = walk_files(data_dir, "train")
            if not classes or not rel:
                return {"present": False, "detail": f"{train} has no <class>/<image> files",
                        "fingerprint": None, "files": 0}
            if os.path.isdir(os.path.join(data_dir, "val")):
                rel += walk_files(data_dir, "val")
        return {"present": True, "detail": f"{len(rel)} files", "fingerprint": _fingerprint(data_dir, rel),
                "files": len(rel)}
    except OSError as e:
        return {"present": False, "detail": f"cannot read {data_dir}: {e.strerror or e}", "fingerprint": None,
                "files": 0}


def nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def output_status(output_dir: str) -> dict:
    """Free space and writability where `output_dir` is or will be created (nothing is created)."""
    where = nearest_existing(output_dir)
    info = {"path": where, "free_gb": None, "writable": False, "error": None}
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        info["error"] = f"{output_dir} is a file, not a folder"
        return info
    try:
        info["free_gb"] = round(shutil.disk_usage(where).free / 1e9, 2)
    except OSError as e:
        info["error"] = f"cannot stat {where}: {e.strerror or e}"
    info["writable"] = os.access(where, os.W_OK | os.X_OK)
    return info


def gpu_status() -> dict:
    import torch

    info = {"count": 0, "names": [], "uuids": []}
    try:
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            info["count"] = n
            for i in range(n):
                props = torch.cuda.get_device_properties(i)
                info["names"].append(props.name)
                uuid = getattr(props, "uuid", None)
                info["uuids"].append(str(uuid) if uuid is not None else None)
    except Exception as e:  # a broken driver: report it instead of failing
        info["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
    return info


def _nccl_version() -> str | None:
    import torch

    try:
        v = torch.cuda.nccl.version()
    except Exception:
        return None
    if isinstance(v, tuple):
        return ".".join(str(x) for x in v)
    return str(v) if v else None


def horovod_status(initialized: bool, error: str | None) -> dict:
    """Horovod's version, build and (once initialized) rank/size/controller; `error`: why it does not import."""
    info = {"version": None, "build": None, "nccl_built": None, "mpi_built": None, "gloo_built": None,
            "controller": None, "rank": None, "size": None, "local_rank": None, "error": error}
    if error is not None:
        return info
    from ..dist import horovod as distributed

    h = distributed.hvd()
    import importlib

    info["version"] = getattr(importlib.import_module(h.__name__.split(".")[0]), "__version__", None)
    info["mpi_built"] = bool(h.mpi_built())
    info["gloo_built"] = bool(h.gloo_built())
    info["nccl_built"] = bool(h.nccl_built())
    info["build"] = "+".join(n for n, b in (("NCCL", info["nccl_built"]), ("MPI", info["mpi_built"]),
                                            ("Gloo", info["gloo_built"])) if b) or "none"
    if initialized:
        info["controller"] = "mpi" if h.mpi_enabled() else ("gloo" if h.gloo_enabled() else "?")
        info["rank"], info["size"], info["local_rank"] = h.rank(), h.size(), h.local_rank()
    return info


def allreduce_check(rank: int, size: int, timeout: float, local_rank: int | None = None) -> dict:
    """Sum rank+1 over all ranks with Horovod; the answer must be n(n+1)/2. Never waits more than `timeout`.

    Where a GPU is visible the tensor lives on this rank's GPU (local rank modulo the GPUs), so the check goes
    through the same path as the training's gradients (NCCL); otherwise it is a CPU tensor (MPI or Gloo).
    """
    import torch

    from ..dist import horovod as distributed

    expected = size * (size + 1) / 2
    box: dict = {}
    device = "cpu"
    try:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            idx = (local_rank or 0) % torch.cuda.device_count()
            torch.cuda.set_device(idx)
            device = f"cuda:{idx}"
    except Exception:  # a broken driver: gpu_status() reports it; check the CPU path
        device = "cpu"

    def work():
        try:
            t0 = time.perf_counter()
            out = distributed.allreduce(torch.tensor([float(rank + 1)], dtype=torch.float64, device=device),
                                        name="doctor.allreduce", average=False)
            box["value"] = float(out.item())
            box["ms"] = round((time.perf_counter() - t0) * 1000, 1)
        except BaseException as e:  # noqa: B036 - any failure becomes a finding
            box["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__

    th = threading.Thread(target=work, daemon=True)
    th.start()
    th.join(timeout)
    res = {"expected": expected, "value": box.get("value"), "ms": box.get("ms"), "error": box.get("error"),
           "timed_out": th.is_alive(), "device": device}
    res["ok"] = (not res["timed_out"] and res["error"] is None and res["value"] is not None
                 and abs(res["value"] - expected) < 1e-6)
    return res


def _env_local_rank() -> int | None:
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "HOROVOD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v)
    return None


def local_record(rank: int, dataset: str, data_dir: str, output_dir: str, hvd_info: dict,
                 fake_missing: bool) -> dict:
    import torch

    local_rank = hvd_info.get("local_rank")
    if local_rank is None:
        local_rank = _env_local_rank()
    data = dataset_status(dataset, data_dir)
    if fake_missing:
        data = {"present": False, "detail": "simulated missing data (--simulate-missing-data-on-rank)",
                "fingerprint": None, "files": 0}
    return {
        "rank": rank,
        "host": socket.gethostname(),
        "local_rank": local_rank,
        "pid": os.getpid(),
        "gpus": gpu_status(),
        "cuda": torch.version.cuda,
        "nccl": _nccl_version(),
        "torch": torch.__version__,
        "horovod": hvd_info.get("version"),
        "horovod_build": hvd_info.get("build"),
        "horovod_info": hvd_info,
        "python": platform.python_version(),
        "data": data,
        "output": output_status(output_dir),
    }


def scan_share(args, rank: int, size: int) -> dict:
    """This rank's share of --scan-data: every size-th image of the ImageFolder tree, read and decoded."""
    if args.dataset != "imagefolder":
        return {"read": 0, "unreadable": [], "skipped": f"dataset {args.dataset} has no image files to read"}
    if not os.path.isdir(os.path.join(args.data_dir, "train")):
        return {"read": 0, "unreadable": [], "skipped": f"{args.data_dir}/train does not exist"}
    from .images import scan_images

    return scan_images(args.data_dir, rank, size)

# --- verdict --------------------------------------------------------------------------------------------------
def _ranks_text(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(str(r) for r in sorted(ranks))


def _by_value(records: list[dict], key) -> dict:
    """value -> {host: [ranks]} (insertion ordered by first rank)."""
    out: dict = {}
    for r in records:
        out.setdefault(key(r), {}).setdefault(r["host"], []).append(r["rank"])
    return out


def _where(hosts: dict) -> str:
    return ", ".join(f"host {h} ({_ranks_text(rs)})" for h, rs in hosts.items())


def analyze(records: list[dict], dataset: str, min_free_gb: float, world_size: int) -> tuple[list[str], list[str]]:
    """(problems, notes): one line each. Any problem makes the verdict a failure."""
    problems: list[str] = []
    notes: list[str] = []
    hosts: dict = {}
    for r in records:
        hosts.setdefault(r["host"], []).append(r)
    _horovod_findings(records, world_size, problems)
    _data_findings(records, hosts, dataset, problems)
    _version_findings(records, problems)
    _gpu_findings(records, hosts, problems, notes)
    _output_findings(hosts, min_free_gb, problems)
    _allreduce_findings(records, problems)
    _scan_findings([r["scan"] for r in records if r.get("scan")], problems, notes)
    return problems, notes


def _horovod_findings(records: list[dict], world_size: int, problems: list[str]) -> None:
    """Horovod itself: ranks where it does not import, ranks that see another world size than the launcher's."""
    broken = _by_value([r for r in records if r["horovod_info"].get("error")], lambda r: r["horovod_info"]["error"])
    for err, hs in broken.items():
        problems.append(f"horovod: {_where(hs)}: {err}")
    for r in records:
        if r["horovod_info"].get("error"):
            continue
        if r["horovod_info"].get("size") not in (None, world_size):
            problems.append(f"horovod: host {r['host']} rank {r['rank']}: Horovod sees "
                            f"{r['horovod_info']['size']} ranks but the launcher started {world_size}")


def _data_findings(records: list[dict], hosts: dict, dataset: str, problems: list[str]) -> None:
    """The dataset: present on every node, then one fingerprint everywhere."""
    for host, recs in hosts.items():
        missing = [r for r in recs if not r["data"]["present"]]
        if missing:
            details = "; ".join(f"rank {r['rank']}: {r['data']['detail']}" for r in missing)
            problems.append(f"data: {dataset} missing on host {host} ({details})")
    present = [r for r in records if r["data"]["present"]]
    fps = _by_value(present, lambda r: r["data"]["fingerprint"])
    if len(fps) > 1:
        problems.append("data: the dataset differs between ranks: " +
                        "; ".join(f"fingerprint {fp} on {_where(hs)}" for fp, hs in fps.items()))


def _version_findings(records: list[dict], problems: list[str]) -> None:
    """One version of each of VERSION_FIELDS on every rank."""
    for field in VERSION_FIELDS:
        recs = records
        if field.startswith("horovod"):  # a rank without a working Horovod is reported above
            recs = [r for r in records if r.get(field) is not None]
        vals = _by_value(recs, lambda r, f=field: r.get(f))
        if len(vals) > 1:
            problems.append(f"versions: {field} differs: " +
                            "; ".join(f"{v if v is not None else 'none'} on {_where(hs)}" for v, hs in vals.items()))


def _gpu_findings(records: list[dict], hosts: dict, problems: list[str], notes: list[str]) -> None:
    """GPUs per node: CUDA errors, GPUs without a Horovod built with NCCL, more ranks than GPUs on a node."""
    def host_gpus(recs):
        uuids = {u for r in recs for u in r["gpus"]["uuids"] if u}
        return max(len(uuids), max(r["gpus"]["count"] for r in recs))

    gpus = {h: host_gpus(recs) for h, recs in hosts.items()}
    for r in records:
        if r["gpus"].get("error"):
            problems.append(f"gpus: host {r['host']} rank {r['rank']}: CUDA error: {r['gpus']['error']}")
    if not any(gpus.values()):
        notes.append(f"CPU only: no GPU visible on any node; {len(records)} rank(s) will run on CPU")
        return
    for h, recs in hosts.items():
        no_nccl = [r["rank"] for r in recs if r["gpus"]["count"] and r["horovod_info"].get("error") is None
                   and r["horovod_info"].get("nccl_built") is False]
        if no_nccl:
            problems.append(f"horovod: host {h} ({_ranks_text(no_nccl)}): GPUs are visible but Horovod was "
                            f"built without NCCL: rebuild with HVD_PCDARTS_GPU=1 scripts/install_horovod.sh")
    for h, recs in hosts.items():
        if len(recs) > gpus[h]:
            problems.append(f"gpus: host {h} runs {len(recs)} ranks but has {gpus[h]} GPU(s): ranks would "
                            f"share a GPU (start at most {gpus[h]} there)")


def _output_findings(hosts: dict, min_free_gb: float, problems: list[str]) -> None:
    """The output folder on each node: an error, not writable, or less free space than --min-free-gb."""
    for h, recs in hosts.items():
        for path, rs in _by_value(recs, lambda r: r["output"]["path"]).items():
            o = next(r["output"] for r in recs if r["output"]["path"] == path)
            ranks = rs[h]
            if o["error"]:
                problems.append(f"output: host {h} ({_ranks_text(ranks)}): {o['error']}")
            elif not o["writable"]:
                problems.append(f"output: host {h} ({_ranks_text(ranks)}): {path} is not writable")
            elif o["free_gb"] is not None and o["free_gb"] < min_free_gb:
                problems.append(f"output: host {h} ({_ranks_text(ranks)}): only {o['free_gb']:.2f} GB free at "
                                f"{path} (--min-free-gb {min_free_gb:g})")


def _allreduce_findings(records: list[dict], problems: list[str]) -> None:
    """The allreduce end to end: skipped, timed out, failed, or a wrong sum."""
    skipped = _by_value([r for r in records if r["allreduce"].get("skipped")], lambda r: r["allreduce"]["skipped"])
    for why, hs in skipped.items():
        problems.append(f"allreduce: not run on {_where(hs)} ({why})")
    for r in records:
        a = r["allreduce"]
        if a.get("skipped"):
            continue
        if a["timed_out"]:
            problems.append(f"allreduce: host {r['host']} rank {r['rank']}: no result within the timeout")
        elif a["error"]:
            problems.append(f"allreduce: host {r['host']} rank {r['rank']}: failed: {a['error']}")
        elif not a["ok"]:
            problems.append(f"allreduce: host {r['host']} rank {r['rank']}: got {a['value']:g}, expected "
                            f"{a['expected']:g}")


def _scan_findings(scans: list[dict], problems: list[str], notes: list[str]) -> None:
    """--scan-data: every unreadable image is a problem (one line each); else a note of how many were read."""
    if not scans:
        return
    skipped = [s["skipped"] for s in scans if s.get("skipped")]
    if skipped:
        notes.append(f"--scan-data: {skipped[0]}")
        return
    bad = sorted(x for s in scans for x in s["unreadable"])
    for x in bad:
        problems.append(f"unreadable image: {x}")
    if not bad:
        notes.append(f"--scan-data: all {sum(s['read'] for s in scans)} images read, none unreadable")
