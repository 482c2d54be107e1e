"""The search report: RUN/report.md with its pictures RUN/report/*.png, from RUN/metrics.jsonl and RUN/genotype.json.

It says how decided the result of a search is: when each edge of the derived genotype settled (the epoch from which
it stayed chosen), the margin of every edge between the two largest entries of softmax(alpha) over its operations
(the `margin` of the metrics' diagnostics) with the edges below a threshold flagged undecided, the architecture
weights of the result's edges as softmax(alpha) - 1/8 on an axis fitted to them, and the cells. Epochs are counted
from 1, as in log.txt. The text depends on the metrics and genotype only (no paths, no times), so a resumed search
gets the report of the uninterrupted one. Rank 0 writes it at the end of a search; `bin/report.py RUN` on demand.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..checkpoint import atomic_write_text
from ..errors import UsageError
from ..space.genotypes import PRIMITIVES, from_dict, node_edges, steps_for_edges, to_dict
from . import plots

DEFAULT_THRESHOLD = 0.05
CELLS = (("normal", "alphas_normal", "normal"), ("reduce", "alphas_reduce", "reduction"))  # key, alphas, name
PICTURES = ("margins.png", "arch_weights.png")


@dataclass
class Run:
    rows: list  # metrics.jsonl, one dict per epoch
    result: dict  # the genotype of genotype.json, as to_dict writes it
    saved: dict  # genotype.json
    args: dict  # args.json ({} when absent or unreadable)


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file ({what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def load_run(run_dir: str) -> Run:
    """The finished (or stopped) search in `run_dir`, validated; any problem raises UsageError."""
    rows = plots.read_metrics(run_dir)
    path = os.path.join(run_dir, "metrics.jsonl")
    steps = {key: steps_for_edges(len(rows[0]["arch"][akey])) for key, akey, _ in CELLS}
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get("epoch"), int) or isinstance(row["epoch"], bool):
            raise UsageError(f"{path} epoch {n}: no integer \"epoch\" (not the metrics of bin/train_search.py)")
        row["genotype"] = _genotype(row.get("genotype"), f"{path} epoch {row['epoch'] + 1}", steps)
    gpath = os.path.join(run_dir, "genotype.json")
    saved = _read_json(gpath, "the genotype a search writes")
    if not isinstance(saved, dict):
        raise UsageError(f"{gpath}: expected a JSON object with a \"genotype\"")
    result = _genotype(saved.get("genotype"), gpath, steps)
    try:
        args = _read_json(os.path.join(run_dir, "args.json"), "")
    except UsageError:
        args = {}
    return Run(rows, result, saved, args if isinstance(args, dict) else {})


def _genotype(obj, where: str, steps: dict) -> dict:
    if obj is None:
        raise UsageError(f"{where}: no \"genotype\" (not the output of bin/train_search.py)")
    g = to_dict(from_dict(obj, where=where))  # GenotypeError is a UsageError
    for key, _, _ in CELLS:
        if len(g[key]) != 2 * steps[key]:
            raise UsageError(f"{where}: the {key} cell has {len(g[key]) // 2} nodes, the metrics' {steps[key]}")
    return g


# --- what the report says -------------------------------------------------------------------------------------
def margin(probs: list[float]) -> float:
    """Top-1 minus top-2 of an edge's softmax(alpha) (the diagnostics' `margin`)."""
    top = sorted(probs, reverse=True)
    return top[0] - top[1]


def epoch_label(row: dict) -> int:
    return row["epoch"] + 1


def probs(row: dict, alphas_key: str) -> list[list[float]]:
    return [plots.softmax(edge) for edge in row["arch"][alphas_key]]


def result_edges(run: Run, cell: str, alphas_key: str) -> list[dict]:
    """The edges of the result's `cell`, two per node: node, input, op, edge index, settled epoch, final margin."""
    steps = len(run.result[cell]) // 2
    edges = node_edges(steps)
    final = probs(run.rows[-1], alphas_key)
    out = []
    for g, (op, j) in enumerate(run.result[cell]):
        node = g // 2
        e = edges[node][j]
        out.append(dict(node=node, input=j, op=op, edge=e, label=f"{plots.edge_source(j)} \u2192 {node}",
                        settled=settled_epoch(run.rows, cell, node, [op, j]), margin=margin(final[e])))
    return out


def settled_epoch(rows: list[dict], cell: str, node: int, gene: list) -> int | None:
    """The first epoch from which `gene` ([op, input]) is one of `node`'s two edges in every later epoch's genotype;
    None when the last epoch's genotype lacks it."""
    settled = None
    for row in rows:
        if gene in row["genotype"][cell][2 * node:2 * node + 2]:
            settled = epoch_label(row) if settled is None else settled
        else:
            settled = None
    return settled


