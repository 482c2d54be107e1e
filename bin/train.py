#!/usr/bin/env python3
"""Distributed retraining of a searched cell (also installed as `hvd-pcdarts-train`). Examples:
    python bin/train.py --genotype PCDARTS --dataset cifar10 --data-dir data
    horovodrun -np 2 -H localhost:2 python bin/train.py --genotype runs/search/genotype.json ...
"""
import sys

from hvd_pcdarts.commands import train

if __name__ == "__main__":
    sys.exit(train())
