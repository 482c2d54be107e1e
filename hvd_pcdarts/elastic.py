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

import torch

from . import distributed as dist
from .checkpoint import atomic_save
from .errors import OutputWriteError, Preempted, UsageError
from .preemption import StopSignals
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
    `local_batch`, `elastic`, `model`, `_stateful()` (model, optimizers, scaler: what an elastic state commits),
    `_checkpoint(st)` (checkpoint.pt's content), `_build_loaders()` (what depends on the number of ranks),
    `_checked_tensors()` (what must be identical on every rank, besides the BN statistics), `_output_args()`
    (args.json content), `_start_line()` (the first log line) and `_epochs(st)` (the epochs from st.epoch on).

    Position within an epoch: `st.step` steps done, `st.pos` global samples read, `st.sums` the metric sums and
    `st.train_time` the seconds so far (summed over ranks). A checkpoint written by a stop signal holds them, and
    each rank's BN statistics, so that a resume continues at that step exactly."""

    def _counters(self) -> dict:
        fresh = dict(step=0, pos=0, sums=[0.0, 0.0, 0.0, 0.0], train_time=0.0)
        return fresh | self.start | dict(resets=0, steps_redone=0)

    def run(self):
        a = self.args
        self.live_steps, self.out = None, None
        if not self.elastic:
            check_writable(a.output_dir)
            st = LocalState(**self._counters())
            with StopSignals(raise_at=a.raise_signal) as self.stops:
                self._begin(st)
                return self._epochs(st)
        self.stops = StopSignals(enabled=False)  # elastic: a worker that is stopped is a lost worker
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
            if st.step:
                out.info(f"resumed from {self.resumed_from} at epoch {st.epoch + 1} step {st.step}")
            elif st.epoch:
                out.info(f"resumed from {self.resumed_from} at epoch {st.epoch}")
        # a checkpoint of a stop mid-epoch gave each rank its own BN statistics: equal again at the epoch's end
        self._consistency("elastic reset" if st.resets else "start", bn_stats=self._own_buffers is None)

    def _resume(self) -> None:
        """--resume auto|PATH: load the checkpoint into the model and optimizers and set `self.start`
        (subclasses: `_read_checkpoint(path)` validates, `_load(ckpt, path)` applies)."""
        a = self.args
        path, self._own_buffers = None, None
        if a.resume == "auto":
            cand = os.path.join(a.output_dir, "checkpoint.pt")
            path = cand if os.path.exists(cand) else None
        elif a.resume is not None:
            path = a.resume
        if self.elastic:
            # every rank reads the checkpoint itself (shared run folder), no collective; the elastic sync then
            # makes every rank equal to rank 0's copy
            if path is not None:
                self._load_all(self._read_checkpoint(path), path)
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
            self._load_all(dist.broadcast_object(ckpt, name="resume_ckpt"), path)

    def _load_all(self, ckpt: dict, path: str) -> None:
        """The subclass's `_load`, then the position within the epoch and this rank's own BN statistics (kept
        for `_sync_start`; with another number of ranks than at the stop, rank 0's serve all)."""
        self._load(ckpt, path)
        self.start |= {k: ckpt[k] for k in ("step", "pos", "sums", "train_time") if k in ckpt}
        saved = ckpt.get("rank_buffers")
        same_ranks = saved and len(saved) == self.world and not self.elastic  # elastic: rank 0's state serves all
        self._own_buffers = saved[self.rank] if same_ranks else None

    def _sync_start(self) -> None:
        """Identical start on every rank: weights, architecture parameters, BN statistics and optimizer states
        from rank 0; after a stop mid-epoch, each rank's own BN statistics (they differ between ranks until
        the epoch's end averages them)."""
        for name, obj in self._stateful().items():
            if isinstance(obj, torch.nn.Module):
                dist.broadcast_parameters(obj, 0)
            elif hasattr(obj, "param_groups"):
                dist.broadcast_optimizer(obj, 0, name=name)
        if self._own_buffers is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._rank_buffers(), self._own_buffers)

    def _consistency(self, where: str, bn_stats: bool = True) -> dict:
        """Cross-rank checksums of `_checked_tensors()` and the BN statistics: a ConsistencyError if ranks differ."""
        named = self._checked_tensors() | ({"bn_stats": self._rank_buffers()} if bn_stats else {})
        return dist.check_consistency(named, where)

    def _rank_buffers(self) -> list:
        return [b for b in self.model.buffers() if b.is_floating_point()]

    def _save(self, st, rank_buffers=None) -> None:
        """Rank 0: checkpoint.pt (atomically) with the position within the epoch."""
        ckpt = self._checkpoint(st) | dict(step=st.step, pos=st.pos, sums=list(st.sums), train_time=st.train_time)
        if rank_buffers is not None:
            ckpt["rank_buffers"] = rank_buffers
        atomic_save(ckpt, os.path.join(self.args.output_dir, "checkpoint.pt"))

    def _stop_due(self, st) -> bool:
        """After a step or an epoch's end: whether any rank received a stop signal (the same on every rank)."""
        self.stop_signal = self.stops.agreed(st.global_step)
        return self.stop_signal is not None

    def _stop(self, st):
        """Every rank, once `_stop_due`: rank 0 writes checkpoint.pt at this step, with each rank's BN statistics;
        the run ends with `stopped by SIG... at epoch E step S` (Preempted, exit status 75)."""
        buffers = dist.allgather_object([b.detach().cpu().clone() for b in self._rank_buffers()])
        self._write_outputs(self._save, st, buffers)
        where = f"at epoch {st.epoch + 1} step {st.step}" if st.step else f"after epoch {st.epoch}"
        msg = f"stopped by {self.stop_signal} {where}: checkpoint.pt written; continue with --resume auto"
        self.out.info(msg)
        self.out.close()
        raise Preempted(msg)

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
