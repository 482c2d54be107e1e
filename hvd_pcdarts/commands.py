"""The command-line programs: `pip install` puts them on PATH as hvd-pcdarts-<name> (pyproject's
[project.scripts]); bin/<script>.py calls the same function. Each returns the exit status: 0 done, 1 a problem
found, 2 bad command line or input (one line on stderr)."""

from __future__ import annotations

import argparse
import sys

from .cli import ArgParser, nonneg_int, run_main
from .errors import UsageError


def search(argv=None) -> int:
    """hvd-pcdarts-search (bin/train_search.py): the distributed PC-DARTS search."""
    from .search import main

    return run_main(main, argv)


def train(argv=None) -> int:
    """hvd-pcdarts-train (bin/train.py): retraining of a searched cell."""
    from .train import main

    return run_main(main, argv)


def evaluate(argv=None) -> int:
    """hvd-pcdarts-evaluate (bin/evaluate.py): a retrained checkpoint on the test split."""
    from .tools.evaluate import main

    return run_main(main, argv)


def export(argv=None) -> int:
    """hvd-pcdarts-export (bin/export.py): a retrained checkpoint to ONNX or TorchScript, checked."""
    from .tools.export import main

    return run_main(main, argv)


class _RootParser(ArgParser):
    """One-line usage errors printed by the launcher's rank 0 only (every rank exits 2)."""

    def error(self, message):
        from .tools.doctor import launcher_rank

        if launcher_rank() == 0:
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


DOCTOR_HELP = """Cluster doctor: run it with the real job's launcher before a long search or retraining.

  mpirun -np 4 -H node0:2,node1:2 -bind-to none -map-by slot -x PATH -x LD_LIBRARY_PATH \\
      hvd-pcdarts-doctor --dataset cifar10 --data-dir data --output-dir runs
  horovodrun --gloo -np 2 -H localhost:2 python bin/doctor.py --dataset digits

Rank 0 prints a table (one row per rank) and one line per inconsistency. Exit status, the same on every rank:
0 = consistent, 1 = a problem was found, 2 = bad command line.
"""


def doctor(argv=None) -> int:
    """hvd-pcdarts-doctor (bin/doctor.py): checks every rank of a launch before the real job."""
    from .tools import doctor as checks

    p = _RootParser(prog="doctor.py", description=DOCTOR_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=checks.DATASETS, help="dataset the job will use")
    p.add_argument("--data-dir", default="data", help="dataset folder, as the job will see it on every node")
    p.add_argument("--output-dir", default="runs",
                   help="the job's output folder: its free space is reported (nothing is created)")
    p.add_argument("--json", metavar="PATH", help="also write the gathered table as JSON (rank 0)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds the allreduce check may take (default 60); the whole check gives up "
                        "after 3x this + 30 s")
    p.add_argument("--min-free-gb", type=float, default=1.0,
                   help="report a problem when less space is free for --output-dir (default 1 GB)")
    p.add_argument("--scan-data", action="store_true",
                   help="imagefolder: read and decode every image of DATA_DIR/train and DATA_DIR/val, split over "
                        "the ranks, and list each unreadable file as a problem (before a long job)")
    p.add_argument("--simulate-missing-data-on-rank", type=int, metavar="R",
                   help=f"testing aid: rank R reports the dataset as missing, to exercise the failure path "
                        f"(same as env {checks.FAKE_MISSING_ENV}=R)")
    args = p.parse_args(argv)
    try:
        return checks.run(args)
    except UsageError as e:
        if checks.launcher_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2


def plot_search(argv=None) -> int:
    """hvd-pcdarts-plot-search (bin/plot_search.py): how a search's architecture weights evolved."""
    p = ArgParser(prog="plot_search.py", description="Plot how a search's architecture weights evolved "
                  "(softmax(alpha) per edge, edge-normalized betas, accuracy).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of bin/train_search.py (has metrics.jsonl)")
    p.add_argument("--out", metavar="PATH", help="picture to write: .png, .svg or .pdf "
                                                 "(default RUN_DIR/arch_weights.png)")
    args = p.parse_args(argv)
    from .tools.plots import plot_search as plot

    try:
        path = plot(args.run_dir, args.out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def visualize(argv=None) -> int:
    """hvd-pcdarts-visualize (bin/visualize.py): a genotype's cells as pictures."""
    p = ArgParser(prog="visualize.py", description="Draw a genotype's normal and reduction cells to "
                  "DIR/{normal,reduction}.{png,svg} (needs graphviz's `dot`).")
    p.add_argument("genotype", help="a genotype.json written by a search, a genotype JSON file, or a published "
                                    "name (PCDARTS, PC_DARTS_cifar, PC_DARTS_image)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures (created if needed)")
    args = p.parse_args(argv)
    from .tools.visualize import render_genotype

    try:
        paths = render_genotype(args.genotype, args.out, strict=True)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def derive(argv=None) -> int:
    """hvd-pcdarts-derive (bin/derive.py): a genotype derived again from a search's saved alphas and betas."""
    p = ArgParser(prog="derive.py", description="Derive the cells again from the alphas and betas a search saved in "
                  "its genotype.json, with another rule; writes a genotype.json that bin/train.py --genotype reads.")
    p.add_argument("genotype", metavar="GENOTYPE_JSON", help="genotype.json written by bin/train_search.py")
    p.add_argument("--skip-cap", type=nonneg_int, default=None, metavar="N",
                   help="P-DARTS: the normal cell keeps at most N skip_connect, the strongest; the other edges take "
                        "their next-best operation")
    p.add_argument("--out", required=True, metavar="PATH", help="the genotype.json to write")
    args = p.parse_args(argv)
    from .space.derive import derive_file

    try:
        geno = derive_file(args.genotype, args.out, args.skip_cap)
    except UsageError as e:
        print(f"derive.py: error: {e}", file=sys.stderr)
        return 2
    print(f"genotype: {geno}")
    print(args.out)
    return 0


def report(argv=None) -> int:
    """hvd-pcdarts-report (bin/report.py): how decided a search's result is, as RUN_DIR/report.md."""
    from .cli import fraction
    from .tools.report import DEFAULT_THRESHOLD, final_line, load_run, write_report

    p = ArgParser(prog="report.py", description="Write RUN_DIR/report.md and RUN_DIR/report/*.png: when each edge of "
                  "the searched genotype settled, the softmax margins of every edge with the undecided ones flagged, "
                  "the architecture weights of the result's edges, the cells.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of bin/train_search.py (metrics.jsonl, "
                                                      "genotype.json)")
    p.add_argument("--margin-threshold", type=fraction, default=DEFAULT_THRESHOLD, metavar="T",
                   help="an edge is undecided when the top two entries of its softmax(alpha) differ by less than T "
                        "(default %(default)s)")
    args = p.parse_args(argv)
    try:
        run = load_run(args.run_dir)
        path = write_report(args.run_dir, args.margin_threshold, run)
    except UsageError as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 2
    print(final_line(run, args.margin_threshold, path))
    return 0
