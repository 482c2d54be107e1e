#!/usr/bin/env python
"""What one search step asks of the memory system: every aten op of one step (arch + weight, as
`search_step.py` runs it) with the bytes it reads and writes and its FLOPs, grouped by kernel class, and the
roofline floor of the step on a given GPU. Runs on the CPU (the aten ops are the ones a GPU runs; the kernels
differ), so it explains GPU timings without a GPU.

    python benchmarks/step_traffic.py --batch 32 256 --variants eager+cl eager+cl+be

Per op: bytes = sizes of its tensor inputs + outputs (views and allocations move nothing; an in-place op counts its
tensor twice: read and write), FLOPs from torch.utils.flop_counter (convolutions and matmuls only; elementwise work
is counted as bytes; its convolution-backward formula ignores `groups` for the weight gradient, so the FLOPs of
grouped convolutions are over-counted: an upper bound, and far from binding either way).
Floor of a kernel class = max(its bytes / bandwidth, its FLOPs / peak FLOP rate), summed over the classes (a
lower bound; per op it would be a little higher); `--node-us` adds a per-kernel floor (a CUDA-graph
node costs ~2.8 us on an H100 however small: RESULTS.md, "H100, per-edge network"). A kernel's real time is above
its floor; the ratio measured / floor says how far from the hardware a step's kernels run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cuda_autocast  # noqa: E402
import search_step as ss  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

GPUS = {  # bytes/s of HBM, fp32 FLOP/s without tensor cores (TF32 convolutions can go faster: FLOPs never bind here)
    "h100": (3.35e12, 67e12),
    "h200": (4.8e12, 67e12),
}
FREE = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
        "lift_fresh", "set_", "resize_")


def _nbytes(t: torch.Tensor) -> int:
    # an expanded (stride-0) view reads no more than its storage holds
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


class Traffic(TorchDispatchMode):
    """Records (op name, bytes moved) for every aten op dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if getattr(func, "is_view", False) or name in FREE:
            return out
        ins = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
        if name == "copy_":  # reads the source, writes the destination (counted once, as the output)
            ins = ins[1:]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        fp32 = sum(_nbytes(t) for t in ins + outs if t.dtype == torch.float32)
        self.ops.append((name, sum(map(_nbytes, ins)) + sum(map(_nbytes, outs)), fp32))
        return out


@contextlib.contextmanager
def cuda_sums(traffic: Traffic):
    """+tsm on the CPU: experimental/sums.py's kernels where CUDA would run them, each launch counted as one op
    ("add_n", "add_scaled", "dots": its inputs read once, its output written once), computed by torch outside the
    count (the dots' sum of per-program partials: one more small op, as on the GPU)."""
    from torch.utils._python_dispatch import _disable_current_modes

    from hvd_pcdarts.experimental import depthwise, sums

    # (sums.runs_on is replaced, not depthwise.available: +tdw would launch Triton on the CPU)
    runs_on, launch, scaled, dots = sums.runs_on, sums._launch, sums._launch_scaled, sums._launch_dots

    def record(name, xs, out):
        traffic.ops.append((name, sum(map(_nbytes, xs)) + _nbytes(out),
                            sum(_nbytes(t) for t in (*xs, out) if t.dtype == torch.float32)))
        return out

    def emulated(xs):
        with _disable_current_modes():
            return record("add_n", xs, sums._pairwise(xs))

    def emulated_scaled(gs, w, idx):  # sum_i w[idx[i]] * g_i: the views read once, the output written once
        with _disable_current_modes():
            out = sum(g * w[i] for g, i in zip(gs, idx)).contiguous()
            return record("add_scaled", gs, out)

    def emulated_dots(g, xs):  # [sum(g * x)]: g and each x read once, a partial sum per program (not counted)
        with _disable_current_modes():
            out = torch.stack([(g.float() * x.float()).sum() for x in xs])
            record("dots", [g, *xs], out)
            return record("sum", [], out)  # the partials' sum (a few KiB)

    sums.runs_on = lambda x: type(x) is torch.Tensor and x.dtype in depthwise.DTYPES
    sums._launch, sums._launch_scaled, sums._launch_dots = emulated, emulated_scaled, emulated_dots
    try:
        yield
    finally:
        sums.runs_on, sums._launch, sums._launch_scaled, sums._launch_dots = runs_on, launch, scaled, dots


