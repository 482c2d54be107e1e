"""An unreadable image in an ImageFolder tree: the run stops with one line naming the file (relative to
--data-dir), whichever rank or loader worker meets it; `bin/doctor.py --scan-data` reads every image before the
job, split over the ranks, and lists the unreadable ones."""

from __future__ import annotations

import json
import re

import pytest
from helpers import REPO_ROOT, describe, horovodrun_cmd, launch, png_tree, python_exe

TRAIN = str(REPO_ROOT / "bin" / "train.py")
SEARCH = str(REPO_ROOT / "bin" / "train_search.py")
DOCTOR = str(REPO_ROOT / "bin" / "doctor.py")
TINY = ["--dataset", "imagefolder", "--image-size", "16", "--init-channels", "4", "--layers", "3", "--epochs", "1",
        "--no-tensorboard", "--no-progress"]


def _bad_tree(root, *bad):
    png_tree(root)  # 3 classes x 10 train, x 5 val images
    for rel in bad:
        (root / rel).write_bytes(b"not an image")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_unreadable_image_is_one_line_naming_it(workers, tmp_path):
    _bad_tree(tmp_path / "data", "train/class1/3.png")
    res = launch([python_exe(), TRAIN, "--genotype", "PCDARTS", *TINY, "--data-dir", tmp_path / "data",
                  "--batch-size", "10", "--workers", workers, "--output-dir", tmp_path / "o"], timeout=300)
    assert res.returncode == 2, describe(res)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, describe(res)
    assert lines[0].startswith("train.py: error: unreadable image train/class1/3.png in --data-dir "), lines[0]
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


@pytest.mark.ranks
def test_unreadable_image_under_two_ranks_names_the_file(tmp_path):
    """A 2-rank search with loader workers: the rank that reads the file says which it is; the other rank
    ends with its lost-contact line; no rank prints a traceback."""
    _bad_tree(tmp_path / "data", "train/class2/7.png")
    res = launch(horovodrun_cmd(2, [SEARCH, *TINY, "--data-dir", tmp_path / "data", "--arch-start-epoch", "0",
                                    "--batch-size", "6", "--workers", "1", "--output-dir", tmp_path / "o"]),
                 timeout=300)
    assert res.returncode != 0, describe(res)
    ranks = [ln for ln in res.stderr.splitlines() if re.match(r"^\[\d+\]<stderr>:", ln)]
    named = [ln for ln in ranks if "error: unreadable image train/class2/7.png in --data-dir" in ln]
    assert named and not [ln for ln in ranks if "Traceback" in ln], describe(res)


@pytest.mark.ranks
def test_doctor_scan_data_lists_every_unreadable_image(tmp_path):
    bad = ["train/class0/4.png", "val/class2/1.png"]
    _bad_tree(tmp_path / "data", *bad)
    report = tmp_path / "doctor.json"
    res = launch(horovodrun_cmd(2, [DOCTOR, "--dataset", "imagefolder", "--data-dir", tmp_path / "data",
                                    "--output-dir", tmp_path / "runs", "--scan-data", "--json", report]), timeout=300)
    assert res.returncode != 0, describe(res)
    rep = json.loads(report.read_text())
    assert not rep["ok"]
    found = sorted(p for p in rep["problems"] if p.startswith("unreadable image: "))
    assert [p.split(": ")[1] for p in found] == bad, rep["problems"]
    reads = [r["scan"]["read"] for r in rep["ranks"]]
    assert sum(reads) == 45 and sorted(reads) == [22, 23], reads  # split over the ranks, every file once
    for rel in bad:
        assert f"PROBLEM: unreadable image: {rel}: " in res.stdout, describe(res)


def test_doctor_scan_data_on_a_clean_tree(tmp_path):
    png_tree(tmp_path / "data")
    res = launch([python_exe(), DOCTOR, "--dataset", "imagefolder", "--data-dir", tmp_path / "data", "--output-dir",
                  tmp_path / "runs", "--scan-data"], timeout=300)
    assert res.returncode == 0, describe(res)
    assert "note: --scan-data: all 45 images read, none unreadable" in res.stdout, describe(res)
