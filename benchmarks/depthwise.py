#!/usr/bin/env python
"""Depthwise convolutions of the batched search step, cuDNN against the Triton kernels (experimental/depthwise.py):
microseconds per call of the forward, the input gradient and the weight gradient, channels_last, for the shapes
a B=256 search step runs (C=16, 8 layers, K=4: the stacked partial channels of 1-8 edges), with the time the
bytes alone would take (read + write once at --bandwidth) beside them.

    python benchmarks/depthwise.py                                   # GPU: fp32 and bf16, default tiles
    python benchmarks/depthwise.py --tiles 128,32,8 64,32,4         # also other (pixels, channels, warps) tiles
    TRITON_INTERPRET=1 python benchmarks/depthwise.py --device cpu --smoke   # the code path on a CPU

Each tile applies to all three kernels (experimental/depthwise.py TILES; HVD_PCDARTS_DW_TILES sets them for training
runs). First (unless --no-pools; few compiles, so a run cut short keeps them) the 3x3 pools of the same shapes,
torch's NHWC kernels against the Triton ones (experimental/pooling.py, its default tiles): forward and input gradient.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from hvd_pcdarts.experimental import depthwise as dw  # noqa: E402
from hvd_pcdarts.experimental import pooling  # noqa: E402

# (channels, map size, stride): group 0 of a normal 32-px cell (8 edges x 4), a later group (3 edges), the
# reduction cell's group 0 (stride 2), a 16-px normal cell, an 8-px one
SHAPES = [(32, 32, 1), (12, 32, 1), (64, 32, 2), (64, 16, 1), (128, 8, 1)]
KERNELS = [(3, 1), (5, 1), (3, 2), (5, 2)]  # (kernel, dilation): sep_conv_3x3/5x5, dil_conv_3x3/5x5


def _time(fn, device, reps):
    for _ in range(3):
        fn()
    if device.type != "cuda":
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(t)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) * 1e3 for a, b in ev)


def measure(batch, c, size, stride, k, d, dtype, device, reps, tiles, bandwidth):
    pad = d * (k - 1) // 2
    x = torch.randn(batch, c, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, 1, k, k, device=device, dtype=dtype)
    y = torch.nn.functional.conv2d(x, w, None, stride, pad, d, c)
    g = torch.randn_like(y)
    conv_bwd = torch.ops.aten.convolution_backward

    def cudnn(mask):
        return lambda: conv_bwd(g, x, w, None, [stride] * 2, [pad] * 2, [d] * 2, False, [0, 0], c, mask)

    row = dict(batch=batch, C=c, size=size, stride=stride, k=k, dilation=d, dtype=str(dtype).split(".")[-1],
               bytes_us=(x.numel() + y.numel()) * x.element_size() / bandwidth * 1e6,
               cudnn=dict(fwd=_time(lambda: torch.nn.functional.conv2d(x, w, None, stride, pad, d, c), device, reps),
                          dgrad=_time(cudnn([True, False, False]), device, reps),
                          wgrad=_time(cudnn([False, True, False]), device, reps)))
    for tile in tiles:
        dw.TILES.update(fwd=tile, dgrad=tile, wgrad=tile)
        row[f"triton {','.join(map(str, tile))}"] = dict(
            fwd=_time(lambda: dw._forward(x, w, stride, pad, d), device, reps),
            dgrad=_time(lambda: dw._input_grad(g, w, x.shape, x.dtype, stride, pad, d), device, reps),
            wgrad=_time(lambda: dw._weight_grad(x, g, w.shape, w.dtype, stride, pad, d), device, reps))
    return row


def measure_pool(batch, c, size, stride, kind, dtype, device, reps, bandwidth):
    """The search cells' 3x3 pools (padding 1, averages without the padding): torch against the kernels."""
    x = torch.randn(batch, c, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    F, aten = torch.nn.functional, torch.ops.aten
    if kind == "max":
        y, idx = F.max_pool2d(x, 3, stride, 1, return_indices=True)
        torch_fwd = lambda: F.max_pool2d(x, 3, stride, 1)  # noqa: E731
        torch_bwd = lambda: aten.max_pool2d_with_indices_backward(g, x, [3, 3], [stride] * 2, [1, 1], [1, 1],  # noqa
                                                                  False, idx)
    else:
        y = F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)
        torch_fwd = lambda: F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)  # noqa: E731
        torch_bwd = lambda: aten.avg_pool2d_backward(g, x, [3, 3], [stride] * 2, [1, 1], False, False, None)  # noqa
    g = torch.randn_like(y)
    arg = pooling._forward(x, kind, 3, stride, 1, False)[1]
    return dict(batch=batch, C=c, size=size, stride=stride, pool=kind, dtype=str(dtype).split(".")[-1],
                bytes_us=(x.numel() + y.numel()) * x.element_size() / bandwidth * 1e6,
                torch=dict(fwd=_time(torch_fwd, device, reps), bwd=_time(torch_bwd, device, reps)),
                triton=dict(fwd=_time(lambda: pooling._forward(x, kind, 3, stride, 1, False), device, reps),
                            bwd=_time(lambda: pooling._input_grad(g, arg, x.shape, x.dtype, 3, stride, 1), device,
                                      reps)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--tiles", nargs="+", default=[",".join(map(str, dw.TILES["fwd"]))],
                   help="(pixels, channels, warps) per program, e.g. 128,32,4")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s for the bytes_us column (H100)")
    p.add_argument("--pools", action=argparse.BooleanOptionalAction, default=True,
                   help="also the pools: torch against experimental/pooling.py")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU run under TRITON_INTERPRET=1)")
    p.add_argument("--json", help="append one JSON line per row to this file")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    probe = torch.empty(1, device=device)
    if not dw.available(probe):
        print(f"depthwise: the Triton kernels cannot run on {device} (CUDA, or the CPU under TRITON_INTERPRET=1)")
        return 2
    try:
        tiles = [dw.parse_tiles(t)["fwd"] for t in a.tiles]
    except ValueError:
        print(f"depthwise: --tiles {' '.join(a.tiles)}: each must be PIXELS,CHANNELS,WARPS, powers of two")
        return 2
    shapes, kernels, batch, reps = SHAPES, KERNELS, a.batch, a.reps
    if a.smoke:
        shapes, kernels, batch, reps = [(12, 6, 1), (8, 6, 2)], [(3, 1), (5, 2)], 2, 2
    torch.backends.cudnn.benchmark = True
    if a.pools:
        print(f"# pools 3x3 (experimental/pooling.py tiles {pooling.TILES}); microseconds per call (median)")
        print("| C | size | stride | pool | dtype | bytes floor | torch fwd / bwd | triton fwd / bwd |")
        print("|---|---|---|---|---|---|---|---|")
        for name in a.dtypes:
            for c, size, stride in shapes:
                for kind in pooling.KINDS:
                    r = measure_pool(batch, c, size, stride, kind, getattr(torch, name), device, reps, a.bandwidth)
                    print(f"| {c} | {size} | {stride} | {kind} | {name} | {r['bytes_us']:.1f} | "
                          f"{r['torch']['fwd']:.0f} / {r['torch']['bwd']:.0f} | "
                          f"{r['triton']['fwd']:.0f} / {r['triton']['bwd']:.0f} |", flush=True)
                    if a.json:
                        with open(a.json, "a") as f:
                            f.write(json.dumps(dict(kind="pool", **r)) + "\n")
        print()
    print(f"# depthwise: batch {batch}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; microseconds per call (median)")
    print("| C | size | stride | k | dil | dtype | bytes floor | cuDNN fwd / dgrad / wgrad | "
          + " | ".join(f"triton {t} fwd / dgrad / wgrad" for t in a.tiles) + " |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(tiles))
    for name in a.dtypes:
        for c, size, stride in shapes:
            for k, d in kernels:
                r = measure(batch, c, size, stride, k, d, getattr(torch, name), device, reps, tiles, a.bandwidth)
                cells = [f"{r[key]['fwd']:.0f} / {r[key]['dgrad']:.0f} / {r[key]['wgrad']:.0f}"
                         for key in r if isinstance(r[key], dict)]
                print(f"| {c} | {size} | {stride} | {k} | {d} | {name} | {r['bytes_us']:.1f} | " + " | ".join(cells)
                      + " |", flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps(dict(kind="depthwise", **r)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
