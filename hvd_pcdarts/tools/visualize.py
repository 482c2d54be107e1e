"""DARTS-style pictures of a genotype's normal and reduction cells, drawn with graphviz.

Nodes: the cell inputs ``c_{k-2}`` and ``c_{k-1}``, the intermediate nodes ``0..steps-1``, the output ``c_{k}``;
each chosen edge is labeled with its operation, and the concatenated nodes feed the output. Needs the `graphviz`
Python package and its `dot` program (``apt-get install graphviz``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from ..errors import UsageError
from ..space.genotypes import Genotype, load_genotype

CELLS = (("normal", "normal", "normal_concat"), ("reduction", "reduce", "reduce_concat"))
FORMATS = ("png", "svg")
_DOT_HINT = "graphviz's `dot` program is not installed: apt-get install graphviz (or conda install graphviz)"
_PKG_HINT = "the graphviz Python package is not installed: pip install graphviz (or pip install -e .[viz])"


def _graphviz_problem() -> str | None:
    try:
        import graphviz  # noqa: F401
    except ImportError:
        return _PKG_HINT
    if shutil.which("dot") is None:
        return _DOT_HINT
    return None


def have_graphviz() -> bool:
    """True when both the graphviz Python package and the `dot` program are available."""
    return _graphviz_problem() is None


def _node_name(j: int) -> str:
    return "c_{k-2}" if j == 0 else "c_{k-1}" if j == 1 else str(j - 2)


def cell_graph(edges, concat, title: str | None = None):
    """A graphviz.Digraph of one cell: `edges` = [(op, input), ...] two per node, `concat` = node indices."""
    import graphviz

    g = graphviz.Digraph(
        engine="dot",
        edge_attr={"fontsize": "20", "fontname": "times"},
        node_attr={"style": "filled", "shape": "rect", "align": "center", "fontsize": "20", "height": "0.5",
                   "width": "0.5", "penwidth": "2", "fontname": "times"},
        graph_attr={"rankdir": "LR"},
    )
    if title:
        g.attr(label=title, labelloc="t", fontsize="22", fontname="times")
    g.node("c_{k-2}", fillcolor="darkseagreen2")
    g.node("c_{k-1}", fillcolor="darkseagreen2")
    steps = len(edges) // 2
    for i in range(steps):
        g.node(str(i), fillcolor="lightblue")
    for e, (op, j) in enumerate(edges):
        g.edge(_node_name(int(j)), str(e // 2), label=op, fillcolor="gray")
    g.node("c_{k}", fillcolor="palegoldenrod")
    for j in concat:
        g.edge(_node_name(int(j)), "c_{k}", fillcolor="gray")
    return g


def _render(genotype: Genotype, out_dir: str) -> list[str]:
    problem = _graphviz_problem()
    if problem:
        raise UsageError(problem)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out {out_dir} is a file, not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {out_dir}: {e.strerror or e}") from None
    # Everything is rendered into a private temporary folder first; only complete files are moved in place.
    tmp = tempfile.mkdtemp(prefix=".cells.", dir=out_dir)
    try:
        staged = []
        for name, cell, concat in CELLS:
            g = cell_graph(getattr(genotype, cell), getattr(genotype, concat))
            for fmt in FORMATS:
                data = g.pipe(format=fmt)
                path = os.path.join(tmp, f"{name}.{fmt}")
                with open(path, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                staged.append(path)
        written = []
        for path in staged:
            dest = os.path.join(out_dir, os.path.basename(path))
            os.replace(path, dest)
            written.append(dest)
        return written
    except subprocess.CalledProcessError as e:
        err = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        raise UsageError(f"graphviz failed to render the cells: {err[0] if err else e}") from None
    except OSError as e:
        raise UsageError(f"cannot write the pictures into {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def render_genotype(genotype, out_dir: str, strict: bool = False) -> list[str]:
    """Draw the cells to out_dir/{normal,reduction}.{png,svg}; returns the written paths.

    `genotype`: a Genotype, a published name or a JSON path. With strict=False (what a search calls at its end)
    a missing graphviz or a failed rendering prints one warning and returns [] instead of raising; a bad
    genotype always raises GenotypeError.
    """
    g = load_genotype(genotype)
    if strict:
        return _render(g, out_dir)
    try:
        return _render(g, out_dir)
    except UsageError as e:
        print(f"warning: cell pictures skipped: {e}", file=sys.stderr)
        return []
