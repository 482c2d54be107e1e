#!/usr/bin/env python3
"""Cluster doctor: run it with the real job's launcher before a long search or retraining.

  mpirun -np 4 -H node0:2,node1:2 -bind-to none -map-by slot -x PATH -x LD_LIBRARY_PATH \\
      python bin/doctor.py --dataset cifar10 --data-dir data --output-dir runs
  horovodrun --gloo -np 2 -H localhost:2 python bin/doctor.py --dataset digits

Rank 0 prints a table (one row per rank) and one line per inconsistency. Exit status, the same on every rank:
0 = consistent, 1 = a problem was found, 2 = bad command line.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hvd_pcdarts.doctor import DATASETS, FAKE_MISSING_ENV, launcher_rank  # noqa: E402
from hvd_pcdarts.errors import UsageError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, printed by rank 0 only, exit 2
        if launcher_rank() == 0:
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    p = _Parser(prog="doctor.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=DATASETS, help="dataset the job will use")
    p.add_argument("--data-dir", default="data", help="dataset folder, as the job will see it on every node")
    p.add_argument("--output-dir", default="runs",
                   help="the job's output folder: its free space is reported (nothing is created)")
    p.add_argument("--json", metavar="PATH", help="also write the gathered table as JSON (rank 0)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds the allreduce check may take (default 60); the whole check gives up "
                        "after 3x this + 30 s")
    p.add_argument("--min-free-gb", type=float, default=1.0,
                   help="report a problem when less space is free for --output-dir (default 1 GB)")
    p.add_argument("--simulate-missing-data-on-rank", type=int, metavar="R",
                   help=f"testing aid: rank R reports the dataset as missing, to exercise the failure path "
                        f"(same as env {FAKE_MISSING_ENV}=R)")
    args = p.parse_args(argv)
    from hvd_pcdarts import doctor

    try:
        return doctor.run(args)
    except UsageError as e:
        if launcher_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
