#!/usr/bin/env python
"""Benchmark one PC-DARTS search step (architecture step + weight step, first order) on one device, eager versus
the fast paths, side by side in one run. Needs no Horovod (one rank; no collectives).

    python benchmarks/search_step.py --device cuda --batch 256 32 \
        --variants eager eager+cl eager+bf16 graph graph+cl graph+bf16 --check
    python benchmarks/search_step.py --device cpu --batch 8 --steps 2 --variants eager eager+cl   # smoke

A variant is MODE[+cl][+bf16]: MODE is eager (the reference: search.Searcher's step without Horovod), graph
(forward+backward of each half captured as a CUDA graph, optimizers outside: fastpath.GraphedSearchStep) or compile (=
eager+compile); +compile = torch.compile of each cell (fastpath.compile_cells, as --compile; needs +be; the arch step
freezes the weights); +cl = channels_last; +bf16 = bf16 autocast; +bnc = batch norm as plain reductions
(experimental/composite_bn.py); +be = the batched mixed op (--batched-edges: models/batched_cell.py, each cell's ready
edges as grouped convolutions), with its implementation choices (a models/batched_options.BatchedOptions) for A/B
timings: +pwg / +pwd = 1x1 convolutions grouped / block-diagonal dense (default: dense on CUDA), +nclg = without
making the gradients channels_last, +msc / +mse / +nms = a group's ops on parallel
CUDA streams while a graph is captured (default) / also eager / never, +dd = pools, ReLU and pool-BN statistics once
per distinct input of a group, +ud3 / +uda = dilated depthwise convolutions as undilated ones with zeros between the
taps (dil_conv_3x3 only / both), +fz5 / +fza = the convolution ops of a group fused into one chain (sep_conv_3x3,
sep_conv_5x5 and dil_conv_3x3 / also dil_conv_5x5: one depthwise conv with 3 / 4 filters per channel, 5x5 / 9x9
kernels, one 1x1 conv, one BN; the separable convs' second halves as one), +tdw / +tdh = the depthwise convolutions of
channels_last runs as Triton kernels (experimental/depthwise.py; CUDA) / only the dilated ones and the weight
gradients, +tpl = the pools of channels_last runs as Triton kernels (experimental/pooling.py; CUDA), +npk = each
grouped conv's weights concatenated (and cast under autocast) conv by conv instead of one weight pack per cell (the
default), +tsm = a group's primitive outputs summed, and the gradients of its input and of its ReLU
(each read by several ops) accumulated, by one Triton kernel each (experimental/sums.py; CUDA).
Per variant: median and mean ms per step (arch + weight, synchronized every step, as the training loop is by
its loss readout), images/s = 2 x batch / median step (each step trains on an arch batch and a weight batch),
peak GPU memory (torch.cuda.max_memory_allocated, from model build to the end of timing).
`--check` (first, before the timings): every fp32 non-eager variant is run for `--check-steps` steps from the
same initial weights and batches as eager (cuDNN deterministic) and the largest differences are printed (loss,
weights, alphas/betas).
`--profile N`: after the timings, N more steps of each variant under torch.profiler; prints the device time per
step by kernel class (convolution, batch norm, elementwise, copy/cat, reduction, other) and the kernels that take
most of it (on the CPU: aten ops' self time). Graph variants show the kernels their replays run.
Results: a markdown table on stdout; `--json FILE` appends one JSON object per row.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from hvd_pcdarts import fastpath as fp  # noqa: E402
from hvd_pcdarts.experimental.composite_bn import use_composite_bn  # noqa: E402
from hvd_pcdarts.models import BatchedOptions  # noqa: E402
from hvd_pcdarts.steps import SearchStep  # noqa: E402

Variant = collections.namedtuple("Variant", "mode cl bf16 bnc be tc opts")
BE_OPTIONS = {"pwg": ("pointwise", "grouped"), "pwd": ("pointwise", "dense"), "nclg": ("cl_grads", False),
              "msc": ("streams", "capture"), "mse": ("streams", "on"), "nms": ("streams", "off"),
              "dd": ("dedup", True), "ud3": ("dilated", "3x3"), "uda": ("dilated", "all"),
              "fz5": ("fuse", "5x5"), "fza": ("fuse", "all"), "tdw": ("depthwise", "triton"),
              "tdh": ("depthwise", "hybrid"), "tpl": ("pool", "triton"), "npk": ("pack", False),
              "tsm": ("sums", "triton")}


def parse_variant(v: str) -> Variant:
    parts = v.split("+")
    mode = parts[0]
    if mode not in ("eager", "graph", "compile"):
        raise SystemExit(f"unknown variant {v!r}: MODE must be eager, graph or compile")
    extra = set(parts[1:])
    if extra - {"cl", "bf16", "bnc", "be", "compile", *BE_OPTIONS}:
        raise SystemExit(f"unknown variant {v!r}: options are +cl, +bf16, +bnc, +be, +compile and (with +be) "
                         f"+{', +'.join(BE_OPTIONS)}")
    if extra & set(BE_OPTIONS) and "be" not in extra:
        raise SystemExit(f"unknown variant {v!r}: +{', +'.join(BE_OPTIONS)} choose how +be computes")
    chosen = [BE_OPTIONS[o] for o in sorted(extra & set(BE_OPTIONS))]
    opts = dict(chosen)
    if len(opts) < len(chosen):
        raise SystemExit(f"unknown variant {v!r}: two options set the same choice ({sorted(extra & set(BE_OPTIONS))})")
    if {"bnc", "be"} <= extra:
        raise SystemExit(f"unknown variant {v!r}: +be computes its batch norms itself (no +bnc)")
    tc = mode == "compile" or "compile" in extra
    if tc and "be" not in extra:
        raise SystemExit(f"unknown variant {v!r}: torch.compile needs +be (as --compile needs --batched-edges)")
    return Variant("eager" if mode == "compile" else mode, "cl" in extra, "bf16" in extra, "bnc" in extra,
                   "be" in extra, tc, opts)


def make_batches(n, batch, device, size=32, classes=10, seed=123):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=g)
        y = torch.randint(0, classes, (batch,), generator=g)
        out.append((x.to(device), y.to(device)))
    return out


def build_step(v: Variant, args, device):
    model, arch, weights, a_opt, w_opt = fp.build_search(args.C, args.layers, args.K, seed=args.seed, device=device,
                                                         channels_last=v.cl, batched_edges=v.be,
                                                         batched_options=BatchedOptions(**v.opts))
    if v.bnc:
        use_composite_bn(model)
    if v.tc:
        fp.compile_cells(model, backend=args.compile_backend)
    model.train()
    crit = nn.CrossEntropyLoss()
    dt = torch.bfloat16 if v.bf16 else None
    cls = fp.GraphedSearchStep if v.mode == "graph" else SearchStep
    step = cls(model, crit, arch, weights, a_opt, w_opt, grad_clip=5.0, autocast_dtype=dt, channels_last=v.cl,
               freeze_weights=v.tc)
    return model, step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_step(step, batches, i):
    xa, ya = batches[(2 * i) % len(batches)]
    xw, yw = batches[(2 * i + 1) % len(batches)]
    la = step.arch_step(xa, ya)
    lw = step.weight_step(xw, yw)[1]
    return la, lw


def bench(variant, batch, args, device):
    v = parse_variant(variant)
    if v.mode == "graph" and device.type != "cuda":
        return dict(variant=variant, batch=batch, error="graph needs CUDA")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    batches = make_batches(4, batch, device)
    t_build = time.perf_counter()
    model, step = build_step(v, args, device)
    try:
        for i in range(args.warmup):
            one_step(step, batches, i)
        sync(device)
        first = time.perf_counter() - t_build
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            la, lw = one_step(step, batches, args.warmup + i)
            float(lw)  # the training loop reads the loss every step
            sync(device)
            times.append(time.perf_counter() - t0)
    except Exception as e:  # one failing variant must not cost the others
        return dict(variant=variant, batch=batch, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    prof = None
    if args.profile:
        try:
            prof = profile_steps(step, batches, args.profile, device)
        except Exception as e:  # the timings stand
            print(f"  profile of {variant} failed: {type(e).__name__}: {e}"[:200], flush=True)
    try:
        saved = saved_activations_gib(model, step, batches[0][0]) if args.saved_memory else None
    except Exception as e:  # e.g. out of memory: the timings stand
        print(f"  saved-memory measurement of {variant} failed: {type(e).__name__}: {e}"[:200], flush=True)
        saved = None
    med = statistics.median(times)
    if prof and device.type == "cuda" and prof["total_ms"] < 0.3 * 1e3 * med:
        print(f"  warning: the profile of {variant} accounts for {prof['total_ms']:.1f} ms of a {1e3 * med:.1f} ms "
              f"step: kernels missing from it (graph replays not traced?) or a launch-bound step", flush=True)
    row = dict(variant=variant, batch=batch, C=args.C, layers=args.layers, K=args.K, device=device.type,
               ms_median=1e3 * med, ms_mean=1e3 * statistics.mean(times), ms_min=1e3 * min(times),
               images_per_s=2 * batch / med, peak_gib=peak, saved_gib=saved, setup_s=first, steps=args.steps,
               loss=float(lw), profile=prof)
    del model, step, batches
    return row


KERNEL_CLASSES = (  # first match wins; lower-case substrings of kernel (or aten op) names
    ("batch norm", ("batch_norm", "batchnorm", "bn_", "welford", "native_batch_norm")),
    ("convolution", ("conv", "cudnn", "xmma", "implicit_gemm", "dgrad", "wgrad", "depthwise", "sm90_", "cutlass",
                     "gemm", "mkldnn", "winograd")),
    ("pooling", ("pool",)),
    ("copy / cat", ("cat", "copy", "memcpy", "memset", "contiguous", "clone", "index")),
    ("reduction", ("reduce", "sum", "softmax", "norm")),
    ("elementwise", ("elementwise", "vectorized", "pointwise", "triton_poi", "add", "mul", "relu", "threshold",
                     "fill", "where", "div", "sqrt", "pow")),
)


INDUCTOR_PREFIXES = (  # inductor names its kernels after the aten ops it fused ("triton_poi_fused_convolution_relu_0"
    # is a pointwise kernel, not a convolution): its prefix says what the kernel is
    ("triton_poi", "elementwise"), ("triton_red", "reduction"), ("triton_per", "reduction"),
)


def kernel_class(name: str) -> str:
    n = name.lower()
    for prefix, cls in INDUCTOR_PREFIXES:
        if n.startswith(prefix):
            return "batch norm" if cls == "reduction" and "batch_norm" in n else cls
    for cls, keys in KERNEL_CLASSES:
        if any(k in n for k in keys):
            return cls
    return "other"


def aggregate_profile(events, n: int, device_type: str) -> dict:
    """`events`: the profiler's FunctionEvents of `n` steps. CUDA: each kernel (and memcpy/memset) on the GPU,
    by its duration there; annotation ranges that torch mirrors onto the GPU timeline (record_function, e.g.
    "Optimizer.step#Adam.step", spanning other kernels) are not kernels and are left out. CPU: the aten ops' self
    time. Returns ms and calls per step: total, by kernel class, the top 15 names."""
    kernels = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if device_type == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue
            us = e.time_range.elapsed_us()  # a kernel's own duration on the GPU
        else:
            if not e.name.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        kernels[e.name][0] += us / 1e3 / n
        kernels[e.name][1] += 1 / n
    by_class = collections.Counter()
    for name, (ms, _) in kernels.items():
        by_class[kernel_class(name)] += ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    return dict(total_ms=sum(ms for ms, _ in kernels.values()), kernels_per_step=sum(c for _, c in kernels.values()),
                by_class={k: round(v, 3) for k, v in by_class.most_common()},
                top=[dict(name=k[:120], ms=round(ms, 3), calls=round(c, 1)) for k, (ms, c) in top])


def profile_steps(step, batches, n, device):
    """Device time per step of `n` profiled steps (`aggregate_profile`). On CUDA the profiler (CUPTI) reports the
    kernels a CUDA-graph replay runs one by one; `bench` warns when a profile accounts for far less than the
    measured step (kernels not seen)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        for i in range(n):
            one_step(step, batches, i)
        sync(device)
    return aggregate_profile(prof.events(), n, device.type)


