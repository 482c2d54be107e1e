"""What the search and the retraining share for fault tolerance: the run state both loops advance, the
`--elastic` flags, and the bookkeeping after a reset (per-rank batch, output writer following rank 0, steps
redone).

The loops advance one state object: in a normal run a `LocalState` (commit does nothing; checkpoints at
epoch ends give exact resume), under `--elastic` a Horovod elastic state (distributed.elastic_state) that
commits to host memory every `--commit-interval` steps and at each epoch end. Horovod itself is only touched
through `distributed`.
"""

from __future__ import annotations

import os

from . import distributed as dist
from .errors import OutputWriteError, UsageError
from .runtime import RunOutput, check_writable, claim_output_dir, writable_error


class LocalState:
    """Stand-in for the elastic state in a normal run: the same counters as attributes, nothing to commit."""

    def __init__(self, **counters):
        self.__dict__.update(counters)

    def commit(self) -> None:
        pass


def add_elastic_args(parser) -> None:
    from .cli import positive_int

    parser.add_argument("--elastic", action="store_true",
                        help="Horovod Elastic: survive lost workers and take in new ones (launch with horovodrun "
                             "--min-np/--max-np --host-discovery-script; needs --output-dir on a shared file system)")
    parser.add_argument("--commit-interval", type=positive_int, default=20,
                        help="elastic: commit the state to host memory every N steps (and at each epoch end); "
                             "a lost worker costs at most N steps")


def check_elastic_args(args) -> None:
    launched = dist.elastic_enabled()
    if args.elastic and not launched:
        raise UsageError("--elastic needs an elastic launch: horovodrun -np N --min-np M --max-np X "
                         "--host-discovery-script hostfiles/discover_hosts.sh python ... --elastic")
    if launched and not args.elastic:
        raise UsageError("this job was launched in Horovod elastic mode (--min-np/--max-np/--host-discovery-script) "
                         "but --elastic is not set: add --elastic, or launch with -np/-H only")
    if args.elastic and args.output_dir is None:
        raise UsageError("--elastic needs --output-dir (every worker, also one that joins later, must find the "
                         "same run folder)")


def per_rank_batch(global_batch: int, world: int, strict: bool = False) -> tuple[int, str | None]:
    """(per-rank batch, warning or None) for a global batch over `world` ranks. `strict` (the start of a run):
    the global batch must divide evenly; after an elastic resize a remainder is dropped, with a warning."""
    if global_batch < world:
        raise UsageError(f"--batch-size {global_batch} is smaller than the number of ranks ({world}): every rank "
                         f"needs at least one sample; use a batch of at least {world}")
    if global_batch % world == 0:
        return global_batch // world, None
    if strict:
        raise UsageError(f"--batch-size {global_batch} does not divide by the {world} ranks: use a multiple of "
                         f"{world}")
    lb = global_batch // world
    return lb, (f"global batch {global_batch} does not divide by {world} ranks: using {lb} per rank "
                f"(global {lb * world}) until the world changes again")


def local_checks_only() -> dict:
    """load_dataset arguments for an elastic run: no barrier/agreement collectives before the elastic loop (a
    worker that joins later would meet them alone and hang)."""
    return dict(is_local_root=True, barrier=lambda: None, agree=lambda ok: ok)


def check_writable_locally(out_dir: str) -> None:
    """check_writable without a collective (elastic): every rank proves it could write the run folder, since
    any of them may become rank 0."""
    err = writable_error(out_dir)
    if err:
        raise UsageError(err)


