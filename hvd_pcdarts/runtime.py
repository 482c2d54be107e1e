"""What every training run shares: output folder (rank 0 only), log, metrics, TensorBoard, progress,
learning-rate schedule, device and precision checks."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time

import torch

from .checkpoint import atomic_write_text, remove_stale_temporaries
from .dist import horovod as dist
from .errors import DivergenceError, UsageError


def lr_at(epoch_pos: float, base_lr: float, min_lr: float, epochs: int, warmup_epochs: float = 0.0,
          schedule: str = "cosine", step_milestones=(0.5, 0.75), step_gamma: float = 0.1) -> float:
    """Learning rate at fractional epoch `epoch_pos` (an integer for per-epoch schedules, as in PC-DARTS).

    Linear warmup from base/(warmup steps) to base over `warmup_epochs`, then cosine to `min_lr`, linear to
    `min_lr`, or step decay (x gamma at the given fractions of the run)."""
    if warmup_epochs > 0 and epoch_pos < warmup_epochs:
        # per epoch: (e+1)/warmup of the base rate; per step: the exact fraction of the warmup done so far
        done = epoch_pos + 1 if epoch_pos == int(epoch_pos) else epoch_pos
        return base_lr * min(1.0, done / warmup_epochs)
    span = max(epochs - warmup_epochs, 1e-12)
    t = min(max((epoch_pos - warmup_epochs) / span, 0.0), 1.0)
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return min_lr + (base_lr - min_lr) * (1.0 - t)
    if schedule == "step":
        return base_lr * step_gamma ** sum(1 for m in step_milestones if t >= m)
    raise ValueError(f"unknown schedule {schedule!r}")


def pick_device(args) -> torch.device:
    """One process per GPU pinned by local rank, else the CPU; GPU-only requests fail clearly without one."""
    has_gpu = torch.cuda.is_available()
    if getattr(args, "device", "auto") == "cuda" and not has_gpu:
        raise UsageError("--device cuda was requested but no CUDA GPU is visible: use --device cpu (or auto)")
    if getattr(args, "amp", False) and not has_gpu:
        raise UsageError("--amp needs a CUDA GPU and none is visible: drop --amp to train in float32 on the CPU")
    want = {"auto": None, "cpu": False, "cuda": True}[getattr(args, "device", "auto")]
    device = dist.setup_device(want)
    if device.type == "cuda":
        # cuDNN picks each convolution's fastest algorithm at its first call (as the original PC-DARTS code does;
        # the shapes are fixed per run): the benchmarks' GPU numbers are measured this way. train.py's
        # --deterministic turns it off again.
        torch.backends.cudnn.benchmark = True
    return device


def default_output_dir(kind: str) -> str:
    """runs/<kind>-<time>, chosen on rank 0 and shared, so every rank agrees."""
    name = os.path.join("runs", f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    return dist.broadcast_object(name, name="outdir")


def writable_error(out_dir: str) -> str | None:
    """Create the output folder and prove a file can be written there; the one-line error, or None."""
    try:
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise OSError(f"{out_dir} exists and is not a folder")
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        return f"output folder {out_dir} cannot be written ({e.strerror or e}): choose another --output-dir"
    return None


def check_writable(out_dir: str) -> None:
    """Rank 0 creates the output folder and proves it can write there; every rank learns the verdict."""
    err = writable_error(out_dir) if dist.is_root() else None
    err = dist.broadcast_object(err, name="outdir_ok")
    if err:
        raise UsageError(err)


# What a run writes into its output folder; the first four show that the folder holds a run.
RUN_MARKERS = ("checkpoint.pt", "best.pt", "genotype.json", "metrics.jsonl")
RUN_OUTPUTS = RUN_MARKERS + ("args.json", "log.txt", "eval.json", "arch_weights.png", "tb", "cells", "report.md",
                             "report")


def run_in(out_dir: str) -> list[str]:
    """The files of `out_dir` that show an earlier run there (an empty metrics.jsonl does not count)."""
    found = []
    for name in RUN_MARKERS:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path) and (name != "metrics.jsonl" or os.path.getsize(path) > 0):
            found.append(name)
    return found


def claim_output_dir(out_dir: str, resume, overwrite: bool) -> list[str]:
    """Before a run writes anything: refuse an output folder that holds an earlier run unless it is resumed
    (--resume) or replaced (--overwrite: rank 0 removes the earlier run's outputs, RUN_OUTPUTS, and nothing
    else). Rank 0 decides, every rank learns the verdict. Returns what was removed."""
    err, removed = None, []
    if dist.is_root() and resume is None:
        found = run_in(out_dir)
        if found and not overwrite:
            err = (f"--output-dir {out_dir} already holds a run ({', '.join(found)}): continue it with --resume "
                   f"auto, replace it with --overwrite, or choose another --output-dir")
        elif found:
            try:
                for name in RUN_OUTPUTS:
                    path = os.path.join(out_dir, name)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    elif os.path.lexists(path):
                        os.unlink(path)
                    else:
                        continue
                    removed.append(name)
            except OSError as e:
                err = f"--overwrite: cannot remove the earlier run's {name} in {out_dir} ({e.strerror or e})"
    err = dist.broadcast_object(err, name="outdir_claim")
    if err:
        raise UsageError(err)
    return removed


class RunOutput:
    """Rank-0 writer of args.json, log.txt, metrics.jsonl and TensorBoard events; a no-op on other ranks."""

    def __init__(self, out_dir: str, args_dict: dict, resume_epoch: int = 0, tensorboard: bool = True):
        self.out_dir = out_dir
        self.root = dist.is_root()
        self.log = logging.getLogger(f"hvd_pcdarts.{id(self)}")
        self.log.propagate = False
        self.log.setLevel(logging.INFO)
        self.tb = None
        if not self.root:
            self.log.addHandler(logging.NullHandler())
            return
        fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
        fh = logging.FileHandler(os.path.join(out_dir, "log.txt"))
        fh.setFormatter(fmt)
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(fmt)
        self.log.addHandler(fh)
        self.log.addHandler(sh)
        atomic_write_text(os.path.join(out_dir, "args.json"), json.dumps(args_dict, indent=2, sort_keys=True) + "\n")
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        remove_stale_temporaries(out_dir)  # what a write killed half-way left behind
        self._truncate_metrics(resume_epoch)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=os.path.join(out_dir, "tb"), purge_step=resume_epoch)
            except Exception as e:  # tensorboard missing: keep going, say so
                self.log.info(f"TensorBoard disabled ({type(e).__name__}: {e})")

    def _truncate_metrics(self, resume_epoch: int) -> None:
        """Keep exactly the epochs before the resume point, so every epoch appears once."""
        lines = []
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(rec, dict) and rec.get("epoch", 1 << 30) < resume_epoch:
                        lines.append(json.dumps(rec) + "\n")
        atomic_write_text(self.metrics_path, "".join(lines))

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def metrics(self, record: dict) -> None:
        if not self.root:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, record["epoch"])
            for tag, v in scalars("diagnostics", record.get("diagnostics", {})):
                self.tb.add_scalar(tag, v, record["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        for h in list(self.log.handlers):
            h.close()
            self.log.removeHandler(h)


def progress_mode(flag) -> str | None:
    """--progress (True): a tqdm bar; --no-progress (False): nothing; neither (None): the bar on a terminal, else
    plain lines (under horovodrun, mpirun and Slurm stderr is a pipe or a file, where a bar shows nothing until
    the epoch ends)."""
    if flag is None:
        return "bar" if sys.stderr.isatty() else "lines"
    return "bar" if flag else None


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Rank 0's progress through an epoch. Mode "bar": a tqdm bar on stderr. Mode "lines": one plain line on
    stdout every `every_s` seconds or every 10% of the epoch, whichever comes first:
    `epoch E/N step i/n | X img/s | loss L | ETA epoch T, run T` (rates and ETAs from this epoch's steps so far;
    the run's ETA assumes the later epochs take as long per step). Nothing on other ranks or in mode None."""

    def __init__(self, mode, epoch: int, epochs: int, steps: int, start_step: int = 0, every_s: float = 30.0):
        self.mode = mode if dist.is_root() else None
        self.epoch, self.epochs, self.steps, self.step = epoch, epochs, steps, start_step
        self.first, self.every_s = start_step, every_s
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=steps - start_step, desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True,
                            leave=False, file=sys.stderr)
        self.t0 = self.t_line = time.monotonic()
        self.step_line, self.images, self.loss_sum = start_step, 0, 0.0

    def update(self, loss: float, images: int, lr: float) -> None:
        """One step done: its loss (this rank's), the images of all ranks it read, the learning rate."""
        if self.mode is None:
            return
        self.step += 1
        self.images += images
        self.loss_sum += loss
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.4f}")
            self.bar.update(1)
            return
        now = time.monotonic()
        if self.step < self.steps and (now - self.t_line >= self.every_s
                                       or self.step - self.step_line >= max(1, self.steps // 10)):
            self.t_line, self.step_line = now, self.step
            print(self.line(now), flush=True)

    def line(self, now: float) -> str:
        done = self.step - self.first
        per_step = (now - self.t0) / max(done, 1)
        left_epoch = per_step * (self.steps - self.step)
        left_run = left_epoch + per_step * self.steps * (self.epochs - self.epoch - 1)
        return (f"{time.strftime('%Y-%m-%d %H:%M:%S')} epoch {self.epoch + 1}/{self.epochs} step "
                f"{self.step}/{self.steps} | {self.images / max(now - self.t0, 1e-9):.0f} img/s | loss "
                f"{self.loss_sum / max(done, 1):.4f} | ETA epoch {_duration(left_epoch)}, run {_duration(left_run)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def step_values(values: list, *groups) -> list[float]:
    """The step's 0-dim tensors `values` (its loss, whether its averaged gradient norm is finite, ...) and, per
    parameter group, 1.0 if all its values are finite else 0.0, read in one device sync. Averaged gradients and
    parameters after a step are the same on every rank, so their verdict is too."""
    dtype = values[0].dtype
    flags = [torch.nn.utils.get_total_norm(list(g)).isfinite() for g in groups]
    return torch.stack([v.to(dtype) for v in [*values, *flags]]).tolist()


def check_finite(ok: bool, kind: str, epoch: int, step: int) -> None:
    """Stop every rank with `non-finite <train|arch|valid> loss at epoch E step S` (1-based) when not ok."""
    if not ok:
        raise DivergenceError(f"non-finite {kind} loss at epoch {epoch + 1} step {step}: the run diverged (lower "
                              f"the learning rate); the last checkpoint and genotype are the previous epoch's")


def accuracy_counts(logits: torch.Tensor, target: torch.Tensor, topk=(1, 5)):
    """Number of correct predictions at each k (k capped at the number of classes)."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target[:, None])
    return [float(hit[:, :min(k, maxk)].any(dim=1).sum()) for k in topk]


def jsonable(d: dict) -> dict:
    """`d` with every value JSON can hold (others as their str), for args.json and checkpoints."""
    return json.loads(json.dumps(d, default=str))


def scalars(prefix: str, value):
    """(tag, number) pairs of the numbers in nested dicts and lists, for TensorBoard: diagnostics/normal/margin/3."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from scalars(f"{prefix}/{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from scalars(f"{prefix}/{i}", v)
    elif isinstance(value, (bool, int, float)):
        yield prefix, float(value)