def print_profile(variant, batch, prof):
    print(f"\n  profile {variant} B={batch}: {prof['total_ms']:.1f} ms of device time per step in "
          f"{prof['kernels_per_step']:.0f} kernels/ops", flush=True)
    print("   " + ", ".join(f"{k} {v:.1f} ms ({100 * v / max(prof['total_ms'], 1e-9):.0f}%)"
                            for k, v in prof["by_class"].items()))
    for t in prof["top"]:
        print(f"    {t['ms']:8.2f} ms {t['calls']:7.1f}x  {t['name']}")


def saved_activations_gib(model, step, x):
    """GiB of the tensors one training forward saves for backward (distinct storages; torch's
    saved_tensors_hooks): the activation memory of a step, measurable on any device (the CPU's allocator keeps
    no peak). Run outside any CUDA graph (a graphed variant saves the same tensors in its pool), through the
    compiled cells for +compile variants, after the timings."""
    sizes = {}

    def pack(t):
        st = t.untyped_storage()
        sizes[st.data_ptr()] = st.nbytes()
        # not `t` itself: a saved output that holds its own Python object is a reference cycle through C++ that the
        # garbage collector cannot see, and every variant's activations stayed allocated (the H200 run's peaks grew
        # variant by variant: 9.7 -> 19 -> 25 -> 30 -> 36 GiB)
        return t.detach()

    if step.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dt = step.autocast_dtype
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=dt or torch.float32, enabled=dt is not None):
            out = model(x)
    del out
    return sum(sizes.values()) / 2**30


