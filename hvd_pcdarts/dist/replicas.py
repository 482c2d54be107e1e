"""Seed ensembles in one launch (`train_search.py --replicas R`): R independent searches on disjoint groups of
W/R ranks (Horovod process sets, dist.horovod), and their consensus.

Replica r runs the whole search with seed `--seed + r` (or the r-th of `--seeds`) in RUN/replica-<r>/, exactly
what a single search writes there (RUN: --output-dir). Every collective of a replica stays within its group, so
replica r of a run equals a search of its seed alone on W/R ranks. Once every replica has finished, rank 0 of
the job writes RUN/consensus.json (the majority cell, consensus.py) and RUN/log.txt (its summary).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from . import horovod as dist
from ..errors import DivergenceError, OutputWriteError, Preempted, UsageError

CONSENSUS_FILE = "consensus.json"


def seed_list(text: str) -> list[int]:
    """`3,4,5` as [3, 4, 5] (non-negative integers)."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    return seeds


def add_replica_args(group) -> None:
    from ..cli import positive_int

    a = group.add_argument
    a("--replicas", type=positive_int, default=1, metavar="R",
      help="run R independent searches at once, each on W/R of the W ranks (Horovod process sets), with seeds "
           "--seed+r (or --seeds) in OUTPUT_DIR/replica-<r>/; then OUTPUT_DIR/consensus.json holds their majority "
           "cell; --batch-size is the global batch of one search")
    a("--seeds", type=seed_list, default=None, metavar="S0,S1,...", help="the seed of each replica (R of them)")


def check_replica_args(args) -> None:
    """The flags that --replicas excludes or constrains (one line, exit 2)."""
    n = args.replicas
    if args.seeds is not None and len(args.seeds) != n:
        raise UsageError(f"--seeds gives {len(args.seeds)} seed(s) for --replicas {n}: give exactly one per replica")
    if args.seeds is not None and len(set(args.seeds)) != n:
        raise UsageError(f"--seeds {','.join(map(str, args.seeds))} repeats a seed: the replicas would be the same")
    if n == 1:
        return
    if args.elastic or dist.elastic_enabled():
        raise UsageError(f"--replicas {n} cannot run under Horovod Elastic (a resized job re-forms its ranks, not "
                         f"the replicas' process sets): launch with -np/-H and drop --elastic")
    if args.resume not in (None, "auto"):
        raise UsageError(f"--resume {args.resume} with --replicas {n}: use --resume auto (each replica continues "
                         f"from OUTPUT_DIR/replica-<r>/checkpoint.pt)")


def seeds_of(args) -> list[int]:
    return list(args.seeds) if args.seeds is not None else [args.seed + r for r in range(args.replicas)]


def assign(args, out_name: str) -> None:
    """After dist.init(replicas=R), on every rank: this rank's replica gets its seed and its folder
    RUN/replica-<r> (args.seed, args.output_dir; args.run_dir = RUN). Nothing without replicas."""
    from ..runtime import default_output_dir

    index, count = dist.replica()
    if count == 1:
        return
    with dist.whole_job():
        run_dir = args.output_dir or default_output_dir(out_name)
        _check_run_dir(run_dir, count, args.resume, args.overwrite)
    args.run_dir, args.replica = run_dir, index
    args.seed = seeds_of(args)[index]
    args.output_dir = os.path.join(run_dir, f"replica-{index}")


def _check_run_dir(run_dir: str, count: int, resume, overwrite: bool) -> None:
    """Rank 0 of the job: refuse RUN when any replica folder holds a run (unless resumed or overwritten), so that
    every replica starts or none; --overwrite removes the consensus of the run replaced."""
    from ..runtime import run_in

    err = None
    if dist.is_root() and resume is None:
        held = [f"replica-{r}" for r in range(count) if run_in(os.path.join(run_dir, f"replica-{r}"))]
        if held and not overwrite:
            err = (f"--output-dir {run_dir} already holds a run ({', '.join(held)}): continue it with --resume auto, "
                   f"replace it with --overwrite, or choose another --output-dir")
        elif held:
            for name in (CONSENSUS_FILE, "log.txt"):
                if os.path.isfile(os.path.join(run_dir, name)):
                    os.unlink(os.path.join(run_dir, name))
    err = dist.broadcast_object(err, name="run_dir_claim")
    if err:
        raise UsageError(err)


