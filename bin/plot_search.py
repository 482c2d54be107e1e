#!/usr/bin/env python3
"""Plot how a search's architecture weights evolved (softmax(alpha) per edge, edge-normalized betas, accuracy).

  python bin/plot_search.py runs/search                 # writes runs/search/arch_weights.png
  python bin/plot_search.py runs/search --out arch.svg
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
    p = _Parser(prog="plot_search.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of bin/train_search.py (has metrics.jsonl)")
    p.add_argument("--out", metavar="PATH", help="picture to write: .png, .svg or .pdf "
                                                 "(default RUN_DIR/arch_weights.png)")
    args = p.parse_args(argv)
    from hvd_pcdarts.plots import plot_search

    try:
        path = plot_search(args.run_dir, args.out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
