"""Cell genotypes: the DARTS-compatible `Genotype` type, the search space, published cells, JSON I/O.

`load_genotype(spec)` takes a published name (``PCDARTS``, ``PC_DARTS_cifar``, ``PC_DARTS_image``) or a path to
a JSON file - either a bare genotype object or the ``genotype.json`` a search writes (``{"genotype": {...}}``).
Text is parsed as JSON only; it is never evaluated as code.
"""

from __future__ import annotations

import json
import os
from collections import namedtuple

from ..errors import GenotypeError

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

PRIMITIVES = [
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
]

# Published cells (Xu et al., ICLR 2020), exactly as released with the paper's code.
PC_DARTS_cifar = Genotype(
    normal=[("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
            ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
    normal_concat=range(2, 6),
    reduce=[("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
            ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)],
    reduce_concat=range(2, 6),
)
PC_DARTS_image = Genotype(
    normal=[("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 0), ("skip_connect", 1),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("dil_conv_5x5", 4)],
    normal_concat=range(2, 6),
    reduce=[("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 1),
            ("sep_conv_3x3", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_3x3", 3)],
    reduce_concat=range(2, 6),
)
PCDARTS = PC_DARTS_cifar

PUBLISHED = {"PCDARTS": PCDARTS, "PC_DARTS_cifar": PC_DARTS_cifar, "PC_DARTS_image": PC_DARTS_image}


def to_dict(genotype: Genotype) -> dict:
    """A JSON-ready dict: ``{"normal": [[op, input], ...], "normal_concat": [...], "reduce": ..., ...}``."""
    return {
        "normal": [[op, int(i)] for op, i in genotype.normal],
        "normal_concat": [int(i) for i in genotype.normal_concat],
        "reduce": [[op, int(i)] for op, i in genotype.reduce],
        "reduce_concat": [int(i) for i in genotype.reduce_concat],
    }


def _check_cell(obj, kind: str, where: str):
    if not isinstance(obj, list):
        raise GenotypeError(f"{where}: '{kind}' must be a list of [op, input] pairs, got {type(obj).__name__}")
    if len(obj) == 0 or len(obj) % 2:
        raise GenotypeError(f"{where}: '{kind}' must have two edges per node (an even, non-zero count), "
                            f"got {len(obj)} edges")
    edges = []
    for e, edge in enumerate(obj):
        if (not isinstance(edge, (list, tuple)) or len(edge) != 2 or not isinstance(edge[0], str)
                or isinstance(edge[1], bool) or not isinstance(edge[1], int)):
            raise GenotypeError(f"{where}: {kind}[{e}] must be [op_name, input_index], got {edge!r}")
        op, idx = edge
        if op not in PRIMITIVES or op == "none":
            valid = ", ".join(p for p in PRIMITIVES if p != "none")
            raise GenotypeError(f"{where}: {kind}[{e}] names unknown operation {op!r} (valid: {valid})")
        node = e // 2  # intermediate node `node` may read the two cell inputs and nodes before it
        if idx < 0 or idx >= node + 2:
            raise GenotypeError(f"{where}: {kind}[{e}] input index {idx} is out of range for node {node} "
                                f"(must be 0..{node + 1})")
        edges.append((op, idx))
    return edges


def _check_concat(obj, kind: str, steps: int, where: str):
    if not isinstance(obj, list) or not obj or not all(isinstance(i, int) and not isinstance(i, bool) for i in obj):
        raise GenotypeError(f"{where}: '{kind}' must be a non-empty list of node indices, got {obj!r}")
    for i in obj:
        if i < 0 or i >= steps + 2:
            raise GenotypeError(f"{where}: '{kind}' index {i} is out of range (must be 0..{steps + 1})")
    if len(set(obj)) != len(obj):
        raise GenotypeError(f"{where}: '{kind}' repeats a node: {obj!r}")
    return list(obj)


def from_dict(obj, where: str = "genotype") -> Genotype:
    """Validate and build a Genotype from parsed JSON; errors name the field and edge at fault."""
    if isinstance(obj, dict) and "genotype" in obj and isinstance(obj["genotype"], dict):
        obj = obj["genotype"]
    if not isinstance(obj, dict):
        raise GenotypeError(f"{where}: expected a JSON object with normal/normal_concat/reduce/reduce_concat, "
                            f"got {type(obj).__name__}")
    missing = [k for k in Genotype._fields if k not in obj]
    if missing:
        raise GenotypeError(f"{where}: missing key(s) {', '.join(missing)}")
    normal = _check_cell(obj["normal"], "normal", where)
    reduce = _check_cell(obj["reduce"], "reduce", where)
    normal_concat = _check_concat(obj["normal_concat"], "normal_concat", len(normal) // 2, where)
    reduce_concat = _check_concat(obj["reduce_concat"], "reduce_concat", len(reduce) // 2, where)
    return Genotype(normal=normal, normal_concat=normal_concat, reduce=reduce, reduce_concat=reduce_concat)


def steps_for_edges(n_edges: int) -> int:
    """Intermediate nodes of a cell with n_edges edges (node i has 2 + i inputs); raises ValueError if none fits."""
    steps, total = 0, 0
    while total < n_edges:
        total += 2 + steps
        steps += 1
    if total != n_edges or steps == 0:
        raise ValueError(n_edges)
    return steps


def node_edges(steps: int) -> list[range]:
    """The edge indices of each intermediate node."""
    out, start = [], 0
    for i in range(steps):
        out.append(range(start, start + 2 + i))
        start += 2 + i
    return out


def derivation_rule(skip_cap: int | None) -> dict:
    """The derivation's rule for genotype.json: {"derivation": {"skip_cap": N}}, or {} for the plain PC-DARTS one."""
    return {} if skip_cap is None else {"derivation": {"skip_cap": int(skip_cap)}}


def save_genotype(genotype: Genotype, path: str, extra: dict | None = None) -> None:
    """Write ``{"genotype": ..., **extra}`` as JSON, atomically."""
    from ..checkpoint import atomic_write_text

    payload = {"genotype": to_dict(genotype)}
    if extra:
        payload.update(extra)
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def load_genotype(spec) -> Genotype:
    """A published name, a path to a JSON genotype (or a search's genotype.json), or a Genotype."""
    if isinstance(spec, Genotype):
        return from_dict(to_dict(spec), where="genotype")
    if not isinstance(spec, str) or not spec:
        raise GenotypeError(f"genotype spec must be a published name or a JSON file path, got {spec!r}")
    if spec in PUBLISHED:
        return PUBLISHED[spec]
    if os.path.isdir(spec):
        raise GenotypeError(f"genotype {spec}: is a directory; pass the genotype.json file inside it")
    if not os.path.exists(spec):
        names = ", ".join(PUBLISHED)
        raise GenotypeError(f"genotype {spec!r}: no such file and not a published name ({names})")
    try:
        with open(spec, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise GenotypeError(f"genotype {spec}: cannot read: {e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise GenotypeError(f"genotype {spec}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return from_dict(obj, where=f"genotype {spec}")