def undecided(run: Run, threshold: float) -> dict:
    """{cell: (undecided edges of the result, edges of the result)}."""
    out = {}
    for cell, akey, _ in CELLS:
        edges = result_edges(run, cell, akey)
        out[cell] = (sum(e["margin"] < threshold for e in edges), len(edges))
    return out


def verdict(run: Run, threshold: float) -> tuple[bool, str]:
    """(whether edges of the result are undecided, one sentence that says how many, with the threshold)."""
    counts = undecided(run, threshold)
    if not any(n for n, _ in counts.values()):
        total = sum(t for _, t in counts.values())
        return False, f"all {total} edges of the result are decided (softmax margin >= {threshold:g})"
    parts = [f"{counts[cell][0]} of {counts[cell][1]} {name} edges" for cell, _, name in CELLS]
    return True, f"{' and '.join(parts)} of the result are undecided (softmax margin < {threshold:g})"


def final_line(run: Run, threshold: float, report_path: str | None) -> str:
    """The search log's last line: a warning when edges of the result are undecided."""
    warn, text = verdict(run, threshold)
    return f"{'warning' if warn else 'search report'}: {text}" + (f"; see {report_path}" if report_path else "")


# --- report.md ------------------------------------------------------------------------------------------------
def _flag(m: float, threshold: float) -> str:
    return "**undecided**" if m < threshold else ""


def _header(run: Run, threshold: float) -> list[str]:
    rows, a = run.rows, run.args
    span = f"epochs {epoch_label(rows[0])}-{epoch_label(rows[-1])}"
    span += f" of {a['epochs']}" if isinstance(a.get("epochs"), int) else ""
    if isinstance(a.get("arch_start_epoch"), int):
        span += f"; architecture training from epoch {a['arch_start_epoch'] + 1}"
    rule = run.saved.get("derivation") or {}
    how = f", derived with --skip-cap {rule['skip_cap']}" if "skip_cap" in rule else ""
    lines = ["# Search report", "", f"{len(rows)} epoch(s) in metrics.jsonl ({span}); the result is genotype.json's "
             f"genotype{how}."]
    stop = run.saved.get("early_stop")
    if isinstance(stop, dict) and "reason" in stop:
        lines += ["", f"Early stop ({stop.get('rule')}) after epoch {stop.get('epochs_run')}: {stop['reason']}."]
    lines += ["", f"An edge is **undecided** when the margin between the two largest entries of its softmax(\u03b1) "
              f"over the {len(PRIMITIVES)} operations is below {threshold:g} (`--margin-threshold`); a uniform edge "
              f"(1/{len(PRIMITIVES)} each) has margin 0.", "", f"**Verdict: {verdict(run, threshold)[1]}.**", ""]
    return lines


def _history(run: Run, threshold: float) -> list[str]:
    lines = ["## Genotype history", "", "| epoch | genotype changed | normal skip_connect | search-valid acc |",
             "|---:|:---:|---:|---:|"]
    previous = None
    for row in run.rows:
        diag = row.get("diagnostics") if isinstance(row.get("diagnostics"), dict) else {}
        changed = diag.get("genotype_changed", None if previous is None else row["genotype"] != previous)
        skips = sum(op == "skip_connect" for op, _ in row["genotype"]["normal"])
        acc = row.get("valid_acc")
        lines.append(f"| {epoch_label(row)} | {'-' if changed is None else 'yes' if changed else 'no'} | {skips} | "
                     + (f"{acc:.2f} |" if isinstance(acc, (int, float)) else "- |"))
        previous = row["genotype"]
    lines += ["", "When each edge of the result settled: the epoch from which it stayed one of its node's two edges, "
              "with that operation.", "", "| cell | node | edge | operation | settled at epoch | final margin | |",
              "|---|---:|---|---|---:|---:|---|"]
    for cell, akey, name in CELLS:
        for e in result_edges(run, cell, akey):
            settled = "never (not in the last epoch's genotype)" if e["settled"] is None else e["settled"]
            lines.append(f"| {name} | {e['node']} | {e['label']} | {e['op']} | {settled} | {e['margin']:.5f} | "
                         f"{_flag(e['margin'], threshold)} |")
    return lines + [""]


