"""How the architecture weights of a search evolved: one picture from RUN_DIR/metrics.jsonl.

Each line of metrics.jsonl is one epoch; its ``"arch"`` object holds the raw (unnormalized) parameters:
``alphas_normal`` / ``alphas_reduce`` (one row per edge, one column per operation of PRIMITIVES) and
``betas_normal`` / ``betas_reduce`` (one value per edge). Edges are ordered node by node: intermediate node i
has 2 + i input edges (c_{k-2}, c_{k-1}, then nodes 0..i-1).

The picture shows, per cell type, softmax(alpha) of every edge over the epochs (one small panel per edge, a line
per operation) next to the edge-normalized betas of each node (softmax over the node's input edges), then the
train/valid accuracy.
"""

from __future__ import annotations

import io
import json
import math
import os

from ..checkpoint import atomic_write_bytes
from ..errors import UsageError
from ..space.genotypes import PRIMITIVES, node_edges, steps_for_edges

CELL_TYPES = (("normal", "alphas_normal", "betas_normal"), ("reduce", "alphas_reduce", "betas_reduce"))
FORMATS = ("png", "svg", "pdf")


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def edge_source(j: int) -> str:
    return "c_{k-2}" if j == 0 else "c_{k-1}" if j == 1 else f"node {j - 2}"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_metrics(run_dir: str) -> list[dict]:
    """The epochs of RUN_DIR/metrics.jsonl, validated; any problem raises UsageError naming the line."""
    if not os.path.isdir(run_dir):
        what = "is not a folder" if os.path.exists(run_dir) else "does not exist"
        raise UsageError(f"run dir {run_dir} {what}")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file (is {run_dir} the output folder of bin/train_search.py?)")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read: {e}") from None
    records, shape = [], None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise UsageError(f"{path} line {n}: expected a JSON object, got {type(rec).__name__}")
        arch = rec.get("arch")
        if not isinstance(arch, dict):
            raise UsageError(f"{path} line {n}: no \"arch\" object (not the metrics of an architecture "
                             f"search, bin/train_search.py)")
        for _, akey, bkey in CELL_TYPES:
            alphas, betas = arch.get(akey), arch.get(bkey)
            if (not isinstance(alphas, list) or not alphas
                    or not all(isinstance(row, list) and len(row) == len(PRIMITIVES) and all(map(_is_number, row))
                               for row in alphas)):
                raise UsageError(f"{path} line {n}: arch.{akey} must be a list of rows of {len(PRIMITIVES)} "
                                 f"finite numbers (one row per edge, one column per operation)")
            if not isinstance(betas, list) or not all(map(_is_number, betas)) or len(betas) != len(alphas):
                raise UsageError(f"{path} line {n}: arch.{bkey} must be {len(alphas)} finite numbers (one per edge)")
            try:
                steps_for_edges(len(alphas))
            except ValueError:
                raise UsageError(f"{path} line {n}: arch.{akey} has {len(alphas)} edges, which no cell has "
                                 f"(a cell with s nodes has s(s+3)/2 edges: 2, 5, 9, 14, ...)") from None
        this_shape = tuple(len(arch[a]) for _, a, _ in CELL_TYPES)
        if shape is not None and this_shape != shape:
            raise UsageError(f"{path} line {n}: the cells changed size ({this_shape} edges vs {shape} before)")
        shape = this_shape
        records.append(rec)
    if not records:
        raise UsageError(f"{path} is empty: no epoch was recorded yet")
    return records


def _epochs(records: list[dict]) -> list[float]:
    out = []
    for i, r in enumerate(records):
        e = r.get("epoch")
        out.append(float(e) if _is_number(e) else float(i))
    return out


def _series(records: list[dict], key: str) -> list[float]:
    return [float(r[key]) if _is_number(r.get(key)) else float("nan") for r in records]


def make_figure(records: list[dict], title: str | None = None):
    """The matplotlib Figure (Agg backend) for validated `records`."""
    plt = _pyplot()

    epochs = _epochs(records)
    marker = "o" if len(records) <= 30 else None
    steps = {ct: steps_for_edges(len(records[0]["arch"][a])) for ct, a, _ in CELL_TYPES}
    cols = max(steps.values()) + 2  # the widest node's edges + the betas panel
    rows = sum(steps.values()) + 1  # one row per node per cell type + the accuracy row
    height = 2.2 * rows + 1.2
    fig = plt.figure(figsize=(2.9 * cols, height))
    gs = fig.add_gridspec(rows, cols, hspace=0.65, wspace=0.35, top=1 - 1.1 / height, bottom=0.5 / height,
                          left=0.05, right=0.98)
    op_handles = _arch_rows(fig, gs, records, steps, epochs, marker, plt.get_cmap("tab10").colors)
    _accuracy_row(fig.add_subplot(gs[rows - 1, :]), records, epochs, marker)
    if op_handles is not None:
        fig.legend(*op_handles, loc="upper center", ncol=len(PRIMITIVES), fontsize=9, frameon=False,
                   bbox_to_anchor=(0.5, 1 - 0.35 / height))
    fig.suptitle(title or "architecture weights over the search", fontsize=13, y=1 - 0.08 / height)
    return fig


