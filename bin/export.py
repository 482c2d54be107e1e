#!/usr/bin/env python3
"""Export a train.py checkpoint to ONNX or TorchScript, checked against torch (also installed as
`hvd-pcdarts-export`). Examples:
    python bin/export.py runs/train/best.pt --format onnx --out model.onnx
    python bin/export.py runs/train/best.pt --format torchscript --out model.pt
"""
import sys

from hvd_pcdarts.commands import export

if __name__ == "__main__":
    sys.exit(export())
