#!/usr/bin/env python3
"""Draw a genotype's cells to DIR/{normal,reduction}.{png,svg} (also `hvd-pcdarts-visualize`).
    python bin/visualize.py runs/search/genotype.json --out runs/search/cells
    python bin/visualize.py PCDARTS --out pictures
"""
import sys

from hvd_pcdarts.commands import visualize

if __name__ == "__main__":
    sys.exit(visualize())
