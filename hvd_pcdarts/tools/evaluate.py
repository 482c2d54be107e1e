"""Evaluate a trained checkpoint on the test split (also under horovodrun: sharded, exact).

Prints a summary and, as the last stdout line, one JSON object with keys top1, top5, loss, params (auxiliary head
excluded, as papers report) and macs (multiply-adds per image, counted by torch.utils.flop_counter); the same
object is written to `--output` (default: eval.json next to the checkpoint).
"""

from __future__ import annotations

import json
import os

import torch

from ..checkpoint import atomic_write_text, load_checkpoint
from ..cli import ArgParser, positive_int
from ..data import DATASETS, EvalShardSampler, SeededView, load_dataset, make_loader, make_transform
from ..dist import horovod as dist
from ..errors import UsageError
from ..models import count_parameters
from ..train import evaluate, network_from_checkpoint


def build_parser():
    p = ArgParser(prog="evaluate.py", description="Evaluate a train.py checkpoint on the test split.")
    p.add_argument("checkpoint", help="checkpoint.pt or best.pt written by train.py")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="default: the checkpoint's dataset")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--image-size", type=positive_int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=256, help="global evaluation batch")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--output", default=None, help="JSON result file (default: eval.json beside the checkpoint)")
    return p


def count_macs(model, image_size: int, device) -> int:
    """Multiply-adds of one image's forward pass (torch FLOP counter; 1 MAC = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops() // 2)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    dist.init()
    ckpt, err = None, None
    if dist.is_root():
        try:
            ckpt = load_checkpoint(args.checkpoint)
            if ckpt.get("format") != "hvd-pcdarts-train-v1":
                raise UsageError(f"checkpoint {args.checkpoint} was not written by train.py "
                                 f"(format {ckpt.get('format')!r})")
        except UsageError as e:
            err = str(e)
    err = dist.broadcast_object(err, name="eval_err")
    if err:
        raise UsageError(err)
    ckpt = dist.broadcast_object(ckpt, name="eval_ckpt")
    cfg = ckpt["config"]
    dataset = args.dataset or cfg["dataset"]
    if args.batch_size % dist.size():
        raise UsageError(f"--batch-size {args.batch_size} does not divide by the {dist.size()} ranks")
    device = dist.setup_device(None)
    bundle = load_dataset(dataset, args.data_dir, image_size=args.image_size, need_test=True,
                          is_local_root=dist.local_rank() == 0, barrier=dist.barrier,
                          agree=lambda ok: all(dist.allgather_object(bool(ok))))
    if bundle.num_classes != cfg["num_classes"]:
        raise UsageError(f"dataset {dataset} has {bundle.num_classes} classes but the checkpoint's network has "
                         f"{cfg['num_classes']}")
    model = network_from_checkpoint(ckpt).to(device)
    test = SeededView(bundle.test, range(len(bundle.test)), make_transform(bundle, False, False, dataset), 0, 3)
    loader = make_loader(test, args.batch_size // dist.size(), EvalShardSampler(len(test), dist.size(), dist.rank()),
                         args.workers, drop_last=False, pin=device.type == "cuda")
    loss, top1, top5, n = evaluate(model, loader, device)
    result = dict(top1=top1, top5=top5, loss=loss, params=count_parameters(model),
                  macs=count_macs(model, bundle.image_size, device), images=n, dataset=dataset,
                  checkpoint=os.path.abspath(args.checkpoint), world_size=dist.size())
    if dist.is_root():
        out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval.json")
        try:
            atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        except OSError as e:
            raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
        print(f"test images {n}: top-1 {top1:.2f}%  top-5 {top5:.2f}%  loss {loss:.4f}  "
              f"params {result['params'] / 1e6:.3f}M  MACs {result['macs'] / 1e6:.1f}M  -> {out}")
        print(json.dumps(result), flush=True)
    return 0
