"""Command-line plumbing shared by the bin/ scripts: error reporting, argument types, presets."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ConsistencyError, DivergenceError, OutputWriteError, Preempted, UsageError


class ArgParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr with exit status 2 (no usage dump)."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


# the exit status of each error that the tools report as one line
EXIT_STATUS = ((UsageError, 2), (ConsistencyError, 1), (OutputWriteError, 1), (DivergenceError, 3), (Preempted, 75))


def run_main(fn, argv=None, prog=None) -> int:
    """Run `fn(argv)`; an error of EXIT_STATUS -> one line on stderr and its status: UsageError 2,
    ConsistencyError and OutputWriteError 1, DivergenceError 3, Preempted 75 (not an error: "requeue me")."""
    prog = prog or os.path.basename(sys.argv[0])
    try:
        rc = fn(argv)
        return int(rc or 0)
    except tuple(t for t, _ in EXIT_STATUS) as e:
        code = next(c for t, c in EXIT_STATUS if isinstance(e, t))
        sys.stderr.write(f"{prog}: {'' if isinstance(e, Preempted) else 'error: '}{e}\n")
        sys.stderr.flush()
        _abort_peers(code)
        return code
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130


def _abort_peers(code: int) -> None:
    """Errors are detected on every rank alike (same arguments, same agreed checks), so plain exit is safe;
    flush and leave without running Horovod's shutdown, which could wait for peers that already left."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- argument types -----------------------------------------------------------------------------------------
def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def nonneg_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def nonneg_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}")
    return v


def fraction(s):
    v = nonneg_float(s)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {s}")
    return v


def add_quick_run_args(parser: argparse.ArgumentParser) -> None:
    """Caps that shorten a run for smoke tests and demos (the recipe's epochs stay whole without them)."""
    g = parser.add_argument_group("quick runs")
    g.add_argument("--steps-per-epoch", type=positive_int, default=None, help="cap an epoch at N training steps")
    g.add_argument("--eval-steps", type=positive_int, default=None,
                   help="cap each evaluation pass at N global batches: the first N x --batch-size images of the "
                        "evaluation set, still each exactly once over all ranks")


def add_output_args(parser: argparse.ArgumentParser, kind: str) -> None:
    """Where a run writes and what it shows while it runs."""
    g = parser.add_argument_group("outputs")
    g.add_argument("--output-dir", default=None, help=f"default runs/{kind}-<time>")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="continue from OUTPUT_DIR/checkpoint.pt (auto) or from PATH")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir (its checkpoints, genotype, metrics, logs and "
                        "pictures are removed first); without it or --resume such a folder is refused")
    shown = g.add_mutually_exclusive_group()
    shown.add_argument("--progress", dest="progress", action="store_true", default=None,
                       help="a progress bar on stderr (default on a terminal; elsewhere, as under launchers, rank 0 "
                            "prints a progress line every 30 s or 10%% of an epoch)")
    shown.add_argument("--no-progress", dest="progress", action="store_false", help="neither bar nor lines")
    g.add_argument("--no-tensorboard", action="store_true")


def eval_count(n: int, batch_size: int, eval_steps: int | None) -> int:
    """How many images of an evaluation set of `n` one pass reads (`--eval-steps`)."""
    return n if not eval_steps else min(n, eval_steps * batch_size)


def apply_preset(parser: argparse.ArgumentParser, argv, presets: dict):
    """Parse with the chosen preset's values as defaults: explicit flags always win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.preset is not None:
        if known.preset not in presets:
            parser.error(f"argument --preset: unknown preset {known.preset!r} (choose from {', '.join(presets)})")
        parser.set_defaults(**presets[known.preset])
    return parser.parse_args(argv)
