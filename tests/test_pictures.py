"""Pictures: the cell drawings (bin/visualize.py) and the architecture-weight plot (bin/plot_search.py)."""

from __future__ import annotations

import html
import json
import os
import random
import subprocess
import sys

import pytest

from hvd_pcdarts.space.genotypes import PCDARTS, PRIMITIVES, to_dict
from hvd_pcdarts.tools import plots, visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMEOUT = 120


def run(script, *args, path=None):
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, os.path.join(ROOT, "bin", script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def assert_usage_error(r, needle):
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def metrics_line(epoch, rng, arch=True):
    rec = {"epoch": epoch, "lr": 0.1, "train_loss": 2.0 - epoch / 10, "train_acc": 0.2 + epoch / 10,
           "valid_loss": 2.1, "valid_acc": 0.15 + epoch / 10, "epoch_time_s": 3.0, "images_per_s": 100.0,
           "world_size": 2, "genotype": to_dict(PCDARTS)}
    if arch:
        rec["arch"] = {
            "alphas_normal": [[rng.gauss(0, 1e-2) for _ in PRIMITIVES] for _ in range(14)],
            "alphas_reduce": [[rng.gauss(0, 1e-2) for _ in PRIMITIVES] for _ in range(14)],
            "betas_normal": [rng.gauss(0, 1e-2) for _ in range(14)],
            "betas_reduce": [rng.gauss(0, 1e-2) for _ in range(14)],
        }
    return json.dumps(rec)


@pytest.fixture
def run_dir(tmp_path):
    rng = random.Random(0)
    d = tmp_path / "search"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(metrics_line(e, rng) + "\n" for e in range(3)))
    (d / "genotype.json").write_text(json.dumps({"genotype": to_dict(PCDARTS), "epoch": 2}))
    return d


@pytest.mark.slow
def test_plot_search_png_and_svg(run_dir, tmp_path):
    r = run("plot_search.py", str(run_dir))
    assert r.returncode == 0, r.stderr
    png = run_dir / "arch_weights.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert r.stdout.strip() == str(png)
    svg = tmp_path / "arch.svg"
    r = run("plot_search.py", str(run_dir), "--out", str(svg))
    assert r.returncode == 0, r.stderr
    text = svg.read_text()
    assert "<svg" in text
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_visualize_writes_four_files(run_dir, tmp_path):
    out = tmp_path / "cells"
    r = run("visualize.py", str(run_dir / "genotype.json"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["normal.png", "normal.svg", "reduction.png", "reduction.svg"]
    for cell in ("normal", "reduction"):
        assert (out / f"{cell}.png").read_bytes()[:8] == PNG_MAGIC
        svg = html.unescape((out / f"{cell}.svg").read_text())  # dot writes "-" as &#45;
        assert "<svg" in svg and "c_{k-2}" in svg and "c_{k}" in svg
    normal = (out / "normal.svg").read_text()
    assert "sep_conv_3x3" in normal and "skip_connect" in normal
    assert "max_pool_3x3" in (out / "reduction.svg").read_text()


def test_visualize_published_name_in_process(tmp_path):
    paths = visualize.render_genotype("PC_DARTS_image", str(tmp_path / "x"))
    assert sorted(os.path.basename(p) for p in paths) == ["normal.png", "normal.svg", "reduction.png",
                                                         "reduction.svg"]


def test_visualize_errors(run_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_usage_error(run("visualize.py", str(bad), "--out", str(tmp_path / "o1")), "not valid JSON")
    assert not (tmp_path / "o1").exists()
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"normal": [["conv_9x9", 0]]}))
    assert_usage_error(run("visualize.py", str(wrong), "--out", str(tmp_path / "o2")), "missing key")
    assert_usage_error(run("visualize.py", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o3")),
                       "no such file")
    assert_usage_error(run("visualize.py", "PCDARTS"), "--out")


def test_visualize_without_dot(run_dir, tmp_path):
    empty = tmp_path / "empty_path"
    empty.mkdir()
    out = tmp_path / "cells"
    r = run("visualize.py", str(run_dir / "genotype.json"), "--out", str(out), path=str(empty))
    assert_usage_error(r, "apt-get install graphviz")
    assert not out.exists()


def test_render_genotype_never_raises_without_graphviz(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not visualize.have_graphviz()
    assert visualize.render_genotype(PCDARTS, str(tmp_path / "cells")) == []
    assert "apt-get install graphviz" in capsys.readouterr().err
    assert not (tmp_path / "cells").exists()


@pytest.mark.parametrize("case,needle", [
    ("no_dir", "does not exist"),
    ("no_metrics", "metrics.jsonl: no such file"),
    ("empty", "is empty"),
    ("no_arch", "no \"arch\""),
    ("bad_json", "line 2: not valid JSON"),
    ("bad_shape", "alphas_normal must be"),
    ("bad_ext", "unsupported picture format"),
])
def test_plot_search_errors(case, needle, tmp_path):
    rng = random.Random(1)
    d = tmp_path / "run"
    args = []
    if case != "no_dir":
        d.mkdir()
    if case == "empty":
        (d / "metrics.jsonl").write_text("\n")
    elif case == "no_arch":
        (d / "metrics.jsonl").write_text(metrics_line(0, rng) + "\n" + metrics_line(1, rng, arch=False) + "\n")
    elif case == "bad_json":
        (d / "metrics.jsonl").write_text(metrics_line(0, rng) + "\n{oops\n")
    elif case == "bad_shape":
        rec = json.loads(metrics_line(0, rng))
        rec["arch"]["alphas_normal"][3] = [0.0, 1.0]
        (d / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    elif case == "bad_ext":
        (d / "metrics.jsonl").write_text(metrics_line(0, rng) + "\n")
        args = ["--out", str(tmp_path / "x.gif")]
    assert_usage_error(run("plot_search.py", str(d), *args), needle)
    if d.exists():
        assert not (d / "arch_weights.png").exists()


def test_cell_arithmetic():
    assert [plots.steps_for_edges(n) for n in (2, 5, 9, 14)] == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        plots.steps_for_edges(13)
    assert [list(r) for r in plots.node_edges(3)] == [[0, 1], [2, 3, 4], [5, 6, 7, 8]]
    assert plots.edge_source(0) == "c_{k-2}" and plots.edge_source(3) == "node 1"
