#!/usr/bin/env python3
"""How decided a search's result is: RUN/report.md and RUN/report/*.png (also `hvd-pcdarts-report`; a search
writes it at its end).
    python bin/report.py runs/search
    python bin/report.py runs/search --margin-threshold 0.1
"""
import sys

from hvd_pcdarts.commands import report

if __name__ == "__main__":
    sys.exit(report())
