"""The cluster doctor: under mpirun (gathered with mpi4py), under horovodrun --gloo (gathered with Horovod), as a
single process, its failure paths, and the verdict logic on made-up multi-node reports."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from hvd_pcdarts.tools import doctor, doctor_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bin", "doctor.py")
VENV_BIN = os.path.dirname(sys.executable)
TIMEOUT = 120
ROW = re.compile(r"^(?:\[\d+\]<stdout>:)?(\d+)\s{2,}\S+\s{2,}(\d+|-)\s{2,}")


def _env(**extra):
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # several ranks share the cores
    env.pop(doctor.FAKE_MISSING_ENV, None)
    for k in list(env):  # never inherit a launcher's identity from an outer job
        if k.startswith(("OMPI_COMM_WORLD", "PMIX_", "HOROVOD_")):
            env.pop(k)
    env.update(extra)
    return env


def _which(name):
    return shutil.which(name, path=_env()["PATH"])


needs_mpirun = pytest.mark.skipif(_which("mpirun") is None, reason="mpirun not installed (apt-get install openmpi-bin)")
needs_horovodrun = pytest.mark.skipif(_which("horovodrun") is None, reason="horovodrun not in the virtualenv")


def run_single(*args, **env):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=TIMEOUT)


def run_mpirun(*args, np=2):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np), sys.executable, SCRIPT, *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def run_horovodrun(*args, np=2):
    cmd = ["horovodrun", "--gloo", "-np", str(np), "-H", f"localhost:{np}", sys.executable, SCRIPT, *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def table_rows(stdout: str) -> list[int]:
    return [int(m.group(1)) for m in map(ROW.match, stdout.splitlines()) if m]


def fake_cifar10(root):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (base / name).write_bytes(b"x" * 100)
    return root


# --- end to end ---------------------------------------------------------------------------------------------
@needs_mpirun
@pytest.mark.ranks
def test_mpirun_digits_ok(tmp_path):
    out_dir = tmp_path / "not" / "yet"
    report = tmp_path / "doctor.json"
    r = run_mpirun("--dataset", "digits", "--output-dir", str(out_dir), "--json", str(report))
    assert r.returncode == 0, r.stdout + r.stderr
    assert table_rows(r.stdout) == [0, 1], r.stdout
    assert "gathered with mpi4py" in r.stdout
    assert "CPU only" in r.stdout or "PROBLEM" not in r.stdout
    assert "doctor: OK" in r.stdout
    assert not out_dir.exists() and not out_dir.parent.exists()  # the doctor creates nothing
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["world_size"] == 2 and data["problems"] == []
    assert [x["rank"] for x in data["ranks"]] == [0, 1]
    assert sorted(x["local_rank"] for x in data["ranks"]) == [0, 1]
    assert all(x["allreduce"]["ok"] and x["allreduce"]["value"] == 3 for x in data["ranks"])
    assert data["ranks"][0]["output"]["path"] == str(tmp_path)


@needs_mpirun
@pytest.mark.ranks
def test_mpirun_cifar10_fake_layout_ok(tmp_path):
    data_dir = fake_cifar10(tmp_path / "data")
    report = tmp_path / "doctor.json"
    r = run_mpirun("--dataset", "cifar10", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "runs"),
                   "--json", str(report))
    assert r.returncode == 0, r.stdout + r.stderr
    assert table_rows(r.stdout) == [0, 1]
    fps = {x["data"]["fingerprint"] for x in json.loads(report.read_text())["ranks"]}
    assert len(fps) == 1 and re.fullmatch(r"[0-9a-f]{12}", fps.pop())


@needs_mpirun
@pytest.mark.ranks
def test_mpirun_missing_data_on_rank_1_fails_naming_host_and_rank(tmp_path):
    r = run_mpirun("--dataset", "digits", "--output-dir", str(tmp_path), "--simulate-missing-data-on-rank", "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert table_rows(r.stdout) == [0, 1]
    problems = [line for line in r.stdout.splitlines() if line.startswith("PROBLEM:")]
    assert len(problems) == 1, r.stdout
    assert f"host {socket.gethostname()}" in problems[0] and "rank 1" in problems[0]
    assert "rank 0" not in problems[0]
    assert r.stdout.count("doctor: FAILED") == 1  # rank 0 prints, the others do not


def test_cifar_dir_missing_fails(tmp_path):
    r = run_single("--dataset", "cifar10", "--data-dir", str(tmp_path / "nothing"), "--output-dir", str(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"PROBLEM: data: cifar10 missing on host {socket.gethostname()} (rank 0: " in r.stdout
    assert "does not exist" in r.stdout


@needs_mpirun
@pytest.mark.ranks
def test_mpirun_bad_input_is_one_line_exit_2(tmp_path):
    r = run_mpirun("--dataset", "digits", "--json", str(tmp_path / "no" / "such" / "dir" / "d.json"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("error: --json") == 1  # rank 0 only
    assert "Traceback" not in r.stderr + r.stdout


@needs_mpirun
@pytest.mark.ranks
def test_mpirun_rank_without_horovod_is_reported_not_hung(tmp_path):
    """Rank 1 cannot import Horovod: the others must not hang in hvd.init(); the table names the broken rank."""
    fake = tmp_path / "fake" / "horovod"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("simulated broken horovod")\n')
    common = [sys.executable, SCRIPT, "--dataset", "digits", "--output-dir", str(tmp_path)]
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "1", *common, ":",
           "-np", "1", "-x", f"PYTHONPATH={fake.parent}", *common]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 1, r.stdout + r.stderr
    assert table_rows(r.stdout) == [0, 1]
    problems = [line for line in r.stdout.splitlines() if line.startswith("PROBLEM:")]
    assert len(problems) == 2, r.stdout
    assert problems[0].startswith(f"PROBLEM: horovod: host {socket.gethostname()} (rank 1): Horovod is not installed")
    assert "simulated broken horovod" in problems[0]
    assert problems[1].startswith("PROBLEM: allreduce: not run on host")


@needs_horovodrun
@pytest.mark.ranks
def test_horovodrun_gloo_ok(tmp_path):
    report = tmp_path / "doctor.json"
    r = run_horovodrun("--dataset", "synthetic", "--output-dir", str(tmp_path), "--json", str(report))
    assert r.returncode == 0, r.stdout + r.stderr
    assert table_rows(r.stdout) == [0, 1], r.stdout
    assert "gathered with horovod; Horovod controller gloo" in r.stdout
    data = json.loads(report.read_text())
    assert data["gathered_with"] == "horovod" and len(data["ranks"]) == 2


@needs_horovodrun
@pytest.mark.ranks
def test_horovodrun_gloo_missing_data_fails(tmp_path):
    r = run_horovodrun("--dataset", "digits", "--output-dir", str(tmp_path), "--simulate-missing-data-on-rank", "1")
    assert r.returncode != 0, r.stdout + r.stderr
    problems = [line for line in r.stdout.splitlines() if "PROBLEM:" in line]
    assert len(problems) == 1 and "rank 1" in problems[0] and socket.gethostname() in problems[0], r.stdout


def test_single_process_ok_and_env_knob(tmp_path):
    r = run_single("--dataset", "synthetic", "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert table_rows(r.stdout) == [0]
    r = run_single("--dataset", "synthetic", "--output-dir", str(tmp_path), **{doctor.FAKE_MISSING_ENV: "0"})
    assert r.returncode == 1 and "PROBLEM: data: synthetic missing on host" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "mnist"], "invalid choice"),
    (["--timeout", "0"], "--timeout"),
    (["--simulate-missing-data-on-rank", "5"], "only 1 ranks"),
])
def test_bad_input_single_line_exit_2(args, needle, tmp_path):
    r = run_single("--output-dir", str(tmp_path), *args)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


# --- pieces -------------------------------------------------------------------------------------------------
def test_dataset_status_layouts(tmp_path):
    assert doctor_checks.dataset_status("digits", str(tmp_path / "x"))["present"]
    cifar = fake_cifar10(tmp_path / "c10")
    ok = doctor_checks.dataset_status("cifar10", str(cifar))
    assert ok["present"] and ok["files"] == 7
    (cifar / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"y" * 101)  # a different size
    assert doctor_checks.dataset_status("cifar10", str(cifar))["fingerprint"] != ok["fingerprint"]
    (cifar / "cifar-10-batches-py" / "batches.meta").unlink()
    miss = doctor_checks.dataset_status("cifar10", str(cifar))
    assert not miss["present"] and "batches.meta" in miss["detail"]
    c100 = tmp_path / "c100" / "cifar-100-python"
    c100.mkdir(parents=True)
    for n in ("train", "test"):
        (c100 / n).write_bytes(b"z")
    assert not doctor_checks.dataset_status("cifar100", str(tmp_path / "c100"))["present"]
    (c100 / "meta").write_bytes(b"z")
    assert doctor_checks.dataset_status("cifar100", str(tmp_path / "c100"))["present"]
    img = tmp_path / "img"
    (img / "train" / "cat").mkdir(parents=True)
    assert not doctor_checks.dataset_status("imagefolder", str(img))["present"]  # a class without images
    (img / "train" / "cat" / "1.png").write_bytes(b"p")
    st = doctor_checks.dataset_status("imagefolder", str(img))
    assert st["present"] and st["files"] == 1


def test_output_status_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    st = doctor_checks.output_status(str(target))
    assert st["path"] == str(tmp_path) and st["free_gb"] > 0 and st["writable"]
    assert not (tmp_path / "a").exists()
    f = tmp_path / "file"
    f.write_text("x")
    assert doctor_checks.output_status(str(f))["error"]


def _rec(rank, host, gpus=0, torch_v="2.14.1", fp="abc", present=True, value=None, n=4):
    return {
        "rank": rank, "host": host, "local_rank": rank % 2, "pid": 1,
        "gpus": {"count": gpus, "names": ["H100"] * gpus, "uuids": [f"{host}-{i}" for i in range(gpus)]},
        "cuda": "13.0", "nccl": "2.27.3", "torch": torch_v, "horovod": "0.28.1", "horovod_build": "NCCL+MPI+Gloo",
        "horovod_info": {"error": None, "size": n}, "python": "3.12.3",
        "data": {"present": present, "detail": "x" if present else "gone", "fingerprint": fp if present else None},
        "output": {"path": "/runs", "free_gb": 100.0, "writable": True, "error": None},
        "allreduce": {"ok": value is None, "value": 10.0 if value is None else value, "expected": 10.0,
                      "timed_out": False, "error": None, "ms": 1.0},
    }


def test_analyze_finds_every_kind_of_inconsistency():
    recs = [_rec(0, "a", gpus=1), _rec(1, "a", gpus=1), _rec(2, "b", gpus=2, torch_v="2.13.0", fp="def"),
            _rec(3, "b", gpus=2, present=False, value=7.0)]
    problems, notes = doctor_checks.analyze(recs, "cifar10", min_free_gb=1.0, world_size=4)
    text = "\n".join(problems)
    assert "data: cifar10 missing on host b (rank 3: gone)" in text
    assert "fingerprint abc on host a (ranks 0,1); fingerprint def on host b (rank 2)" in text
    assert "versions: torch differs: 2.14.1 on host a (ranks 0,1), host b (rank 3); 2.13.0 on host b (rank 2)" in text
    assert "gpus: host a runs 2 ranks but has 1 GPU(s)" in text
    assert "host b runs" not in text
    assert "allreduce: host b rank 3: got 7, expected 10" in text
    assert notes == []


def test_analyze_cpu_only_cluster_is_fine_and_gpu_uuids_are_merged():
    problems, notes = doctor_checks.analyze([_rec(i, "a") for i in range(4)], "digits", 1.0, 4)
    assert problems == [] and notes and notes[0].startswith("CPU only")
    # each rank sees one GPU (CUDA_VISIBLE_DEVICES per rank): the node still has 2 distinct GPUs
    recs = [_rec(0, "a", gpus=1, n=2), _rec(1, "a", gpus=1, n=2)]
    recs[1]["gpus"]["uuids"] = ["a-1"]
    problems, _ = doctor_checks.analyze(recs, "digits", 1.0, 2)
    assert problems == []


def test_analyze_output_space_and_horovod_missing():
    recs = [_rec(0, "a", n=2), _rec(1, "a", n=2)]
    recs[0]["output"]["free_gb"] = 0.2
    recs[1]["horovod_info"]["error"] = "Horovod is not installed"
    problems, _ = doctor_checks.analyze(recs, "digits", 1.0, 2)
    assert any("only 0.20 GB free" in p for p in problems)
    assert "horovod: host a (rank 1): Horovod is not installed" in problems
    # every rank without Horovod: one line for the cause, one for the skipped allreduce
    for r in recs:
        r["horovod_info"]["error"] = "Horovod is not installed"
        r["allreduce"] = {"skipped": "Horovod unavailable", "ok": False, "timed_out": False, "error": None}
    problems, _ = doctor_checks.analyze(recs, "digits", 1.0, 2)
    assert [p for p in problems if not p.startswith("output")] == [
        "horovod: host a (ranks 0,1): Horovod is not installed",
        "allreduce: not run on host a (ranks 0,1) (Horovod unavailable)"]


def test_analyze_gpus_without_nccl():
    recs = [_rec(0, "g", gpus=2, n=2), _rec(1, "g", gpus=2, n=2)]
    for r in recs:
        r["horovod_info"]["nccl_built"] = False
    problems, _ = doctor_checks.analyze(recs, "digits", 1.0, 2)
    assert problems == ["horovod: host g (ranks 0,1): GPUs are visible but Horovod was built without NCCL: "
                        "rebuild with HVD_PCDARTS_GPU=1 scripts/install_horovod.sh"]
