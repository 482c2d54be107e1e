"""The search report (RUN/report.md, RUN/report/*.png): from a finished search and from a resumed one, its numbers
against metrics.jsonl, the search log's last line, and bin/report.py's refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from hvd_pcdarts.commands import report
from hvd_pcdarts.errors import Preempted
from hvd_pcdarts.space.genotypes import PCDARTS, PRIMITIVES, to_dict
from hvd_pcdarts.tools import plots
from hvd_pcdarts.tools.report import final_line, load_run, log_report, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CELLS = (("normal", "normal"), ("reduce", "reduction"))
SECTIONS = ("# Search report", "## Genotype history", "## Margins of every edge (last epoch)",
            "## Margins over the epochs", "## Architecture weights of the result's edges", "## Cells")


def _search(out, *extra):
    from hvd_pcdarts.search import Searcher, parse_args

    args = parse_args(["--dataset", "digits", "--init-channels", "4", "--layers", "3", "--workers", "0",
                       "--no-progress", "--no-tensorboard", "--batch-size", "32", "--steps-per-epoch", "2",
                       "--eval-steps", "1", "--epochs", "3", "--arch-start-epoch", "0", "--output-dir", str(out),
                       *extra])
    return Searcher(args).run()


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """An uninterrupted tiny search (3 epochs), once per module."""
    out = tmp_path_factory.mktemp("report") / "full"
    assert _search(out) == 0
    return out


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _table(text, first):
    """The cells of the markdown table rows that start with `| first |`."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first} |")]


def _settled_by_hand(rows, cell, g):
    """1-based epoch from which gene g of the last row's genotype stays in its node's pair, walking backwards."""
    node, gene = g // 2, rows[-1]["genotype"][cell][g]
    epoch = None
    for row in reversed(rows):
        if gene not in row["genotype"][cell][2 * node:2 * node + 2]:
            break
        epoch = row["epoch"] + 1
    return epoch