def run(args, search) -> int:
    """`search()` (one replica's whole search; its exit status), then, with replicas, the consensus: every rank
    of the job waits until every replica has finished, stopped (Preempted) or diverged."""
    if args.replicas == 1:
        return search()
    outcome, status = None, 0
    try:
        status = search()
    except Preempted as e:
        outcome = ("stopped", str(e))
    except DivergenceError as e:
        outcome = ("diverged", str(e))
    with dist.whole_job():
        mine = _result(args, outcome) if dist.replica_root() else None
        results = sorted((r for r in dist.allgather_object(mine, name="replica_results") if r),
                         key=lambda r: r["replica"])
        err = _write_consensus(args, results) if dist.is_root() else None
        err = dist.broadcast_object(err, name="consensus_written")
    if err:
        raise OutputWriteError(err)
    return _verdict(results, status)


def _verdict(results: list[dict], status: int) -> int:
    """Every rank's exit: 75 if a replica stopped (the job is requeued; finished ones resume at their end), 3 if
    a replica diverged (the consensus holds the others), else the search's status."""
    stopped = [r["replica"] for r in results if r.get("stopped")]
    if stopped:
        raise Preempted(f"replica(s) {', '.join(map(str, stopped))} stopped by a signal, their checkpoints written; "
                        f"continue every replica with --resume auto")
    diverged = [r for r in results if r.get("diverged")]
    if diverged:
        raise DivergenceError(f"replica(s) {', '.join(str(r['replica']) for r in diverged)} diverged "
                              f"({diverged[0]['diverged']}); {CONSENSUS_FILE} holds the other replicas")
    return status


def _result(args, outcome) -> dict:
    """The replica's root: its seed, final search-valid accuracy and genotype, from the files it wrote (read as
    the search report reads them)."""
    from ..runtime import jsonable
    from ..tools.report import load_run

    res = dict(replica=args.replica, seed=args.seed, output_dir=os.path.basename(args.output_dir))
    if outcome is not None:
        return res | {outcome[0]: outcome[1]}
    run = load_run(args.output_dir)
    last = run.rows[-1]
    return res | jsonable(dict(valid_acc=last.get("valid_acc"), epochs=last["epoch"] + 1,
                               genotype=run.saved["genotype"], early_stop=run.saved.get("early_stop")))


def _write_consensus(args, results: list[dict]) -> str | None:
    """Rank 0 of the job: RUN/consensus.json and RUN/log.txt (also on stdout), atomically; the error or None."""
    from ..checkpoint import atomic_write_text
    from ..consensus import RULE, consensus
    from ..space.genotypes import from_dict

    done = [r for r in results if "genotype" in r]
    if not done or len(done) + sum(1 for r in results if r.get("diverged")) < len(results):
        return None  # a replica stopped: the consensus waits for the resumed run
    c = consensus([r["genotype"] for r in done])
    for r, share in zip(done, c["replica_agreement"]):
        r["agreement"] = share
    doc = dict(genotype=c["genotype"], agreement=c["agreement"], replicas=results, votes=c["votes"],
               edge_votes=c["edges"], unanimous_edges=c["unanimous_edges"], rule=RULE,
               best_replica=max(done, key=lambda r: r["valid_acc"] or 0.0)["replica"])
    lines = _summary(doc, done, from_dict(c["genotype"]), args.run_dir)
    try:
        atomic_write_text(os.path.join(args.run_dir, CONSENSUS_FILE), json.dumps(doc, indent=2) + "\n")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        atomic_write_text(os.path.join(args.run_dir, "log.txt"), "".join(f"{stamp} {x}\n" for x in lines))
    except OSError as e:
        return f"cannot write {CONSENSUS_FILE} in {args.run_dir} ({e.strerror or e})"
    for x in lines:
        print(x, flush=True)
    return None


def _summary(doc: dict, done: list[dict], genotype, run_dir: str) -> list[str]:
    n_edges = len(doc["edge_votes"]["normal"]) + len(doc["edge_votes"]["reduce"])
    lines = [f"consensus of {len(done)} replica(s): agreement {doc['agreement']:.3f} (share of the majority cell's "
             f"edges a replica chose, averaged), {doc['unanimous_edges']}/{n_edges} edges unanimous"]
    for r in doc["replicas"]:
        if "genotype" in r:
            lines.append(f"replica {r['replica']} (seed {r['seed']}): search-valid acc {r['valid_acc']:.2f} after "
                         f"{r['epochs']} epoch(s), agreement {r['agreement']:.3f}")
        else:
            lines.append(f"replica {r['replica']} (seed {r['seed']}): diverged, left out")
    lines += [f"majority cell: {genotype}", f"wrote {os.path.join(run_dir, CONSENSUS_FILE)}"]
    return lines
