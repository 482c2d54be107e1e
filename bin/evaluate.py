#!/usr/bin/env python3
"""Evaluate a train.py checkpoint on the test split (also installed as `hvd-pcdarts-evaluate`). Examples:
    python bin/evaluate.py runs/train/best.pt
    horovodrun -np 2 -H localhost:2 python bin/evaluate.py runs/train/best.pt
"""
import sys

from hvd_pcdarts.commands import evaluate

if __name__ == "__main__":
    sys.exit(evaluate())
