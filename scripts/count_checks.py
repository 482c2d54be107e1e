"""Counts the suite's checks per test file: `assert` statements and `pytest.raises` / `pytest.warns` blocks,
read from the source (no test runs). Used to show that a change to the suite keeps every check:
    python scripts/count_checks.py [tests]"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def checks(path: Path) -> int:
    tree = ast.parse(path.read_text(), str(path))
    n = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            n += 1
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("raises", "warns") and getattr(node.func.value, "id", "") == "pytest":
            n += 1
    return n


def main(root: str = "tests") -> None:
    total = 0
    for path in sorted(Path(root).rglob("*.py")):
        n = checks(path)
        total += n
        if n:
            print(f"{n:5d}  {path}")
    print(f"{total:5d}  total")


if __name__ == "__main__":
    main(*sys.argv[1:])
