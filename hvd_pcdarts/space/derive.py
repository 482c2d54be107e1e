"""`bin/derive.py`: the cells derived again, with another rule, from the architecture parameters a search saved in
its genotype.json (`alphas_normal`, `alphas_reduce`, `betas_normal`, `betas_reduce`)."""

from __future__ import annotations

import json
import os

import torch

from ..errors import UsageError
from ..models.search_network import ARCH_PARAM_NAMES, derive_genotype
from .genotypes import Genotype, derivation_rule, save_genotype, steps_for_edges


def read_arch(path: str) -> dict:
    """The saved alphas and betas of a search's genotype.json, as float64 tensors."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a readable JSON file ({e})") from None
    missing = [k for k in ARCH_PARAM_NAMES if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise UsageError(f"{path}: no {', '.join(missing)}: derive.py needs the genotype.json a search wrote")
    try:
        arch = {k: torch.tensor(obj[k], dtype=torch.float64) for k in ARCH_PARAM_NAMES}
    except (TypeError, ValueError) as e:
        raise UsageError(f"{path}: the architecture parameters are not numeric arrays ({e})") from None
    for cell in ("normal", "reduce"):
        a, b = arch[f"alphas_{cell}"], arch[f"betas_{cell}"]
        if a.dim() != 2 or b.dim() != 1 or a.shape[0] != b.shape[0] or not torch.isfinite(a).all():
            raise UsageError(f"{path}: alphas_{cell} {tuple(a.shape)} and betas_{cell} {tuple(b.shape)} do not "
                             f"describe one cell's edges")
    return arch


def derive_file(path: str, out: str, skip_cap: int | None = None) -> Genotype:
    """Derive both cells from `path`'s saved parameters (`skip_cap` on the normal cell), write `out` with the same
    parameters and the rule, return the genotype."""
    arch = read_arch(path)
    n_edges = arch["betas_normal"].shape[0]
    try:
        steps = steps_for_edges(n_edges)
    except ValueError:
        raise UsageError(f"{n_edges} edges is no cell's edge count (2 + 3 + ... per node)") from None
    geno = derive_genotype(arch, steps, skip_cap)
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out {out}: folder {out_dir} does not exist")
    extra = {k: arch[k].tolist() for k in ARCH_PARAM_NAMES} | derivation_rule(skip_cap)
    save_genotype(geno, out, extra=extra)
    return geno