def test_report_of_a_finished_search(searched):
    """The search wrote report.md and its pictures; the settled epochs are those of metrics.jsonl's genotypes, the
    margins those of the last epoch's diagnostics, the undecided flags follow the default threshold 0.05, and the
    log's last line says how many edges of the result are undecided."""
    text = (searched / "report.md").read_text()
    assert [s for s in SECTIONS if s not in text.splitlines()] == []
    assert "below 0.05 (`--margin-threshold`)" in text
    assert str(searched) not in text  # no paths: a resumed run in another folder reads the same
    rows = _rows(searched)
    assert rows[-1]["genotype"] == json.loads((searched / "genotype.json").read_text())["genotype"]
    undecided = {}
    for cell, name in CELLS:
        table = _table(text, name)
        diag = rows[-1]["diagnostics"][cell]["margin"]
        assert len(table) == 8
        for g, (node, edge, op, settled, margin, flag) in enumerate(row[1:] for row in table):
            want_op, j = rows[-1]["genotype"][cell][g]
            assert (int(node), op) == (g // 2, want_op)
            assert edge == f"{plots.edge_source(j)} \u2192 {g // 2}"
            assert int(settled) == _settled_by_hand(rows, cell, g)
            m = diag[_edge(g // 2, j)]
            assert margin == f"{m:.5f}"
            assert (flag == "**undecided**") == (m < 0.05)
        undecided[name] = sum(m < 0.05 for m in (float(r[5]) for r in table))
    for cell, name in CELLS:  # every edge in the margins tables, 14 per cell, flagged by its own margin
        section = text.split(f"{name.capitalize()} cell:")[1].split("\n\n")[1]
        lines = [ln for ln in section.splitlines() if ln.startswith("| ") and "\u2192" in ln]
        want = [round(m, 5) for m in rows[-1]["diagnostics"][cell]["margin"]]
        assert [float(ln.split("|")[5]) for ln in lines] == want
        assert all(("**undecided**" in ln) == (float(ln.split("|")[5]) < 0.05) for ln in lines)
    for png in ("report/margins.png", "report/arch_weights.png", "cells/normal.png"):
        if png.startswith("cells") and not (searched / png).exists():
            assert "No pictures:" in text.split("## Cells")[1]
            continue
        assert (searched / png).read_bytes()[:8] == PNG_MAGIC and f"]({png})" in text
        with Image.open(searched / png) as im:
            im.verify()
    last = (searched / "log.txt").read_text().splitlines()[-1]
    n, r = undecided["normal"], undecided["reduction"]
    assert n + r > 0  # a 3-epoch search is a coin toss
    assert last.endswith(f"warning: {n} of 8 normal edges and {r} of 8 reduction edges of the result are undecided "
                         f"(softmax margin < 0.05); see {searched / 'report.md'}")


def test_report_of_a_resumed_search_equals_the_uninterrupted_one(searched, tmp_path):
    """Stopped mid-epoch 2 (SIGTERM after global step 3), then --resume auto: the same report.md, word for word;
    bin/report.py on the finished folder writes it again unchanged."""
    part = tmp_path / "part"
    with pytest.raises(Preempted):
        _search(part, "--raise-signal", "TERM@3")
    assert not (part / "report.md").exists()
    assert _search(part, "--resume", "auto") == 0
    assert (part / "report.md").read_text() == (searched / "report.md").read_text()
    before = (part / "report.md").read_text()
    assert report([str(part)]) == 0
    assert (part / "report.md").read_text() == before


# --- hand-made runs ---------------------------------------------------------------------------------------------
def _alphas(decided: set[int], n_edges=14):
    """Rows of alphas: the edges in `decided` strongly prefer sep_conv_3x3, the others are nearly uniform."""
    sep = PRIMITIVES.index("sep_conv_3x3")
    return [[3.0 if (k == sep and e in decided) else 0.001 * ((e + k) % 3) for k in range(len(PRIMITIVES))]
            for e in range(n_edges)]


def _geno(ops_normal):
    g = to_dict(PCDARTS)
    g["normal"] = [[op, j] for op, j in ops_normal]
    return g


def _write_run(d, genotypes, decided_normal, decided_reduce, arch=True):
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for epoch, g in enumerate(genotypes):
        row = {"epoch": epoch, "valid_acc": 10.0 + epoch, "genotype": g}
        if arch:
            row["arch"] = {"alphas_normal": _alphas(decided_normal), "alphas_reduce": _alphas(decided_reduce),
                           "betas_normal": [0.0] * 14, "betas_reduce": [0.0] * 14}
        rows.append(json.dumps(row))
    (d / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    (d / "genotype.json").write_text(json.dumps({"genotype": genotypes[-1]}))
    return d


# the edges of PCDARTS' cells: (node, input) -> edge index
def _edge(node, j):
    return sum(range(2, 2 + node)) + j


PC = to_dict(PCDARTS)
ALL_NORMAL = {_edge(g // 2, j) for g, (_, j) in enumerate(PC["normal"])}
ALL_REDUCE = {_edge(g // 2, j) for g, (_, j) in enumerate(PC["reduce"])}


class Lines:
    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(msg)


def test_the_last_line_counts_the_undecided_edges_of_the_result(tmp_path):
    """Three chosen normal edges nearly uniform, every chosen reduction edge decided: the warning names 3 of 8 and
    0 of 8 and the threshold, and is the last line; unchosen edges do not count."""
    undecided = {_edge(0, 1), _edge(2, 0), _edge(3, 1)}
    d = _write_run(tmp_path / "run", [PC] * 2, ALL_NORMAL - undecided, ALL_REDUCE)
    out = Lines()
    log_report(str(d), 0.05, out)
    assert out.lines[-1] == ("warning: 3 of 8 normal edges and 0 of 8 reduction edges of the result are undecided "
                             f"(softmax margin < 0.05); see {d / 'report.md'}")
    text = (d / "report.md").read_text()
    flagged = [r for r in _table(text, "normal") if r[-1] == "**undecided**"]
    assert sorted((int(r[1]), r[2]) for r in flagged) == sorted(
        (g // 2, f"{plots.edge_source(j)} \u2192 {g // 2}") for g, (_, j) in enumerate(PC["normal"])
        if _edge(g // 2, j) in undecided)
    assert _table(text, "reduction") and not [r for r in _table(text, "reduction") if r[-1] == "**undecided**"]


def test_when_every_edge_is_decided_the_last_line_is_no_warning(tmp_path):
    d = _write_run(tmp_path / "run", [PC], ALL_NORMAL, ALL_REDUCE)
    out = Lines()
    log_report(str(d), 0.05, out)
    assert out.lines == [f"search report: all 16 edges of the result are decided (softmax margin >= 0.05); "
                         f"see {d / 'report.md'}"]
    run = load_run(str(d))
    assert final_line(run, 0.99, None) == ("warning: 8 of 8 normal edges and 8 of 8 reduction edges of the result "
                                           "are undecided (softmax margin < 0.99)")


def test_settled_is_the_epoch_from_which_an_edge_stayed_chosen(tmp_path):
    """Node 0's edges leave at epoch 2 and are back from epoch 3 on: settled at 3; node 1's change at epoch 4:
    settled at 4; the other nodes never changed: epoch 1."""
    a, b, c = to_dict(PCDARTS), to_dict(PCDARTS), to_dict(PCDARTS)
    b["normal"][0:2] = [["max_pool_3x3", 0], ["max_pool_3x3", 1]]
    c["normal"][2:4] = [["avg_pool_3x3", 0], ["avg_pool_3x3", 2]]
    d = _write_run(tmp_path / "run", [a, b, a, c], ALL_NORMAL, ALL_REDUCE)
    write_report(str(d))
    text = (d / "report.md").read_text()
    assert [int(r[4]) for r in _table(text, "normal")] == [3, 3, 4, 4, 1, 1, 1, 1]
    assert [int(r[4]) for r in _table(text, "reduction")] == [1] * 8
    assert [r[:2] for r in _table(text, "1") + _table(text, "2") + _table(text, "3") + _table(text, "4")] == [
        ["1", "-"], ["2", "yes"], ["3", "yes"], ["4", "yes"]]  # the history: epoch, genotype changed


def _files(d):
    return sorted(os.path.relpath(os.path.join(p, f), d) for p, _, fs in os.walk(d) for f in fs) if d.exists() else []


def _usage_error(capsys, argv, needle, d):
    before = {f: (d / f).read_bytes() for f in _files(d)}
    assert report(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("report.py: error: ") and needle in err[0], err
    assert {f: (d / f).read_bytes() for f in _files(d)} == before  # nothing written


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"),
    ("no_metrics", "metrics.jsonl: no such file"),
    ("not_a_search", "not the metrics of an architecture search"),
    ("broken_metrics", "line 2: not valid JSON"),
    ("no_genotype", "genotype.json: no such file"),
    ("broken_genotype", "genotype.json: not valid JSON"),
    ("bad_genotype", "genotype.json"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, needle, tmp_path, capsys):
    d = tmp_path / "run"
    if case != "missing":
        _write_run(d, [PC, PC], ALL_NORMAL, ALL_REDUCE, arch=case != "not_a_search")
    if case == "no_metrics":
        (d / "metrics.jsonl").unlink()
    elif case == "broken_metrics":
        (d / "metrics.jsonl").write_text((d / "metrics.jsonl").read_text().splitlines()[0] + "\n{oops\n")
    elif case == "no_genotype":
        (d / "genotype.json").unlink()
    elif case == "broken_genotype":
        (d / "genotype.json").write_text("{")
    elif case == "bad_genotype":
        (d / "genotype.json").write_text(json.dumps({"genotype": {"normal": [["nope", 0]]}}))
    _usage_error(capsys, [str(d)], needle, d)


def test_bin_report_py_writes_the_report_and_refuses_a_bad_threshold(tmp_path):
    d = _write_run(tmp_path / "run", [PC], ALL_NORMAL, ALL_REDUCE)
    script = os.path.join(ROOT, "bin", "report.py")
    r = subprocess.run([sys.executable, script, str(d), "--margin-threshold", "0.5"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(f"(softmax margin >= 0.5); see {d / 'report.md'}")
    assert "below 0.5 (`--margin-threshold`)" in (d / "report.md").read_text()
    r = subprocess.run([sys.executable, script, str(d), "--margin-threshold", "2"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--margin-threshold" in r.stderr


def test_without_matplotlib_the_report_is_text_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    d = _write_run(tmp_path / "run", [PC], ALL_NORMAL, ALL_REDUCE)
    write_report(str(d))
    text = (d / "report.md").read_text()
    assert "None: matplotlib is not installed" in text and "report/" not in text and not (d / "report").exists()
    assert "## Genotype history" in text and len(_table(text, "normal")) == 8
