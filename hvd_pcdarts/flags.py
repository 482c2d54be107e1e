"""The flags that the search (train_search.py) and the retraining (train.py) share, each declared once, in the
argparse groups of `--help`: recipe, data, distributed, precision and fast paths, outputs, quick runs, elastic.
Each script adds its own group (the search's architecture flags, the retraining network's) and its defaults with
`parser.set_defaults`. Testing aids are accepted but left out of `--help`."""

from __future__ import annotations

import argparse

from .cli import add_output_args, add_quick_run_args, nonneg_float, nonneg_int, positive_float, positive_int
from .data import DATASETS
from .dist.elastic import add_elastic_args, check_elastic_args
from .dist.gradients import GRAD_ALLREDUCE_MODES
from .dist.preemption import add_preemption_args
from .errors import UsageError

GRAD_ALLREDUCE_HELP = ("how the weight gradients are averaged over the ranks, both by hvd.DistributedOptimizer: "
                       "overlap = one allreduce per tensor, started by its backward hook; flat = one allreduce of "
                       "all of them after backward; auto = flat on the CPU, overlap on GPUs (benchmarks/RESULTS.md, "
                       "'CPU scaling')")


def add_recipe_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("recipe (learning rates are for the global batch)")
    a = g.add_argument
    a("--batch-size", type=positive_int, help="GLOBAL batch, split evenly over the ranks")
    a("--lr", type=positive_float)
    a("--lr-min", type=nonneg_float, default=0.0)
    a("--lr-schedule", choices=["cosine", "linear", "step"], default="cosine")
    a("--lr-per-step", action="store_true", help="update the learning rate every step (default: every epoch)")
    a("--momentum", type=nonneg_float, default=0.9)
    a("--weight-decay", type=nonneg_float, default=3e-4)
    a("--epochs", type=positive_int)
    a("--warmup-epochs", type=nonneg_float, default=0.0)
    a("--init-channels", type=positive_int)
    a("--layers", type=positive_int)
    a("--grad-clip", type=nonneg_float, default=5.0, help="0 disables clipping")
    a("--seed", type=nonneg_int)
    return g


def add_data_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("data")
    a = g.add_argument
    a("--dataset", choices=DATASETS, default="cifar10")
    a("--data-dir", default="./data")
    a("--download", action="store_true", help="download CIFAR if missing (one process per node)")
    a("--image-size", type=positive_int, default=None, help="imagefolder/synthetic image size")
    a("--synthetic-size", type=positive_int, default=2048, help="synthetic: number of training images")
    a("--workers", type=nonneg_int, default=2, help="data loader processes per rank")
    a("--no-augment", action="store_true")
    return g


def add_distributed_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("distributed")
    a = g.add_argument
    a("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a("--sync-bn", action="store_true", help="batch norm statistics of the global batch")
    a("--grad-allreduce", choices=GRAD_ALLREDUCE_MODES, default="auto", help=GRAD_ALLREDUCE_HELP)
    a("--fp16-allreduce", action="store_true", help="compress weight gradients to fp16 for the allreduce")
    add_elastic_args(g)
    return g


def add_fast_path_args(p: argparse.ArgumentParser, what: str):
    """Precision and fast paths; `what`: "search" or "retraining", for the words of the help."""
    g = p.add_argument_group("precision and fast paths (benchmarks/RESULTS.md)")
    a = g.add_argument
    a("--amp", action="store_true", help="float16 mixed precision with loss scaling (CUDA only)")
    a("--bf16", action="store_true", help="bfloat16 autocast of the forward passes (weights, gradients and "
      "optimizers stay float32; no loss scaling); works with --cuda-graph, also on the CPU")
    a("--cuda-graph", action="store_true", help=f"CUDA only: replay the forward+backward of the {what} step(s) as "
      "CUDA graphs; gradient averaging, clipping and optimizer steps stay outside")
    a("--channels-last", action="store_true", help="NHWC memory format for weights and images")
    a("--compile", action="store_true", help="torch.compile " + (
        "each search cell (with --batched-edges)" if what == "search" else "each operation of the cells")
      + "; compiles during the first steps; composes with --cuda-graph and --channels-last")
    a("--gpu-data", action="store_true", help="keep the training images on the device as uint8 and augment a batch "
      "there (the same crops, flips and cutouts as the loader; tensor datasets only)")
    return g


def add_testing_args(p: argparse.ArgumentParser) -> None:
    """Testing aids of both scripts: accepted, not shown in --help."""
    p.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # aot_eager compiles quickly
    add_preemption_args(p)  # --raise-signal NAME@STEP[:RANK]


def add_run_args(p: argparse.ArgumentParser, what: str, kind: str) -> dict:
    """Every shared group, in the order of --help; returns them by name (recipe, data, distributed, fast) for the
    script's own flags. `what`: "search" or "retraining"; `kind`: "search" or "train" (the default output folder)."""
    groups = dict(recipe=add_recipe_args(p), data=add_data_args(p), distributed=add_distributed_args(p),
                  fast=add_fast_path_args(p, what))
    add_output_args(p, kind)
    add_quick_run_args(p)
    add_testing_args(p)
    return groups


def check_run_args(args) -> None:
    """The checks of the shared flags that argparse cannot make (one line, exit 2)."""
    if args.lr_min > args.lr:
        raise UsageError(f"--lr-min {args.lr_min} is larger than --lr {args.lr}")
    if args.warmup_epochs >= args.epochs:
        raise UsageError(f"--warmup-epochs {args.warmup_epochs:g} must be less than --epochs {args.epochs}")
    check_elastic_args(args)
