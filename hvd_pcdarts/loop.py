"""The loop of every run, shared by the search (`search.Searcher`) and the retraining (`train.Trainer`): the
setup both share, the epochs, the bookkeeping after each step, resume, the identical start on every rank,
checkpoints, consistency checks, stop signals and elastic resets.

The loops advance one state object: in a normal run a `LocalState` (commit does nothing; checkpoints at epoch
ends give exact resume), under `--elastic` a Horovod elastic state (dist.elastic_state) that commits to
host memory every `--commit-interval` steps and at each epoch end.
"""

from __future__ import annotations

import math
import os
import time

import torch

from . import fastpath
from .checkpoint import atomic_save, check_config, load_checkpoint
from .data import GlobalBatchSampler, make_batch_loader
from .dist import gradients, replicas
from .dist import horovod as dist
from .dist.elastic import LocalState, check_writable_locally, local_checks_only, per_rank_batch
from .dist.preemption import StopSignals
from .dist.syncbn import convert_sync_batchnorm
from .errors import OutputWriteError, Preempted, UsageError
from .runtime import (
    Progress,
    RunOutput,
    check_finite,
    check_writable,
    claim_output_dir,
    default_output_dir,
    lr_at,
    pick_device,
    progress_mode,
)


class RunLoop:
    """The loop's frame shared by the search and the retraining, normal or elastic.

    A subclass calls `_setup(args, kind, out_name)` first and `_start()` once its model, step and data are built, and
    provides: `model`, `w_opt` (the weight optimizer), `start` (counters at the start: epoch, global_step, ...),
    `CHECKPOINT_FORMAT`, `_config()` (what a checkpoint must match), `_load(ckpt, path)`, `_stateful()` (model,
    optimizers, scaler: what an elastic state commits), `_checkpoint(st)` (checkpoint.pt's content),
    `_build_loaders()` (what depends on the number of ranks), `_checked_tensors()` (what must be identical on
    every rank, besides the BN statistics), `_output_args()` (args.json content), `_start_line()` (the first log
    line), `train_epoch(st)`, `_end_epoch(st, epoch, lr, seconds)` (evaluation and the metrics row),
    `_epoch_line(rec)`, `_write_epoch(out, rec, st)` and `_finish(st, checksums)` (the last log lines).

    Position within an epoch: `st.step` steps done, `st.pos` global samples read, `st.sums` the metric sums and
    `st.train_time` the seconds so far (summed over ranks). A checkpoint written by a stop signal holds them, and
    each rank's BN statistics, so that a resume continues at that step exactly."""

    # --- setup ----------------------------------------------------------------------------------------------
    def _setup(self, args, kind: str, out_name: str) -> None:
        """What both runs do first: Horovod, ranks, per-rank batch, device, precision, output folder. `kind`:
        the run's name in messages ("search", "training"); `out_name`: the default folder's (runs/<out_name>-<time>)."""
        self.args = a = args
        self.kind = kind
        dist.init(cpu_tuning=not a.sync_bn, replicas=getattr(a, "replicas", 1))
        replicas.assign(a, out_name)  # --replicas: this rank's replica, its seed and folder
        self.world, self.rank = dist.size(), dist.rank()
        self.local_batch, _ = per_rank_batch(a.batch_size, self.world, strict=True)
        if a.amp and a.bf16:
            raise UsageError("--amp (float16 with loss scaling) and --bf16 exclude each other: pick one")
        for flag in ("amp", "bf16"):
            if getattr(a, "fp64", False) and getattr(a, flag):
                raise UsageError(f"--fp64 and --{flag} exclude each other")
        self.device = pick_device(a)
        fastpath.check_fast_flags(a, self.device, self.world)
        self.autocast_dtype = torch.bfloat16 if a.bf16 else torch.float16 if a.amp else None
        self.scaler = torch.amp.GradScaler("cuda") if a.amp else None
        if a.output_dir is None:
            a.output_dir = default_output_dir(out_name)
        # elastic: no collective before the elastic loop (a worker joining later would meet it alone); the
        # loop's first sync makes every rank equal to rank 0
        self.elastic = bool(a.elastic)

    def _data_sync(self) -> dict:
        """load_dataset's arguments for checks across ranks (one download per node, the same data everywhere; with
        --replicas over every replica's ranks, which all load their data at once)."""
        if self.elastic:
            return local_checks_only()
        return dict(is_local_root=dist.local_rank() == 0, barrier=dist.job_wide(dist.barrier),
                    agree=dist.job_wide(lambda ok: all(dist.allgather_object(bool(ok)))))

    def _fast_model(self, compile_fn) -> None:
        """Synchronized BN, channels-last and torch.compile (`compile_fn(model, backend)`) as the flags ask."""
        a = self.args
        if a.sync_bn and self.world > 1:
            convert_sync_batchnorm(self.model)
        if a.channels_last:
            fastpath.to_channels_last(self.model)
        if a.compile:
            compile_fn(self.model, backend=a.compile_backend)

    def _weight_optimizer(self, opt, named_parameters, name: str):
        """`hvd.DistributedOptimizer` (gradients.weight_optimizer); under --cuda-graph the plain optimizer:
        the graphed steps average the gradients themselves, since hooks do not replay in a graph."""
        a = self.args
        mode = gradients.grad_allreduce_mode(a.grad_allreduce, self.device)
        self.grad_allreduce = "graphed" if a.cuda_graph else mode
        if a.cuda_graph:
            return opt
        return gradients.weight_optimizer(opt, named_parameters, self.grad_allreduce, a.fp16_allreduce, name=name)

    def _start(self) -> None:
        """Resume, the identical start on every rank (elastic runs: the loop's first sync), the loaders."""
        self._resume()
        if not self.elastic:
            self._sync_start()
        self._build_loaders()

    def _batches(self, dataset, seed: int, epoch: int, start: int, device_images=None):
        """Loader of the global batches of one pass from global sample position `start` (GlobalBatchSampler:
        the same global batches for any number of ranks, resumable anywhere)."""
        sampler = GlobalBatchSampler(len(dataset), seed, epoch, self.world, self.rank, self.local_batch, start)
        if device_images is not None:
            return fastpath.DeviceLoader(device_images, batch_sampler=sampler)
        return make_batch_loader(dataset, sampler, self.args.workers, self.device.type == "cuda")

    def _steps_per_epoch(self, n: int) -> int:
        cap = self.args.steps_per_epoch
        steps = n // (self.local_batch * self.world)
        return min(steps, cap) if cap else steps

    def set_lr(self, epoch_pos: float) -> float:
        a = self.args
        lr = lr_at(epoch_pos, a.lr, a.lr_min, a.epochs, a.warmup_epochs, a.lr_schedule)
        for g in self.w_opt.param_groups:
            g["lr"] = lr
        return lr

    def _read_checkpoint(self, path: str) -> dict:
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != self.CHECKPOINT_FORMAT:
            raise UsageError(f"checkpoint {path} is not a {self.kind} checkpoint ({ckpt.get('format')!r})")
        check_config(ckpt["config"], self._config(), path)
        if ckpt["epoch"] > self.args.epochs:
            raise UsageError(f"checkpoint {path} is at epoch {ckpt['epoch']}, past --epochs {self.args.epochs}")
        return ckpt

    # --- the run --------------------------------------------------------------------------------------------
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

    # --- steps and epochs -----------------------------------------------------------------------------------
    def _progress(self, st) -> Progress:
        return Progress(progress_mode(self.args.progress), st.epoch, self.args.epochs, self.steps_per_epoch, st.step)

    def _step_done(self, st, progress, loss: float, images: int, lr: float) -> None:
        """Bookkeeping after every training step: position, progress, elastic commits, stop signals."""
        st.step += 1
        st.pos += self.local_batch * self.world
        st.global_step += 1
        self.live_steps += 1
        progress.update(loss, images, lr)
        if self._commit_due(st):
            self._flush(st)
            st.commit()
        if self._stop_due(st):
            self._flush(st)
            self._stop(st)

    def _epochs(self, st):
        """The epochs from st.epoch on, then the run's last checks and lines."""
        a = self.args
        while st.epoch < a.epochs:
            epoch, t0 = st.epoch, time.time()
            lr = self.train_epoch(st)
            dist.average_buffers(self.model)  # one network on every rank: evaluated, checkpointed
            rec = self._end_epoch(st, epoch, lr)
            rec |= dict(epoch_time_s=time.time() - t0, world_size=self.world)
            if self.elastic:
                rec.update(resets=st.resets, steps_redone=st.steps_redone)
            self.out.info(self._epoch_line(rec))
            st.epoch, st.step, st.pos, st.sums, st.train_time = epoch + 1, 0, 0, [0.0] * len(st.sums), 0.0
            self._write_outputs(self._write_epoch, self.out, rec, st)
            st.commit()
            if st.epoch < a.epochs and self._done_early(st, rec):
                break
            if st.epoch < a.epochs and self._stop_due(st):
                self._stop(st)
        self._finish(st, self._consistency(f"end of {self.kind}"))
        self.out.close()
        dist.barrier()
        return 0

    def _done_early(self, st, rec: dict) -> bool:
        """After an epoch's writes: whether the run ends here (the search's --early-stop); the same on every rank."""
        return False

    def _evaluated(self, st, epoch: int, loss: float) -> None:
        """After an epoch's evaluation: divergence and cross-rank checks."""
        check_finite(math.isfinite(loss), "valid", epoch, self.steps_per_epoch)
        self._consistency(f"end of epoch {epoch}")

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

    def _flush(self, st) -> None:
        """Add this rank's metric sums since the last flush (`self.sums`, summed over ranks) and the seconds since
        then to the state's; identical on every rank. Called at commits, stops and the epoch's end."""
        total = dist.sum_metrics(list(self.sums), "train_m")
        st.sums = [u + v for u, v in zip(st.sums, total)]
        st.train_time += time.time() - self._t_flush
        self.sums, self._t_flush = [0.0] * len(self.sums), time.time()
        if self._on_flush is not None:
            self._on_flush()

    def _epoch_begins(self, n_sums: int, on_flush=None) -> None:
        """Start of a training epoch's stretch: metric sums of this rank, the clock, what each flush also does."""
        self.sums, self._t_flush, self._on_flush = [0.0] * n_sums, time.time(), on_flush