def measure(variant: str, batch: int, args) -> dict:
    v = ss.parse_variant(variant)
    if v.mode != "eager" or v.tc:
        raise SystemExit(f"{variant}: step_traffic counts the eager ops (a graph replays the same ones; no +compile)")
    device = torch.device("cpu")
    model, step = ss.build_step(v, args, device)
    batches = ss.make_batches(2, batch, device)
    # +bf16: the dtypes CUDA autocast would give each op (the CPU's policy differs for a few: cuda_autocast.py)
    policy = cuda_autocast.emulate if v.bf16 else contextlib.nullcontext
    flops = FlopCounterMode(display=False)
    traffic = Traffic()
    sums = (lambda: cuda_sums(traffic)) if v.opts.get("sums") == "triton" else contextlib.nullcontext
    with policy(), sums():
        ss.one_step(step, batches, 0)  # first step: lazy state (optimizer moments, batched BN aliasing) created
    traffic.ops.clear()
    with policy(), sums(), flops, traffic:
        ss.one_step(step, batches, 1)
    fl = collections.Counter({str(k): v for k, v in flops.get_flop_counts()["Global"].items()})
    per_class = collections.defaultdict(lambda: [0, 0, 0.0])  # ops, bytes, flops
    op_bytes = collections.Counter()
    op_count = collections.Counter()
    for name, nb, _ in traffic.ops:
        op_bytes[name] += nb
        op_count[name] += 1
    for name in op_count:
        c = per_class[ss.kernel_class(name)]
        c[0] += op_count[name]
        c[1] += op_bytes[name]
        c[2] += fl.get(name, 0) + fl.get(f"aten.{name}", 0)
    return dict(variant=variant, batch=batch, ops=len(traffic.ops), bytes=sum(op_bytes.values()),
                fp32_bytes=sum(f for _, _, f in traffic.ops),
                flops=sum(fl.values()), per_class={k: tuple(v) for k, v in per_class.items()},
                top=op_bytes.most_common(8), counts=op_count)


def floor_ms(r: dict, gpu: str, node_us: float) -> tuple[float, float]:
    bw, fr = GPUS[gpu]
    roof = sum(max(b / bw, f / fr) for _, b, f in r["per_class"].values()) * 1e3
    return roof, roof + r["ops"] * node_us / 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    p.add_argument("--variants", nargs="+", default=["eager+cl", "eager+cl+be"])
    p.add_argument("--C", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--node-us", type=float, default=2.8, help="per-kernel floor in microseconds")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.compile_backend = "inductor"
    if args.threads:
        torch.set_num_threads(args.threads)
    for v in args.variants:
        ss.parse_variant(v)
    bw, fr = GPUS[args.gpu]
    print(f"# step_traffic: C={args.C} layers={args.layers} K={args.K}; floor on {args.gpu}: "
          f"{bw / 1e12:.2f} TB/s, {fr / 1e12:.0f} TFLOP/s, {args.node_us} us per kernel", flush=True)
    rows = []
    for b in args.batch:
        for v in args.variants:
            r = measure(v, b, args)
            rows.append(r)
            roof, with_nodes = floor_ms(r, args.gpu, args.node_us)
            print(f"\n## {v}, B={b}: {r['ops']} ops, {r['bytes'] / 2**30:.2f} GiB moved "
                  f"({r['fp32_bytes'] / 2**30:.2f} in float32 tensors), {r['flops'] / 1e9:.1f} GFLOP; "
                  f"floor {roof:.1f} ms (bytes/FLOPs), {with_nodes:.1f} ms with {args.node_us} us per kernel",
                  flush=True)
            print("| class | ops | GiB moved | GFLOP | floor ms |")
            print("|---|---|---|---|---|")
            for k, (n, nb, f) in sorted(r["per_class"].items(), key=lambda kv: -kv[1][1]):
                print(f"| {k} | {n} | {nb / 2**30:.3f} | {f / 1e9:.1f} | {1e3 * max(nb / bw, f / fr):.2f} |")
            print("  most bytes: " + ", ".join(f"{n} {nb / 2**30:.2f} GiB ({r['counts'][n]}x)" for n, nb in r["top"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
