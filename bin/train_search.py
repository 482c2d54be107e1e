#!/usr/bin/env python3
"""Distributed PC-DARTS search (also installed as `hvd-pcdarts-search`). Examples:
    python bin/train_search.py --dataset digits --epochs 4            # one process
    horovodrun -np 2 -H localhost:2 python bin/train_search.py ...    # 2 ranks (Gloo; add --mpi for MPI)
    mpirun -np 2 python bin/train_search.py ...
"""
import sys

from hvd_pcdarts.commands import search

if __name__ == "__main__":
    sys.exit(search())
