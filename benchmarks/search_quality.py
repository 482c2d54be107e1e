#!/usr/bin/env python
"""Search quality on a planted architecture: does the search find the cell that made the labels?

A teacher network (models.eval_network.NetworkCIFAR, random weights of a fixed seed, batch norm statistics of the
images) built from a known genotype (TEACHER below) labels synthetic images: smooth noise, each label the argmax of
the teacher's logits standardized per class, so that the classes come out about equally often. The images go into
an imagefolder tree, and the shipped search (bin/train_search.py, one process, --no-augment, a per-class half
split; --batched-edges --channels-last: the same search in fewer, faster CPU kernels) runs on them once per variant
and seed; the teacher and the images stay the same. Each derived genotype is scored against the teacher's per cell
(normal, reduce) and node: an edge is recovered when the derived node holds the teacher's (input, op) pair, an input
when the derived node reads the teacher's input whatever the op; both out of 8 per cell. Beside them: the derived
normal cell's skip_connect count, the last search-validation accuracy and the epochs the search ran.

    python benchmarks/search_quality.py --variants plain skip-cap=2 early-stop=stable:3 beta-decay=50 \\
        --seeds 1 2 3 --json search_quality.json

A variant is `plain` (the search's defaults in this small setting) or an option of the search with its value:
skip-cap=N (--skip-cap N), early-stop=RULE (--early-stop RULE), beta-decay=W (--arch-reg beta-decay
--arch-reg-weight W). The chance row is the expectation for a genotype drawn uniformly from what the derivation can
produce (two distinct inputs per node, any op but none).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hvd_pcdarts.checkpoint import atomic_write_text  # noqa: E402
from hvd_pcdarts.space.genotypes import PRIMITIVES, Genotype, load_genotype, to_dict  # noqa: E402

# The planted cells: one skip_connect per cell, every other op once or twice, nodes reading earlier nodes.
TEACHER = Genotype(
    normal=[("sep_conv_3x3", 1), ("dil_conv_5x5", 0), ("sep_conv_5x5", 0), ("avg_pool_3x3", 2),
            ("dil_conv_3x3", 2), ("skip_connect", 3), ("max_pool_3x3", 1), ("sep_conv_3x3", 4)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("dil_conv_5x5", 2), ("sep_conv_3x3", 1),
            ("avg_pool_3x3", 0), ("dil_conv_3x3", 3), ("sep_conv_3x3", 4), ("skip_connect", 2)],
    reduce_concat=[2, 3, 4, 5],
)
OPTIONS = {  # variant name -> the search's flags for its value
    "skip-cap": lambda v: ["--skip-cap", v],
    "early-stop": lambda v: ["--early-stop", v],
    "beta-decay": lambda v: ["--arch-reg", "beta-decay", "--arch-reg-weight", v],
}
METRICS = ("normal_edges", "normal_inputs", "reduce_edges", "reduce_inputs", "normal_skips", "normal_undecided",
           "reduce_undecided", "valid_acc", "epochs_run")


def variant_flags(text: str) -> list[str]:
    """`plain` -> [], `skip-cap=2` -> ["--skip-cap", "2"], ...; anything else: SystemExit naming the choices."""
    if text == "plain":
        return []
    name, eq, value = text.partition("=")
    if name not in OPTIONS or not eq or not value:
        raise SystemExit(f"search_quality: unknown variant {text!r} (plain, " +
                         ", ".join(f"{k}=VALUE" for k in OPTIONS) + ")")
    return OPTIONS[name](value)


# --- scoring ---------------------------------------------------------------------------------------------------
def cell_score(derived, teacher) -> tuple[int, int]:
    """(edges, inputs) of `derived` that match `teacher`, node by node (two edges a node, order within a node
    free): an edge matches on (op, input), an input on the input alone."""
    edges = inputs = 0
    for j in range(0, len(teacher), 2):
        d, t = [tuple(e) for e in derived[j:j + 2]], [tuple(e) for e in teacher[j:j + 2]]
        edges += sum((Counter(d) & Counter(t)).values())
        inputs += sum((Counter(i for _, i in d) & Counter(i for _, i in t)).values())
    return edges, inputs


def score(genotype: Genotype, teacher: Genotype = TEACHER) -> dict:
    ne, ni = cell_score(genotype.normal, teacher.normal)
    re_, ri = cell_score(genotype.reduce, teacher.reduce)
    return dict(normal_edges=ne, normal_inputs=ni, reduce_edges=re_, reduce_inputs=ri,
                normal_skips=sum(op == "skip_connect" for op, _ in genotype.normal))


def chance(teacher_cell) -> dict:
    """Expected matches of a uniform random derived cell: node j picks 2 of its j+2 inputs and one of the
    len(PRIMITIVES)-1 ops per edge, so each teacher edge's input is read with probability 2/(j+2)."""
    ops = len(PRIMITIVES) - 1
    inputs = sum(Fraction(2, j // 2 + 2) for j in range(len(teacher_cell)))
    return dict(edges=float(inputs / ops), inputs=float(inputs))


# --- the planted task ----------------------------------------------------------------------------------------
def search_view(image_size: int):
    """The transform the search applies to an imagefolder image under --no-augment (data.make_transform)."""
    from hvd_pcdarts.data import IMAGENET_MEAN, IMAGENET_STD, DataBundle, make_transform

    bundle = DataBundle(None, None, 0, image_size, IMAGENET_MEAN, IMAGENET_STD, "pil")
    return make_transform(bundle, train=True, augment=False, dataset="imagefolder")


def smooth_images(n: int, size: int, seed: int):
    """uint8 (n, size, size, 3) images: Gaussian noise at 1/4, 1/2 and full resolution, upsampled and summed."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, size, size)
    for div, w in ((4, 1.0), (2, 0.6), (1, 0.3)):
        s = max(size // div, 1)
        x += w * F.interpolate(torch.randn(n, 3, s, s, generator=g), size=(size, size), mode="bilinear",
                               align_corners=False)
    x = (128 + 48 * x / x.std()).clamp(0, 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def build_teacher(classes: int, channels: int, layers: int, seed: int, calib):
    """NetworkCIFAR of TEACHER, random weights of `seed`; batch norm statistics from the images `calib`."""
    import torch

    from hvd_pcdarts.models.eval_network import NetworkCIFAR

    torch.manual_seed(seed)
    net = NetworkCIFAR(channels, classes, layers, False, TEACHER)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for chunk in calib.split(256):
            net(chunk)
    return net.eval()


def plant(root: str, args) -> dict:
    """Write the labelled images to root/train/cNN/*.png (root replaced); return the task's description."""
    import torch
    from PIL import Image

    shutil.rmtree(root, ignore_errors=True)  # images of another task would land in two class folders

    # written at the size the search's Resize goes to (its CenterCrop then cuts the border); labelled as seen
    raw = smooth_images(args.images, int(round(args.image_size * 256 / 224)), args.teacher_seed)
    view = search_view(args.image_size)
    pics = [Image.fromarray(a) for a in raw]
    x = torch.stack([view(p) for p in pics])
    teacher = build_teacher(args.classes, args.teacher_channels, args.layers, args.teacher_seed, x)
    with torch.no_grad():
        logits = torch.cat([teacher(c)[0] for c in x.split(256)])
    z = (logits - logits.mean(0)) / logits.std(0)  # per-class standardization: about equal class counts
    labels = z.argmax(1).tolist()
    for k in range(args.classes):
        os.makedirs(os.path.join(root, "train", f"c{k:02d}"), exist_ok=True)
    for i, (p, y) in enumerate(zip(pics, labels)):
        p.save(os.path.join(root, "train", f"c{y:02d}", f"{i:05d}.png"))
    counts = [labels.count(k) for k in range(args.classes)]
    return dict(genotype=to_dict(TEACHER), seed=args.teacher_seed, channels=args.teacher_channels,
                layers=args.layers, images=args.images, image_size=args.image_size, class_counts=counts)


# --- the searches --------------------------------------------------------------------------------------------
def search_command(data: str, out: str, variant: str, seed: int, args) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "bin", "train_search.py"), "--dataset", "imagefolder",
            "--data-dir", data, "--image-size", str(args.image_size), "--no-augment",
            "--class-sample-fractions", "0.5", "0.49", "--init-channels", str(args.init_channels),
            "--layers", str(args.layers), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
            "--arch-start-epoch", str(args.arch_start_epoch), "--arch-lr", str(args.arch_lr), "--seed", str(seed),
            "--batched-edges", "--channels-last", "--workers", "0", "--device", "cpu", "--no-progress",
            "--no-tensorboard", "--output-dir", out, "--overwrite", *variant_flags(variant)]


def run_one(data: str, work: str, variant: str, seed: int, args) -> dict:
    """One search, scored (read_run)."""
    out = os.path.join(work, f"{variant.replace(':', '_').replace('=', '_')}-s{seed}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=ROOT)
    t0 = time.perf_counter()
    proc = subprocess.run(search_command(data, out, variant, seed, args), env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"search_quality: {variant} seed {seed} failed (exit {proc.returncode}): " + " | ".join(tail))
    return read_run(out, variant, seed) | dict(seconds=round(seconds, 1))


def read_run(out: str, variant: str, seed: int) -> dict:
    """A finished search's genotype.json and last metrics row, scored; the edges that its report calls undecided
    (tools.report, softmax margin below its default threshold)."""
    from hvd_pcdarts.tools.report import DEFAULT_THRESHOLD, load_run, undecided

    run = load_run(out)
    geno = load_genotype(os.path.join(out, "genotype.json"))
    last = run.rows[-1]
    open_edges = undecided(run, DEFAULT_THRESHOLD)
    return dict(variant=variant, seed=seed, genotype=to_dict(geno), **score(geno),
                normal_undecided=open_edges["normal"][0], reduce_undecided=open_edges["reduce"][0],
                valid_acc=round(float(last["valid_acc"]), 2), epochs_run=int(last["epoch"]) + 1,
                early_stop=run.saved.get("early_stop"), output_dir=out)


def summarize(runs: list[dict], variants: list[str]) -> dict:
    """Per variant and metric: [mean, std over seeds] (std 0 for one seed)."""
    out = {}
    for v in variants:
        rows = [r for r in runs if r["variant"] == v]
        out[v] = {m: [round(statistics.fmean(r[m] for r in rows), 2),
                      round(statistics.stdev(r[m] for r in rows), 2) if len(rows) > 1 else 0.0] for m in METRICS}
    return out


def table(result: dict) -> str:
    head = ("| variant | normal edges (of 8) | normal inputs (of 8) | reduce edges (of 8) | reduce inputs (of 8) "
            "| normal skips | undecided edges normal / reduce | search-valid acc % | epochs run |")
    lines = [head, "|" + "---|" * 9]
    cells = [(m,) for m in METRICS[:5]] + [METRICS[5:7]] + [(m,) for m in METRICS[7:]]
    for v, s in result["summary"].items():
        lines.append(f"| {v} | " + " | ".join(" / ".join(f"{s[m][0]:.2f} ± {s[m][1]:.2f}" for m in ms)
                                              for ms in cells) + " |")
    c = result["chance"]
    lines.append(f"| chance (uniform genotype) | {c['normal']['edges']:.2f} | {c['normal']['inputs']:.2f} | "
                 f"{c['reduce']['edges']:.2f} | {c['reduce']['inputs']:.2f} | {c['normal_skips']:.2f} | | "
                 f"{100 / result['teacher']['classes']:.1f} | |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--variants", nargs="+", default=["plain"], help="plain, skip-cap=N, early-stop=RULE, beta-decay=W")
    a("--seeds", type=int, nargs="+", default=[1, 2, 3], help="search seeds (the planted task stays the same)")
    a("--images", type=int, default=1000, help="labelled images, split per class into weight and arch halves")
    a("--image-size", type=int, default=16)
    a("--classes", type=int, default=4)
    a("--teacher-seed", type=int, default=0)
    a("--teacher-channels", type=int, default=16)
    a("--init-channels", type=int, default=8)
    a("--layers", type=int, default=3, help="of the search network and of the teacher")
    a("--batch-size", type=int, default=64)
    a("--epochs", type=int, default=30)
    a("--arch-start-epoch", type=int, default=6)
    a("--arch-lr", type=float, default=6e-3, help="the ImageNet preset's: the few steps of a small search move "
      "the architecture as far as the CIFAR recipe's 6e-4 does over its ~3,400 steps only if the rate is higher")
    a("--threads", type=int, default=1, help="OMP_NUM_THREADS of each search")
    a("--jobs", type=int, default=2, help="searches at once")
    a("--work-dir", default=None,
      help="keep the images (WORK_DIR/data, replaced) and the runs here (default: a temporary folder)")
    a("--json", default=None, help="write every run and the summary here")
    args = p.parse_args(argv)
    for v in args.variants:
        variant_flags(v)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="search_quality.") as tmp:
        work = args.work_dir or tmp
        data = os.path.join(work, "data")
        teacher = plant(data, args) | dict(classes=args.classes)
        print(f"teacher labels: class counts {teacher['class_counts']}", flush=True)
        jobs = [(v, s) for v in args.variants for s in args.seeds]
        with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
            runs = list(pool.map(lambda vs: run_one(data, work, vs[0], vs[1], args), jobs))
    for r in runs:
        print(f"{r['variant']} seed {r['seed']}: normal {r['normal_edges']}/8 edges ({r['normal_inputs']}/8 inputs), "
              f"reduce {r['reduce_edges']}/8 ({r['reduce_inputs']}/8), {r['normal_skips']} skips, "
              f"{r['normal_undecided']} + {r['reduce_undecided']} undecided, "
              f"valid {r['valid_acc']:.1f}%, {r['epochs_run']} epochs, {r['seconds']:.0f}s", flush=True)
    result = dict(command="python benchmarks/search_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  settings={k: v for k, v in vars(args).items() if k not in ("json", "work_dir")},
                  teacher=teacher, chance=dict(normal=chance(TEACHER.normal), reduce=chance(TEACHER.reduce),
                                               normal_skips=8 / (len(PRIMITIVES) - 1)),
                  runs=runs, summary=summarize(runs, args.variants))
    print(table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
