#!/usr/bin/env python3
"""Derive a search's cells again with another rule (also `hvd-pcdarts-derive`).
    python bin/derive.py runs/search/genotype.json --skip-cap 2 --out runs/search/genotype-skip2.json
"""
import sys

from hvd_pcdarts.commands import derive

if __name__ == "__main__":
    sys.exit(derive())