def _arch_rows(fig, gs, records: list[dict], steps: dict, epochs, marker, colors):
    """One row per node per cell type: a softmax(alpha) panel per input edge, then the node's betas panel.
    Returns the legend handles of the operations (None when no panel was drawn)."""
    from matplotlib.ticker import MaxNLocator

    cols = gs.ncols
    row = 0
    op_handles = None
    for cell, akey, bkey in CELL_TYPES:
        alphas = [[softmax(edge) for edge in r["arch"][akey]] for r in records]  # epoch x edge x op
        betas = [r["arch"][bkey] for r in records]
        # one y scale for all edges of a cell type, so that panels compare at a glance
        top = min(1.0, 1.1 * max(max(max(edge) for edge in a) for a in alphas))
        for node, edges in enumerate(node_edges(steps[cell])):
            for c, e in enumerate(edges):
                ax = fig.add_subplot(gs[row, c])
                for k, op in enumerate(PRIMITIVES):
                    ax.plot(epochs, [a[e][k] for a in alphas], color=colors[k % len(colors)], marker=marker,
                            markersize=3, linewidth=1.3, label=op)
                ax.set_ylim(0, top)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_title(f"{cell}: {edge_source(c)} \u2192 node {node}", fontsize=9)
                ax.tick_params(labelsize=7)
                if c == 0:
                    ax.set_ylabel("softmax(\u03b1)", fontsize=8)
                if op_handles is None:
                    op_handles = ax.get_legend_handles_labels()
            # betas: softmax over this node's input edges, one line per input
            ax = fig.add_subplot(gs[row, cols - 1])
            norm = [softmax([b[e] for e in edges]) for b in betas]
            for c in range(len(edges)):
                ax.plot(epochs, [n[c] for n in norm], marker=marker, markersize=3, linewidth=1.3,
                        label=edge_source(c))
            ax.set_ylim(0, 1)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{cell}: \u03b2 of node {node}'s inputs", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6, loc="best")
            row += 1
    return op_handles


def _accuracy_row(ax, records: list[dict], epochs, marker) -> None:
    """The last row: train and valid accuracy over the epochs."""
    from matplotlib.ticker import MaxNLocator

    for key, label in (("train_acc", "train accuracy"), ("valid_acc", "valid accuracy")):
        ax.plot(epochs, _series(records, key), marker=marker, markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy")
    ax.set_title("search accuracy", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_search(run_dir: str, out: str | None = None) -> str:
    """Read RUN_DIR/metrics.jsonl and write the picture (default RUN_DIR/arch_weights.png); returns its path."""
    out = out or os.path.join(run_dir, "arch_weights.png")
    ext = os.path.splitext(out)[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise UsageError(f"--out {out}: unsupported picture format {('.' + ext) if ext else '(none)'} "
                         f"(use {', '.join('.' + f for f in FORMATS)})")
    if os.path.isdir(out):
        raise UsageError(f"--out {out} is a folder; give a file path")
    parent = os.path.dirname(os.path.abspath(out))
    records = read_metrics(run_dir)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: folder {parent} does not exist")
    fig = make_figure(records, title=f"architecture weights over the search: {os.path.abspath(run_dir)}")
    save_figure(fig, out)
    return out


def save_figure(fig, path: str) -> None:
    """Write `fig` to `path` (format from its extension) atomically and close it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=os.path.splitext(path)[1].lstrip(".").lower(), dpi=90, bbox_inches="tight")
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def margin_figure(epochs: list[int], cells: dict, threshold: float):
    """The search report's margins: per cell type (`cells`: {title: [(edge label, margin per epoch), ...]}) one
    panel, a line per edge, on a y axis fitted to the margins; the threshold dashed when in reach, else named in
    the title."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(cells), figsize=(6.5 * len(cells), 4.2), squeeze=False)
    marker = "o" if len(epochs) <= 30 else None
    for ax, (title, lines) in zip(axes[0], cells.items()):
        for label, values in lines:
            ax.plot(epochs, values, marker=marker, markersize=3, linewidth=1.3, label=label)
        top = max((max(v) for _, v in lines), default=0.0)
        if threshold <= 2 * top:
            ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        else:
            title += f" (every margin below the threshold {threshold:g})"
        ax.set_ylim(0, 1.1 * max(top, threshold if threshold <= 2 * top else 0) or 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("margin: top-1 \u2212 top-2 of softmax(\u03b1)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def change_figure(epochs: list[int], cells: dict):
    """The search report's architecture weights: softmax(alpha) - 1/8 of every operation over the epochs, one panel
    per edge (`cells`: {title: [(edge label, [[p per operation] per epoch]), ...]}); one column per cell type, a y
    axis fitted to the data of that cell type (the change shows however small)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    rows = max(len(edges) for edges in cells.values())
    fig, axes = plt.subplots(rows, len(cells), figsize=(6 * len(cells), 1.9 * rows + 0.8), squeeze=False,
                             sharex=True, sharey="col")
    colors = plt.get_cmap("tab10").colors
    marker = "o" if len(epochs) <= 30 else None
    base = 1 / len(PRIMITIVES)
    for c, (title, edges) in enumerate(cells.items()):
        for r, (label, probs) in enumerate(edges):
            ax = axes[r][c]
            for k, op in enumerate(PRIMITIVES):
                ax.plot(epochs, [p[k] - base for p in probs], color=colors[k % len(colors)], marker=marker,
                        markersize=2.5, linewidth=1.2, label=op)
            ax.axhline(0, color="gray", linewidth=0.6)
            ax.set_title(f"{title}: {label}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        axes[0][c].set_ylabel(f"softmax(\u03b1) \u2212 1/{len(PRIMITIVES)}", fontsize=8)
        axes[-1][c].set_xlabel("epoch")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=len(PRIMITIVES), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (1.9 * rows + 0.8)))
    return fig
