#!/usr/bin/env python
"""Combine the batched-op options that won their A/B in one device run (run_device.sh's COMBO stage).

    python benchmarks/pick_options.py RESULTS.jsonl --base graph+cl+be+bf16 --batch 256   # prints e.g. +tdh+ud3

Reads the search_step rows of RESULTS.jsonl (search_step.py --json) at --batch: the base variant and every
variant that is the base plus one option of search_step.BE_OPTIONS (the same words in any order). Options that
set the same choice (+ud3 / +uda, +tdw / +tdh, +fz5 / +fza, ...) compete: the fastest of each choice is kept if it
beats the base by more than --margin-ms and --margin (a share of the base's time); the kept options are printed as
one suffix, fastest first (nothing when none won; exit 0 either way; 2 when the file cannot be read or has no base
row). Why each option was kept or not: stderr.
A measured variant that repeats in the file (a rerun) counts with its last row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from search_step import BE_OPTIONS  # noqa: E402


def words(variant: str) -> tuple[str, frozenset]:
    mode, *extra = variant.split("+")
    return mode, frozenset(extra)


def pick(rows, base: str, batch: int, margin_ms: float = 0.5, margin: float = 0.01):
    """-> (kept options fastest first, {option: (ms, verdict)}) from search_step rows."""
    bmode, bwords = words(base)
    ms = {}
    for r in rows:
        if r.get("kind") != "search_step" or r.get("batch") != batch or "error" in r or r.get("ms_median") is None:
            continue
        mode, w = words(r["variant"])
        if mode != bmode or not w >= bwords or len(w - bwords) > 1:
            continue
        extra = next(iter(w - bwords), None)
        if extra is None or extra in BE_OPTIONS:
            ms[extra] = r["ms_median"]
    if None not in ms:
        raise ValueError(f"no {base} row at batch {batch} to compare with")
    base_ms, best, why = ms[None], {}, {}
    for opt, t in ms.items():
        if opt is None:
            continue
        choice = BE_OPTIONS[opt][0]
        won = base_ms - t > max(margin_ms, margin * base_ms)
        why[opt] = (t, "wins" if won else "no gain")
        if won and (choice not in best or t < ms[best[choice]]):
            best[choice] = opt
    kept = sorted(best.values(), key=ms.get)
    for opt in why:
        if why[opt][1] == "wins" and opt not in kept:
            why[opt] = (why[opt][0], f"wins, but +{best[BE_OPTIONS[opt][0]]} is faster")
    return kept, {None: (base_ms, "base"), **why}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="search_step.py --json file")
    p.add_argument("--base", required=True, help="the variant the options were added to, e.g. graph+cl+be+bf16")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--margin-ms", type=float, default=0.5, help="an option must save more than this (ms/step)")
    p.add_argument("--margin", type=float, default=0.01, help="... and more than this share of the base's time")
    a = p.parse_args(argv)
    try:
        with open(a.results) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        kept, why = pick(rows, a.base, a.batch, a.margin_ms, a.margin)
    except (OSError, ValueError) as e:  # json's errors are ValueErrors
        print(f"pick_options: {a.results}: {e}", file=sys.stderr)
        return 2
    for opt, (t, verdict) in why.items():
        print(f"pick_options: {a.base}{'+' + opt if opt else ''} {t:.1f} ms: {verdict}", file=sys.stderr)
    print("".join("+" + o for o in kept))
    return 0


if __name__ == "__main__":
    sys.exit(main())