def check(variant, batch, args, device):
    """Same start, same batches: eager versus `variant` after args.check_steps steps (fp32 variants only)."""
    v = parse_variant(variant)
    t0 = time.perf_counter()
    # deterministic cuDNN and no TF32 (torch lets cuDNN's convolutions use TF32 by default: ~1e-3 relative rounding,
    # different per kernel, so a batched grouped convolution and the per-edge ones would differ by far more than
    # float32 rounding)
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = \
        True, False, False
    try:
        batches = make_batches(4, batch, device, seed=7)
        res = {}
        for tag, vv in (("ref", parse_variant("eager")), ("new", v._replace(bf16=False))):
            model, step = build_step(vv, args, device)
            losses = []
            for i in range(args.check_steps):
                la, lw = one_step(step, batches, i)
                losses += [float(la), float(lw)]
            res[tag] = (losses, [p.detach().float().clone() for p in model.weight_parameters()],
                        [p.detach().float().clone() for p in model.arch_parameters()],
                        [b.detach().float().clone() for b in model.buffers() if b.is_floating_point()])
            del model, step
        (l0, w0, a0, b0), (l1, w1, a1, b1) = res["ref"], res["new"]

        def rel(xs, ys):
            num = sum(float((x - y).double().pow(2).sum()) for x, y in zip(xs, ys)) ** 0.5
            den = sum(float(x.double().pow(2).sum()) for x in xs) ** 0.5
            return num / max(den, 1e-30)

        # seconds: both runs, incl. graph capture and (+compile) compiling, which later variants of the same shapes
        # reuse from dynamo's cache
        return dict(variant=variant, batch=batch, steps=args.check_steps, seconds=time.perf_counter() - t0,
                    loss_max_abs_diff=max(abs(a - b) for a, b in zip(l0, l1)),
                    weights_rel_diff=rel(w0, w1), arch_rel_diff=rel(a0, a1), bn_stats_rel_diff=rel(b0, b1),
                    losses_eager=l0, losses_variant=l1)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = \
            flags


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[256, 32], help="per-device batch of each half")
    p.add_argument("--variants", nargs="+", default=["eager", "graph"])
    p.add_argument("--C", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (graph: capture happens here)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="cudnn.benchmark (the original PC-DARTS code turns it on)")
    p.add_argument("--check", action="store_true", help="equivalence of each fp32 fast variant with eager")
    p.add_argument("--check-batch", type=int, default=32)
    p.add_argument("--check-steps", type=int, default=3)
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of +compile variants "
                   "(aot_eager: a quick CPU rehearsal)")
    p.add_argument("--saved-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the activations one forward saves for backward (GiB; any device)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timings, profile N more steps of each variant: device time by kernel class")
    p.add_argument("--json", default=None, help="append one JSON object per result to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, threads=torch.get_num_threads(),
               device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               cudnn_benchmark=args.cudnn_benchmark)
    for v in args.variants:  # every name checked before anything runs
        parse_variant(v)
    print(f"# search_step: C={args.C} layers={args.layers} K={args.K} {env}", flush=True)
    rows, checks = [], []
    if args.check:
        for v in args.variants:
            pv = parse_variant(v)
            if v == "eager" or pv.bf16 or (pv.mode == "graph" and device.type != "cuda"):
                continue
            try:
                c = check(v, args.check_batch, args, device)
            except Exception as e:
                c = dict(variant=v, batch=args.check_batch, error=f"{type(e).__name__}: {e}"[:300])
            checks.append(c)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(dict(kind="check", env=env, **c)) + "\n")
            print(f"  check {v}: {json.dumps({k: c[k] for k in c if not k.startswith('losses')})}", flush=True)
    for b in args.batch:
        for v in args.variants:
            r = bench(v, b, args, device)
            r["env"] = env
            rows.append(r)
            if args.json:  # row by row: a run cut short keeps what it measured
                with open(args.json, "a") as f:
                    f.write(json.dumps(dict(kind="search_step", **r)) + "\n")
            msg = r.get("error") or (f"{r['ms_median']:.1f} ms/step, {r['images_per_s']:.0f} img/s, "
                                     f"peak {fmt(r['peak_gib'], '.2f')} GiB, saved {fmt(r['saved_gib'], '.2f')} GiB")
            print(f"  batch {b:4d} {v:14s} {msg}", flush=True)
            if r.get("profile"):
                print_profile(v, b, r["profile"])
    base = {r["batch"]: r for r in rows if r["variant"] == "eager" and "error" not in r}
    print("\n| device | batch | variant | ms/step (median) | images/s | speedup vs eager | peak GiB | saved GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {env['device_name']} | {r['batch']} | {r['variant']} | error: {r['error'][:80]} | | | | |")
            continue
        sp = base[r["batch"]]["ms_median"] / r["ms_median"] if r["batch"] in base else None
        print(f"| {env['device_name']} | {r['batch']} | {r['variant']} | {r['ms_median']:.1f} | "
              f"{r['images_per_s']:.0f} | {fmt(sp, '.2f')} | {fmt(r['peak_gib'], '.2f')} | "
              f"{fmt(r['saved_gib'], '.3f')} |")
    if checks:
        print("\n| check (vs eager, fp32) | batch | steps | max abs loss diff | weights rel diff | arch rel diff | "
              "BN stats rel diff | seconds (both runs, incl. capture/compile) |")
        print("|---|---|---|---|---|---|---|---|")
        for c in checks:
            if "error" in c:
                print(f"| {c['variant']} | {c['batch']} | | error: {c['error'][:80]} | | | | |")
            else:
                print(f"| {c['variant']} | {c['batch']} | {c['steps']} | {c['loss_max_abs_diff']:.2e} | "
                      f"{c['weights_rel_diff']:.2e} | {c['arch_rel_diff']:.2e} | {c['bn_stats_rel_diff']:.2e} | "
                      f"{c['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
