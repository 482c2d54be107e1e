"""Export a retrained network (a train.py checkpoint) to ONNX or TorchScript, and check the file.

The exported network is the one `evaluate.py` measures: evaluation mode (batch norm with its running statistics, no
drop path), without the auxiliary head, one input `images` (N, 3, H, W) with a dynamic batch axis and one output
`logits` (N, classes). The file is then run (onnxruntime for ONNX, torch.jit.load for TorchScript) on a batch of
another size than the one exported, beside the torch network; the last stdout line is one JSON object with keys
max_abs_diff, params (auxiliary head excluded), macs (multiply-adds per image), format, out, image_size. Exit 1
when max_abs_diff exceeds --tolerance (1e-4).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings

import torch
import torch.nn as nn

from ..checkpoint import load_checkpoint, temp_sibling
from ..cli import ArgParser, positive_float, positive_int
from ..data import DIGITS_SIZE
from ..errors import UsageError
from ..models import count_parameters
from ..train import CHECKPOINT_FORMAT, network_from_checkpoint
from .evaluate import count_macs

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
DEFAULT_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "digits": DIGITS_SIZE, "synthetic": 32, "imagefolder": 224}


def build_parser():
    p = ArgParser(prog="export.py", description="Export a train.py checkpoint to ONNX or TorchScript and check "
                                                "the exported file against the torch network.")
    p.add_argument("checkpoint", help="checkpoint.pt or best.pt written by train.py")
    p.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    p.add_argument("--out", default=None, help="file to write (default: model.onnx / model.pt beside the checkpoint)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="input height and width (default: the run's --image-size in args.json beside the "
                        "checkpoint, else the dataset's size)")
    p.add_argument("--opset", type=positive_int, default=18, help="ONNX opset version")
    p.add_argument("--tolerance", type=positive_float, default=1e-4,
                   help="largest accepted difference between the exported file's logits and torch's")
    return p


class Logits(nn.Module):
    """The retrained network in evaluation mode as a function images -> logits (no auxiliary output)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.eval()

    def forward(self, images):
        return self.network(images)[0]


def load_network(path: str) -> tuple[nn.Module, dict]:
    """The network of a train.py checkpoint without its auxiliary head, and the checkpoint's config."""
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"checkpoint {path} was not written by train.py (format {ckpt.get('format')!r})")
    cfg = dict(ckpt["config"], auxiliary=False)
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("auxiliary_head.")}
    return Logits(network_from_checkpoint(dict(config=cfg, model=state)).float()).eval(), ckpt["config"]


def image_size_of(path: str, config: dict) -> int:
    """The run's --image-size from args.json beside the checkpoint, else the dataset's usual size."""
    args_file = os.path.join(os.path.dirname(os.path.abspath(path)), "args.json")
    try:
        with open(args_file, encoding="utf-8") as f:
            size = json.load(f).get("image_size")
    except (OSError, ValueError, AttributeError):
        size = None
    return int(size) if size else DEFAULT_IMAGE_SIZE.get(config.get("dataset"), 32)


def export_onnx(model: nn.Module, example: torch.Tensor, out: str, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(model, (example,), out, input_names=["images"], output_names=["logits"], opset_version=opset,
                      dynamic_shapes={"images": {0: batch}}, dynamo=True, external_data=False, verbose=False)


def run_onnx(path: str, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


@contextlib.contextmanager
def _jit_quietly():
    """torch marks torch.jit deprecated, and a trace warns that the branches on the image's height and width
    become constants (the file is for one image size, any batch): both expected here, so not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        yield


def export_torchscript(model: nn.Module, example: torch.Tensor, out: str) -> None:
    with _jit_quietly():
        torch.jit.save(torch.jit.trace(model, example, check_trace=False), out)


def run_torchscript(path: str, x: torch.Tensor) -> torch.Tensor:
    with _jit_quietly():
        return torch.jit.load(path, map_location="cpu")(x)


def export(model: nn.Module, fmt: str, out: str, image_size: int, opset: int = 18) -> float:
    """Write `model` to `out` (written beside it, then moved into place) and return the largest absolute
    difference between the file's logits and the model's on a batch of another size than the exported one."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, image_size, image_size)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {out}: folder {folder} does not exist")
    fd, tmp = temp_sibling(out, suffix=FORMATS[fmt])
    os.close(fd)
    try:
        with torch.no_grad():
            if fmt == "onnx":
                export_onnx(model, example, tmp, opset)
            else:
                export_torchscript(model, example, tmp)
            x = torch.randn(3, 3, image_size, image_size)
            got = run_onnx(tmp, x) if fmt == "onnx" else run_torchscript(tmp, x)
            diff = float((got - model(x)).abs().max())
        os.replace(tmp, out)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return diff


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.format == "onnx":
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise UsageError(f"--format onnx needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                             f"pip install 'hvd-pcdarts[export]'") from None
    model, config = load_network(args.checkpoint)
    size = args.image_size or image_size_of(args.checkpoint, config)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "model" + FORMATS[args.format])
    diff = export(model, args.format, out, size, args.opset)
    result = dict(max_abs_diff=diff, params=count_parameters(model), macs=count_macs(model, size, "cpu"),
                  format=args.format, out=os.path.abspath(out), image_size=size)
    print(f"wrote {out} ({args.format}, {config['network']} network, {size}x{size} images, dynamic batch): "
          f"largest difference to torch {diff:.2e}")
    print(json.dumps(result), flush=True)
    if diff > args.tolerance:
        print(f"export.py: error: the exported file's logits differ from torch's by {diff:.2e} > "
              f"--tolerance {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0
