"""Hostile and mistaken input: every case is one line on stderr that names the problem (and the fix), exit
status 2, no traceback, and nothing half-written: the output folder is not created, or - for a resume - left
exactly as it was. Each case runs the real command-line script in a fresh process."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import REPO_ROOT, describe, horovodrun_cmd, launch, mpirun_cmd, output_lines, python_exe

SEARCH = str(REPO_ROOT / "bin" / "train_search.py")
TRAIN = str(REPO_ROOT / "bin" / "train.py")
EVAL = str(REPO_ROOT / "bin" / "evaluate.py")
FAST = ["--dataset", "digits", "--init-channels", "4", "--layers", "3", "--workers", "0", "--no-tensorboard",
        "--no-progress", "--epochs", "2", "--arch-start-epoch", "0", "--batch-size", "16", "--steps-per-epoch", "1",
        "--eval-steps", "1"]
TFAST = ["--dataset", "digits", "--init-channels", "4", "--layers", "3", "--workers", "0", "--no-tensorboard",
         "--no-progress", "--epochs", "1", "--batch-size", "16", "--steps-per-epoch", "1", "--eval-steps", "1"]


def _snapshot(folder):
    if not folder.exists():
        return None
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _check(res, needle, out=None, before=None):
    assert res.returncode == 2, describe(res)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, describe(res)
    assert "Traceback" not in res.stderr + res.stdout, describe(res)
    assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    if out is not None:
        after = _snapshot(out)
        if before is None:  # a new run: no output folder, or an empty one
            assert not after, f"half-written output left in {out}: {sorted(after or {})}"
        else:
            assert after == before, f"{out} changed"


def _run(script, args, tmp_path, needle):
    out = tmp_path / "out"
    res = launch([python_exe(), script, *args, "--output-dir", out], timeout=120)
    _check(res, needle, out)
    return res


# --- data --------------------------------------------------------------------------------------------------------
def test_missing_data_folder(tmp_path):
    _run(SEARCH, [*FAST, "--dataset", "imagefolder", "--data-dir", tmp_path / "nowhere"], tmp_path, "nowhere")


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _run(SEARCH, [*FAST, "--dataset", "imagefolder", "--data-dir", tmp_path / "empty"], tmp_path, "empty")


def test_missing_cifar_files_without_download(tmp_path):
    (tmp_path / "data").mkdir()
    _run(SEARCH, [*FAST, "--dataset", "cifar10", "--data-dir", tmp_path / "data"], tmp_path, "--download")
    _run(TRAIN, ["--genotype", "PCDARTS", *TFAST, "--dataset", "cifar100", "--data-dir", tmp_path / "data"],
         tmp_path, "--download")


# --- genotypes ---------------------------------------------------------------------------------------------------
GOOD = {"normal": [["sep_conv_3x3", 0], ["skip_connect", 1]] * 4, "normal_concat": [2, 3, 4, 5],
        "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1]] * 4, "reduce_concat": [2, 3, 4, 5]}


def _bad(**change):
    g = json.loads(json.dumps(GOOD))
    g.update(change)
    return json.dumps(g)


@pytest.mark.parametrize("text,needle", [
    ("{not json", "not valid JSON"),
    (_bad(normal=[["conv_9x9", 0], ["skip_connect", 1]] * 4), "conv_9x9"),
    (_bad(normal=[["sep_conv_3x3", 7], ["skip_connect", 1]] * 4), "7"),
    (_bad(normal=[["sep_conv_3x3", 0]] * 5), "edges"),
    ("__import__('os').system('touch PWNED')", "JSON"),
], ids=["not-json", "unknown-op", "edge-out-of-range", "wrong-edge-count", "code"])
def test_bad_genotype_file(tmp_path, text, needle):
    path = tmp_path / "g.json"
    path.write_text(text)
    _run(TRAIN, ["--genotype", path, *TFAST], tmp_path, needle)
    assert not (tmp_path / "PWNED").exists() and not (REPO_ROOT / "PWNED").exists()


def test_genotype_argument_that_is_code_is_not_executed(tmp_path):
    _run(TRAIN, ["--genotype", "__import__('os').system('touch PWNED')", *TFAST], tmp_path, "genotype")
    assert not (REPO_ROOT / "PWNED").exists()


def test_genotype_path_is_a_directory(tmp_path):
    (tmp_path / "gdir").mkdir()
    _run(TRAIN, ["--genotype", tmp_path / "gdir", *TFAST], tmp_path, "directory")


# --- sizes, rates, epochs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [
    ("--batch-size", "0"), ("--batch-size", "-8"), ("--init-channels", "0"), ("--layers", "-1"),
    ("--partial-k", "0"), ("--epochs", "0"), ("--epochs", "-3"), ("--lr", "0"), ("--lr", "-0.1"),
    ("--arch-lr", "0"), ("--weight-decay", "-1"), ("--momentum", "-0.5"), ("--grad-clip", "-1"),
    ("--steps-per-epoch", "0"), ("--lr", "nan"), ("--batch-size", "many"),
])
def test_search_rejects_non_positive_numbers(tmp_path, flag, value):
    _run(SEARCH, [*FAST, flag, value], tmp_path, flag)


@pytest.mark.parametrize("flag,value", [
    ("--batch-size", "0"), ("--epochs", "0"), ("--lr", "-1"), ("--init-channels", "-4"), ("--layers", "0"),
    ("--drop-path-prob", "-0.1"), ("--cutout-length", "0"), ("--auxiliary-weight", "-1"),
])
def test_train_rejects_non_positive_numbers(tmp_path, flag, value):
    _run(TRAIN, ["--genotype", "PCDARTS", *TFAST, flag, value], tmp_path, flag)


def test_search_needs_three_layers(tmp_path):
    _run(SEARCH, [*FAST, "--layers", "2"], tmp_path, "--layers 2")


def test_partial_k_must_divide_channels(tmp_path):
    _run(SEARCH, [*FAST, "--init-channels", "6", "--partial-k", "4"], tmp_path, "--partial-k")


def test_arch_start_epoch_past_last_epoch(tmp_path):
    _run(SEARCH, [*FAST, "--epochs", "3", "--arch-start-epoch", "5"], tmp_path, "--arch-start-epoch")


def test_batch_larger_than_the_data(tmp_path):
    _run(SEARCH, [*FAST, "--batch-size", "4096"], tmp_path, "--batch-size")


# --- batch versus ranks (2 real ranks) ---------------------------------------------------------------------------
@pytest.mark.ranks
@pytest.mark.parametrize("batch,needle", [("15", "does not divide"), ("1", "smaller than")])
def test_batch_size_and_rank_count(tmp_path, batch, needle):
    out = tmp_path / "out"
    res = launch(mpirun_cmd(2, [SEARCH, *FAST, "--batch-size", batch, "--output-dir", out]), timeout=180)
    assert res.returncode == 2, describe(res)
    lines = [ln for ln in output_lines(res.stderr) if "error" in ln]
    assert len(lines) == 2 and all(needle in ln for ln in lines), describe(res)  # one line per rank
    assert "Traceback" not in res.stderr + res.stdout
    assert not _snapshot(out)


@pytest.mark.ranks
def test_batch_size_and_rank_count_under_horovodrun(tmp_path):
    out = tmp_path / "out"
    res = launch(horovodrun_cmd(2, [SEARCH, *FAST, "--batch-size", "15", "--output-dir", out]), timeout=180)
    assert res.returncode != 0
    rank_lines = [ln for ln in res.stdout.splitlines() + res.stderr.splitlines() if ln.startswith("[")]
    assert any("does not divide" in ln for ln in rank_lines), describe(res)
    assert not any("Traceback" in ln for ln in rank_lines), describe(res)
    assert not _snapshot(out)


# --- checkpoints ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "out"
    res = launch([python_exe(), SEARCH, *FAST, "--epochs", "1", "--output-dir", out], timeout=300)
    assert res.returncode == 0, describe(res)
    return out


@pytest.mark.parametrize("flag,value,needle", [
    ("--layers", "4", "layers"), ("--init-channels", "8", "init_channels"), ("--partial-k", "2", "partial_k"),
    ("--dataset", "imagefolder", "num_classes"),
], ids=["layers", "channels", "K", "classes"])
def test_resume_from_a_different_configuration(finished_search, tmp_path, flag, value, needle):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_search, out)
    before = _snapshot(out)
    args = [*FAST, "--epochs", "3", flag, value, "--output-dir", out, "--resume", "auto"]
    if flag == "--dataset":  # 3 classes instead of 10
        from PIL import Image

        for c in range(3):
            d = tmp_path / "pngs" / "train" / f"c{c}"
            d.mkdir(parents=True)
            for i in range(12):
                Image.new("RGB", (16, 16), (80 * c, 40, 40 + i)).save(d / f"{i}.png")
        args += ["--data-dir", tmp_path / "pngs", "--image-size", "16"]
    res = launch([python_exe(), SEARCH, *args], timeout=120)
    _check(res, needle, out, before)
    assert "different configuration" in res.stderr


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_checkpoint(finished_search, tmp_path, damage):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_search, out)
    ck = out / "checkpoint.pt"
    data = ck.read_bytes()
    ck.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    before = _snapshot(out)
    res = launch([python_exe(), SEARCH, *FAST, "--epochs", "3", "--output-dir", out, "--resume", "auto"],
                 timeout=120)
    _check(res, "cannot be loaded", out, before)
    res = launch([python_exe(), EVAL, ck], timeout=120)
    _check(res, "cannot be loaded")


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    ck = tmp_path / "evil.pt"
    torch.save({"format": "hvd-pcdarts-train-v1", "x": Evil()}, ck)
    res = launch([python_exe(), EVAL, ck], timeout=120)
    _check(res, "cannot be loaded")
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_path_is_a_directory(tmp_path):
    (tmp_path / "ckdir").mkdir()
    _run(SEARCH, [*FAST, "--resume", tmp_path / "ckdir"], tmp_path, "directory")
    res = launch([python_exe(), EVAL, tmp_path / "ckdir"], timeout=120)
    _check(res, "directory")


def test_search_checkpoint_given_to_train(finished_search, tmp_path):
    _run(TRAIN, ["--genotype", "PCDARTS", *TFAST, "--resume", finished_search / "checkpoint.pt"], tmp_path,
         "not a training checkpoint")


# --- output folder -------------------------------------------------------------------------------------------------
def test_output_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = launch([python_exe(), SEARCH, *FAST, "--output-dir", blocker / "out"], timeout=120)
    _check(res, "cannot be written")
    assert blocker.read_text() == "x"
    res = launch([python_exe(), TRAIN, "--genotype", "PCDARTS", *TFAST, "--output-dir", blocker], timeout=120)
    _check(res, "cannot be written")


# --- devices -------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("script,flags", [(SEARCH, ["--amp"]), (SEARCH, ["--device", "cuda"]),
                                          (TRAIN, ["--amp"]), (TRAIN, ["--device", "cuda"])])
def test_gpu_requests_without_a_gpu(tmp_path, script, flags):
    args = [*FAST, *flags] if script == SEARCH else ["--genotype", "PCDARTS", *TFAST, *flags]
    _run(script, args, tmp_path, flags[0])
