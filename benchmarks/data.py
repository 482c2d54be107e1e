#!/usr/bin/env python
"""Loader throughput of one rank: the eager pipeline (data.SeededView + torchvision transforms + DataLoader
workers) versus the device-resident one (fastpath.DeviceLoader: uint8 images on the device, batched augmentation
there). CIFAR-10-shaped synthetic data (32 px, uint8) with the CIFAR search recipe's augmentation (pad-4 crop,
flip; `--cutout 16` adds the retraining recipe's cutout). Needs no Horovod.

    python benchmarks/data.py --device cpu --batch 128 --workers 0 2 --batches 20
    python benchmarks/data.py --device cuda --batch 256 32 --workers 0 4 --batches 50

A loader is not the bottleneck of a step if its ms/batch is well under the step's ms (benchmarks/search_step.py):
the eager loader's workers run in parallel with the step; the device loader runs in the training process
between steps (its cost adds to the step), so it is reported per batch of each half.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hvd_pcdarts import fastpath as fp  # noqa: E402
from hvd_pcdarts.data import SeededView, ShardSampler, _synthetic, make_loader, make_transform  # noqa: E402


def time_loader(it, batches, device):
    t0 = time.perf_counter()
    first = None
    n = 0
    for k, (x, y, _) in enumerate(it):
        if device.type == "cuda":
            x = x.to(device, non_blocking=True)
            torch.cuda.synchronize()
        if k == 0:
            first = time.perf_counter() - t0
            t1 = time.perf_counter()
        else:
            n += len(y)
        if k >= batches:
            break
    dt = time.perf_counter() - t1
    return first, n / max(dt, 1e-9), 1e3 * dt / max(batches, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[256])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="eager DataLoader workers to try")
    p.add_argument("--batches", type=int, default=20, help="timed batches (after a first, untimed one)")
    p.add_argument("--images", type=int, default=25000, help="images in the (weight) half")
    p.add_argument("--cutout", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = _synthetic(32, 10, args.images, 1, 0)
    tf = make_transform(bundle, True, True, "cifar10", cutout=args.cutout)
    spec = fp.augment_spec(bundle, True, True, "cifar10", cutout=args.cutout)
    rows = []
    for b in args.batch:
        view = SeededView(bundle.train, range(args.images), tf, 2, stream=0)
        sampler = ShardSampler(view, 1, 0, 2)
        for w in args.workers:
            loader = make_loader(view, b, sampler, w, drop_last=True, pin=device.type == "cuda")
            first, ips, ms = time_loader(iter(loader), args.batches, device)
            rows.append(dict(loader=f"eager, {w} workers", batch=b, first_s=first, images_per_s=ips, ms_per_batch=ms))
            print(f"  {rows[-1]}", flush=True)
        dev_images = fp.DeviceImages(view, spec, device)
        loader = fp.DeviceLoader(dev_images, b, sampler)
        first, ips, ms = time_loader(iter(loader), args.batches, device)
        rows.append(dict(loader=f"device ({device.type})", batch=b, first_s=first, images_per_s=ips, ms_per_batch=ms))
        print(f"  {rows[-1]}", flush=True)
        t0 = time.perf_counter()
        reps = 20
        for _ in range(reps):
            fp.draw_params(spec, range(b), 32, 32)
        rows.append(dict(loader="  of which: per-sample random numbers (CPU)", batch=b, first_s=None,
                         images_per_s=reps * b / (time.perf_counter() - t0),
                         ms_per_batch=1e3 * (time.perf_counter() - t0) / reps))
    env = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(),
               device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(dict(kind="data", env=env, **r)) + "\n")
    print(f"\n# data loaders, {env}")
    print("| loader | batch | images/s | ms/batch | first batch s |")
    print("|---|---|---|---|---|")
    for r in rows:
        fs = "-" if r["first_s"] is None else f"{r['first_s']:.2f}"
        print(f"| {r['loader']} | {r['batch']} | {r['images_per_s']:.0f} | {r['ms_per_batch']:.2f} | {fs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
