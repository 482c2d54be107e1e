#!/usr/bin/env python
"""Distributed retraining of a searched cell. Examples:
    python bin/train.py --genotype PCDARTS --dataset cifar10 --data-dir data
    horovodrun -np 2 -H localhost:2 python bin/train.py --genotype runs/search/genotype.json ...
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hvd_pcdarts.cli import run_main  # noqa: E402
from hvd_pcdarts.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main))
