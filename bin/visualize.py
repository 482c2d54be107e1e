#!/usr/bin/env python3
"""Draw a genotype's normal and reduction cells to DIR/{normal,reduction}.{png,svg} (needs graphviz's `dot`).

  python bin/visualize.py runs/search/genotype.json --out runs/search/cells
  python bin/visualize.py PCDARTS --out pictures
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hvd_pcdarts.errors import UsageError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    p = _Parser(prog="visualize.py", description=__doc__.split("\n\n")[0])
    p.add_argument("genotype", help="a genotype.json written by a search, a genotype JSON file, or a published "
                                    "name (PCDARTS, PC_DARTS_cifar, PC_DARTS_image)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures (created if needed)")
    args = p.parse_args(argv)
    from hvd_pcdarts.visualize import render_genotype

    try:
        paths = render_genotype(args.genotype, args.out, strict=True)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