class RunLoop:
    """The epoch loop's frame shared by the search and the retraining, normal or elastic.

    A subclass provides: `args`, `start` (counters at the start: epoch, global_step, ...), `world`, `rank`,
    `local_batch`, `elastic`, `_stateful()` (what an elastic state commits), `_build_loaders()` (what depends on
    the number of ranks), `_consistency(where)` (cross-rank checksums), `_output_args()` (args.json content),
    `_start_line()` (the first log line) and `_epochs(st)` (the epochs from st.epoch on)."""

    def _counters(self) -> dict:
        return dict(**self.start, step=0, pos=0, sums=[0.0, 0.0, 0.0, 0.0], train_time=0.0, resets=0,
                    steps_redone=0)

    def run(self):
        a = self.args
        self.live_steps, self.out = None, None
        if not self.elastic:
            check_writable(a.output_dir)
            st = LocalState(**self._counters())
            self._begin(st)
            return self._epochs(st)
        check_writable_locally(a.output_dir)
        st = dist.elastic_state(self._stateful(), **self._counters())
        st.register_reset_callbacks([lambda: self._on_reset(st)])

        @dist.elastic_run
        def loop(st):
            st.ensure_synced()
            self._begin(st)
            return self._epochs(st)

        return loop(st)

    def _on_reset(self, st):
        """Elastic reset (a worker was lost or added; the state is back at its last commit on survivors): count
        the steps that will be redone, then rebuild everything that depends on the number of ranks."""
        if self.live_steps is not None:
            st.steps_redone += max(0, self.live_steps - st.global_step)
        st.resets += 1
        self.world, self.rank = dist.size(), dist.rank()
        self.local_batch, self.batch_warning = per_rank_batch(self.args.batch_size, self.world)
        self._build_loaders()

    def _begin(self, st):
        """Start of the loop, and again after every elastic reset once the state is synced from rank 0."""
        a = self.args
        self.live_steps = st.global_step
        # the first start of the job (a worker joining an elastic run later finds the run's own files there)
        removed = claim_output_dir(a.output_dir, a.resume, a.overwrite) if not st.resets else []
        if self.out is not None:
            self.out.close()
        # rank 0 writes the outputs (after a reset maybe another process than before); metrics.jsonl keeps
        # exactly the epochs before the one in progress, so an epoch redone after a reset appears once
        self.out = out = RunOutput(a.output_dir, self._output_args(), resume_epoch=st.epoch,
                                   tensorboard=not a.no_tensorboard)
        if st.resets:
            out.info(f"elastic reset {st.resets}: {self.world} rank(s) now, {self.local_batch}/rank; continuing "
                     f"at epoch {st.epoch + 1} step {st.step} (last commit); {st.steps_redone} step(s) redone "
                     f"so far")
            if getattr(self, "batch_warning", None):
                out.info(f"warning: {self.batch_warning}")
        else:
            out.info(self._start_line() + (f", elastic (commit every {a.commit_interval} steps)"
                                           if self.elastic else ""))
            if removed:
                out.info(f"--overwrite: replaced the earlier run in {a.output_dir} (removed {', '.join(removed)})")
            if st.epoch:
                out.info(f"resumed from {self.resumed_from} at epoch {st.epoch}")
        self._consistency("elastic reset" if st.resets else "start")

    def _resume(self) -> None:
        """--resume auto|PATH: load the checkpoint into the model and optimizers and set `self.start`
        (subclasses: `_read_checkpoint(path)` validates, `_load(ckpt, path)` applies)."""
        a = self.args
        path = None
        if a.resume == "auto":
            cand = os.path.join(a.output_dir, "checkpoint.pt")
            path = cand if os.path.exists(cand) else None
        elif a.resume is not None:
            path = a.resume
        if self.elastic:
            # every rank reads the checkpoint itself (shared run folder), no collective; the elastic sync then
            # makes every rank equal to rank 0's copy
            if path is not None:
                self._load(self._read_checkpoint(path), path)
            return
        ckpt, err = None, None
        if path is not None and dist.is_root():
            try:
                ckpt = self._read_checkpoint(path)
            except UsageError as e:
                err, ckpt = str(e), None
        err = dist.broadcast_object(err, name="resume_err")
        if err:
            raise UsageError(err)
        if dist.broadcast_object(path is not None, name="resume_found"):
            self._load(dist.broadcast_object(ckpt, name="resume_ckpt"), path)

    def _write_outputs(self, write, *args) -> None:
        """Rank 0 calls `write(*args)` (an epoch's metrics, genotype, checkpoints; each file atomically); when
        a write fails (disk full, ...) every rank stops with the same line, the previous checkpoint intact."""
        err = None
        if dist.is_root():
            try:
                write(*args)
            except OSError as e:
                err = (f"cannot write the run's outputs in {self.args.output_dir} ({e.strerror or e}); the last "
                       f"checkpoint written before is intact: make room, then continue with --resume auto")
        err = dist.broadcast_object(err, name="outputs_written")
        if err:
            raise OutputWriteError(err)

    def _commit_due(self, st) -> bool:
        return self.elastic and st.step % self.args.commit_interval == 0 and st.step < self.steps_per_epoch

    def _flush(self, st, sums, seconds):
        """Add this stretch's metric sums (summed over ranks) to the state's; identical on every rank."""
        total = dist.sum_metrics(list(sums), "train_m")
        st.sums = [u + v for u, v in zip(st.sums, total)]
        st.train_time += seconds
        return [0.0] * len(sums)
