#!/usr/bin/env python
"""Distributed PC-DARTS search. Examples:
    python bin/train_search.py --dataset digits --epochs 4            # one process
    horovodrun -np 2 -H localhost:2 python bin/train_search.py ...    # 2 ranks (Gloo; add --mpi for MPI)
    mpirun -np 2 python bin/train_search.py ...
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hvd_pcdarts.cli import run_main  # noqa: E402
from hvd_pcdarts.search import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main))
