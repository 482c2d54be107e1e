#!/usr/bin/env python
"""Evaluate a train.py checkpoint on the test split. Examples:
    python bin/evaluate.py runs/train/best.pt
    horovodrun -np 2 -H localhost:2 python bin/evaluate.py runs/train/best.pt
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hvd_pcdarts.cli import run_main  # noqa: E402
from hvd_pcdarts.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main))
