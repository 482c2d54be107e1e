#!/usr/bin/env python3
"""Plot how a search's architecture weights evolved (also `hvd-pcdarts-plot-search`).
    python bin/plot_search.py runs/search                 # writes runs/search/arch_weights.png
    python bin/plot_search.py runs/search --out arch.svg
"""
import sys

from hvd_pcdarts.commands import plot_search

if __name__ == "__main__":
    sys.exit(plot_search())