def _margins(run: Run, threshold: float) -> list[str]:
    lines = ["## Margins of every edge (last epoch)", ""]
    for cell, akey, name in CELLS:
        chosen = {e["edge"]: e["op"] for e in result_edges(run, cell, akey)}
        lines += [f"{name.capitalize()} cell:", "", "| edge | in the result | top-1 | top-2 | margin | |",
                  "|---|---|---|---|---:|---|"]
        final = probs(run.rows[-1], akey)
        steps = len(run.result[cell]) // 2
        for node, edges in enumerate(node_edges(steps)):
            for j, e in enumerate(edges):
                top = sorted(range(len(PRIMITIVES)), key=lambda k: (-final[e][k], k))[:2]
                ops = [f"{PRIMITIVES[k]} {final[e][k]:.5f}" for k in top]
                m = margin(final[e])
                lines.append(f"| {plots.edge_source(j)} \u2192 {node} | {chosen.get(e, '')} | {ops[0]} | {ops[1]} | "
                             f"{m:.5f} | {_flag(m, threshold)} |")
        lines.append("")
    return lines


def _figures(run: Run, threshold: float) -> dict:
    """The pictures' data: {file name: figure function and its arguments} for the result's edges."""
    epochs = [epoch_label(r) for r in run.rows]
    margins, weights = {}, {}
    for cell, akey, name in CELLS:
        series = [probs(r, akey) for r in run.rows]
        edges = result_edges(run, cell, akey)
        margins[name] = [(f"{e['label']} {e['op']}", [margin(s[e["edge"]]) for s in series]) for e in edges]
        weights[name] = [(f"{e['label']} ({e['op']})", [s[e["edge"]] for s in series]) for e in edges]
    return {"margins.png": (plots.margin_figure, (epochs, margins, threshold)),
            "arch_weights.png": (plots.change_figure, (epochs, weights))}


def _pictures(run_dir: str, run: Run, threshold: float) -> list[str]:
    """Write RUN/report/*.png; the lines of report.md that show them (or say why there are none)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ["## Pictures", "", "None: matplotlib is not installed (pip install matplotlib).", ""]
    folder = os.path.join(run_dir, "report")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {folder}: {e.strerror or e}") from None
    for file, (make, args) in _figures(run, threshold).items():
        plots.save_figure(make(*args), os.path.join(folder, file))
    return ["## Margins over the epochs", "", "The result's edges, on a y axis fitted to their margins; the dashed "
            "line is the threshold (the title names it when every margin is far below it).", "",
            "![margins](report/margins.png)", "", "## Architecture weights of the result's edges", "",
            f"softmax(\u03b1) \u2212 1/{len(PRIMITIVES)} of every operation, on a y axis fitted to each cell "
            f"type's values.", "", "![architecture weights](report/arch_weights.png)", ""]


def _cells(run_dir: str, run: Run) -> list[str]:
    """Links to RUN/cells/{normal,reduction}.png of the result, drawn (again: a resumed search can change the
    result) when graphviz is installed; without graphviz, the pictures already there."""
    from .visualize import render_genotype

    files = [f"cells/{name}.png" for _, _, name in CELLS]
    try:
        render_genotype(from_dict(run.result), os.path.join(run_dir, "cells"), strict=True)
    except UsageError as e:  # graphviz missing or failing
        if not all(os.path.isfile(os.path.join(run_dir, f)) for f in files):
            return ["## Cells", "", f"No pictures: {e}.", ""]
    return ["## Cells", ""] + [f"![{name} cell]({f})" for (_, _, name), f in zip(CELLS, files)] + [""]


def write_report(run_dir: str, threshold: float = DEFAULT_THRESHOLD, run: Run | None = None) -> str:
    """Write RUN/report.md and RUN/report/*.png for the search in `run_dir`; returns report.md's path. Bad input
    raises UsageError before anything is written."""
    run = run or load_run(run_dir)
    text = _header(run, threshold) + _history(run, threshold) + _margins(run, threshold)
    text += _pictures(run_dir, run, threshold) + _cells(run_dir, run)
    path = os.path.join(run_dir, "report.md")
    try:
        atomic_write_text(path, "\n".join(text).rstrip("\n") + "\n")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def log_report(run_dir: str, threshold: float, out) -> None:
    """Rank 0 at the end of a search: the report, then the log's last line (a warning when edges of the result are
    undecided). A failure is logged, never raised: it must not cost the search its result."""
    try:
        run = load_run(run_dir)
    except Exception as e:
        out.info(f"search report skipped ({type(e).__name__}: {e})")
        return
    path = None
    try:
        path = write_report(run_dir, threshold, run)
    except Exception as e:
        out.info(f"search report skipped ({type(e).__name__}: {e})")
    out.info(final_line(run, threshold, path))
