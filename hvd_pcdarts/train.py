"""Distributed retraining of a searched cell from scratch: `python bin/train.py --genotype NAME|PATH ...`.

Defaults are the PC-DARTS CIFAR-10 retraining recipe; `--preset imagenet` gives the ImageNet one. Evaluation on
the test split every epoch is sharded over the ranks without padding, so it is exact: N ranks report exactly
what 1 rank reports for the same weights.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

import torch
import torch.nn as nn

from . import distributed as dist
from . import fastpath
from .checkpoint import atomic_save, check_config, load_checkpoint
from .cli import (
    ArgParser,
    add_output_args,
    add_quick_run_args,
    apply_preset,
    eval_count,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
)
from .data import (
    DATASETS,
    EvalShardSampler,
    GlobalBatchSampler,
    SeededView,
    load_dataset,
    make_batch_loader,
    make_loader,
    make_transform,
)
from .elastic import (
    RunLoop,
    add_elastic_args,
    check_elastic_args,
    local_checks_only,
    per_rank_batch,
)
from .errors import UsageError
from .genotypes import from_dict, load_genotype, to_dict
from .models import NetworkCIFAR, NetworkImageNet, count_parameters
from .preemption import add_preemption_args
from .runtime import (
    Progress,
    accuracy_counts,
    check_finite,
    default_output_dir,
    lr_at,
    pick_device,
    progress_mode,
    step_values,
)

CHECKPOINT_FORMAT = "hvd-pcdarts-train-v1"

TRAIN_PRESETS = {
    "cifar10": {},
    "imagenet": dict(dataset="imagefolder", network="imagenet", init_channels=48, layers=14, batch_size=1024,
                     lr=0.5, weight_decay=3e-5, epochs=250, lr_schedule="linear", warmup_epochs=5,
                     label_smoothing=0.1, color_jitter=True, cutout=False, image_size=224, drop_path_prob=0.0),
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="train.py", description="Distributed retraining of a PC-DARTS cell (Horovod). Defaults "
                  "are the PC-DARTS CIFAR-10 recipe; learning rates are for the global batch.")
    a = p.add_argument
    a("--genotype", required=True, help="a published name (PCDARTS, PC_DARTS_cifar, PC_DARTS_image) or a "
      "genotype.json written by a search")
    a("--preset", choices=sorted(TRAIN_PRESETS), default=None)
    a("--dataset", choices=DATASETS, default="cifar10")
    a("--data-dir", default="./data")
    a("--download", action="store_true")
    a("--image-size", type=positive_int, default=None)
    a("--synthetic-size", type=positive_int, default=2048)
    a("--network", choices=["cifar", "imagenet"], default="cifar", help="eval network family (stem, aux head)")
    a("--batch-size", type=positive_int, default=96, help="GLOBAL batch, split evenly over the ranks")
    a("--lr", type=positive_float, default=0.025)
    a("--lr-min", type=nonneg_float, default=0.0)
    a("--lr-schedule", choices=["cosine", "linear", "step"], default="cosine")
    a("--lr-per-step", action="store_true")
    a("--momentum", type=nonneg_float, default=0.9)
    a("--weight-decay", type=nonneg_float, default=3e-4)
    a("--epochs", type=positive_int, default=600)
    a("--warmup-epochs", type=nonneg_float, default=0.0)
    a("--init-channels", type=positive_int, default=36)
    a("--layers", type=positive_int, default=20)
    a("--auxiliary", dest="auxiliary", action="store_true", default=True)
    a("--no-auxiliary", dest="auxiliary", action="store_false")
    a("--auxiliary-weight", type=nonneg_float, default=0.4)
    a("--cutout", dest="cutout", action="store_true", default=True)
    a("--no-cutout", dest="cutout", action="store_false")
    a("--cutout-length", type=positive_int, default=16)
    a("--color-jitter", action="store_true", default=False)
    a("--drop-path-prob", type=nonneg_float, default=0.3, help="ramped linearly from 0 over the epochs")
    a("--label-smoothing", type=nonneg_float, default=0.0)
    a("--grad-clip", type=nonneg_float, default=5.0)
    a("--seed", type=nonneg_int, default=0)
    a("--workers", type=nonneg_int, default=2)
    a("--sync-bn", action="store_true")
    a("--fp16-allreduce", action="store_true")
    a("--amp", action="store_true", help="float16 mixed precision with loss scaling (CUDA only)")
    a("--bf16", action="store_true", help="bfloat16 autocast of the forward passes (weights, gradients and "
      "optimizer stay float32; no loss scaling); works with --cuda-graph, also on the CPU")
    a("--channels-last", action="store_true", help="fast path: NHWC memory format for the weights (and so the "
      "activations); see benchmarks/RESULTS.md for when it pays")
    a("--cuda-graph", action="store_true", help="fast path (CUDA only): replay the forward+backward of a step as "
      "a CUDA graph (recaptured when the drop-path probability changes); gradient averaging, clipping and the "
      "optimizer step stay outside")
    a("--gpu-data", action="store_true", help="fast path: keep the training set on the device as uint8 and "
      "augment a batch there (the same crops, flips and cutouts as the loader; tensor datasets only)")
    a("--compile", action="store_true", help="fast path: torch.compile each operation of the cells (fused batch "
      "norms and ReLUs); ops of one shape share the compiled code, compiled during the first steps (training and "
      "evaluation mode each); composes with --cuda-graph and --channels-last (their CUDA tests not yet run on a "
      "GPU)")
    a("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # testing aid: aot_eager compiles quickly
    a("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a("--grad-allreduce", choices=dist.GRAD_ALLREDUCE_MODES, default="auto",
      help="how the weight gradients are averaged over the ranks: overlap = one allreduce per tensor started during "
           "backward (hvd.DistributedOptimizer), flat = all of them as one tensor after backward; auto = flat on "
           "the CPU (nothing to overlap with there; 0.81 -> 0.94 scaling efficiency on 2 ranks), overlap on GPUs")
    a("--deterministic", action="store_true", help=argparse.SUPPRESS)  # testing aid: cuDNN deterministic algorithms
    a("--no-augment", action="store_true")
    add_output_args(p, "train")
    add_quick_run_args(p)
    add_elastic_args(p)
    add_preemption_args(p)
    return p


def parse_args(argv=None):
    args = apply_preset(build_parser(), argv, TRAIN_PRESETS)
    if args.drop_path_prob >= 1:
        raise UsageError(f"--drop-path-prob must be below 1, got {args.drop_path_prob}")
    if args.label_smoothing >= 1:
        raise UsageError(f"--label-smoothing must be below 1, got {args.label_smoothing}")
    if args.warmup_epochs >= args.epochs:
        raise UsageError(f"--warmup-epochs {args.warmup_epochs:g} must be less than --epochs {args.epochs}")
    check_elastic_args(args)
    return args


def build_network(network: str, C: int, num_classes: int, layers: int, auxiliary: bool, genotype):
    cls = NetworkCIFAR if network == "cifar" else NetworkImageNet
    return cls(C, num_classes, layers, auxiliary, genotype)


def evaluate(model, loader, device, amp=False, compiled_batch=None):
    """Sums over this rank's shard, combined over ranks: (loss, top1 %, top5 %, count). `amp`: False, True
    (float16 autocast) or an autocast dtype. `compiled_batch`: the batch size a compiled model was compiled for
    (--compile); a last batch of another size runs eagerly instead of compiling every op once more."""
    dtype = amp if isinstance(amp, torch.dtype) else torch.float16 if amp else torch.bfloat16
    model.eval()
    loss_sum = c1 = c5 = n = 0.0
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            odd = compiled_batch is not None and len(x) != compiled_batch
            with torch.autocast(device.type, dtype=dtype, enabled=bool(amp)), fastpath.uncompiled(odd):
                logits, _ = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
            k1, k5 = accuracy_counts(logits, y, (1, 5))
            c1, c5, n = c1 + k1, c5 + k5, n + len(y)
    loss_sum, c1, c5, n = dist.sum_metrics([loss_sum, c1, c5, n], "eval_m")
    return loss_sum / max(n, 1), 100.0 * c1 / max(n, 1), 100.0 * c5 / max(n, 1), int(n)


class Trainer(RunLoop):
    def __init__(self, args):
        self.args = a = args
        dist.init(cpu_tuning=not a.sync_bn)
        self.world, self.rank = dist.size(), dist.rank()
        self.local_batch, _ = per_rank_batch(a.batch_size, self.world, strict=True)
        self.genotype = load_genotype(a.genotype)
        if a.amp and a.bf16:
            raise UsageError("--amp (float16 with loss scaling) and --bf16 exclude each other: pick one")
        self.device = pick_device(a)
        fastpath.check_fast_flags(a, self.device, self.world)
        if a.deterministic:  # eager vs --cuda-graph comparisons: no run-to-run noise from atomics in cuDNN kernels
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        if a.output_dir is None:
            a.output_dir = default_output_dir("train")
        self.elastic = bool(a.elastic)  # no collective before the elastic loop: its first sync equalizes the ranks
        sync = local_checks_only() if a.elastic else dict(
            is_local_root=dist.local_rank() == 0, barrier=dist.barrier,
            agree=lambda ok: all(dist.allgather_object(bool(ok))))
        bundle = load_dataset(a.dataset, a.data_dir, download=a.download, image_size=a.image_size, need_test=True,
                              seed=a.seed, synthetic_size=a.synthetic_size, **sync)
        self.num_classes = bundle.num_classes
        if len(bundle.train) < a.batch_size:
            raise UsageError(f"the training set has {len(bundle.train)} images, fewer than one global batch "
                             f"(--batch-size {a.batch_size})")
        tf_train = make_transform(bundle, True, not a.no_augment, a.dataset, color_jitter=a.color_jitter,
                                  cutout=a.cutout_length if a.cutout else 0)
        tf_test = make_transform(bundle, False, False, a.dataset)
        self.train_set = SeededView(bundle.train, range(len(bundle.train)), tf_train, a.seed, stream=0)
        self.test_set = SeededView(bundle.test, range(len(bundle.test)), tf_test, a.seed, stream=3)
        self.device_images = None
        if a.gpu_data:  # the training set on the device as uint8; batches augmented there, identical to the loader's
            spec = fastpath.augment_spec(bundle, True, not a.no_augment, a.dataset,
                                         cutout=a.cutout_length if a.cutout else 0)
            self.device_images = fastpath.DeviceImages(self.train_set, spec, self.device,
                                                       channels_last=a.channels_last)
        torch.manual_seed(a.seed)
        random.seed(a.seed)
        self.model = build_network(a.network, a.init_channels, self.num_classes, a.layers, a.auxiliary,
                                   self.genotype).to(self.device)
        if a.sync_bn and self.world > 1:
            dist.convert_sync_batchnorm(self.model)
        if a.channels_last:
            fastpath.to_channels_last(self.model)
        if a.compile:
            fastpath.compile_ops(self.model, backend=a.compile_backend)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)
        self.params = list(self.model.parameters())
        opt = torch.optim.SGD(self.params, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay)
        # --cuda-graph: a plain SGD; the graphed step averages the gradients itself (hooks do not replay in a graph)
        self.grad_allreduce = dist.grad_allreduce_mode(a.grad_allreduce, self.device)
        self.opt = opt if a.cuda_graph else dist.weight_optimizer(
            opt, list(self.model.named_parameters()), self.grad_allreduce, a.fp16_allreduce, name="grads")
        self.graphed = None  # --cuda-graph: fastpath.GraphedTrainStep, captured at the first step
        self.scaler = torch.amp.GradScaler("cuda") if a.amp else None
        self.start = dict(epoch=0, best_top1=-1.0, global_step=0)
        self._resume()
        if not self.elastic:
            self._sync_start()
        self._build_loaders()

    def _build_loaders(self):
        """Everything that depends on the number of ranks (rebuilt after an elastic reset)."""
        a = self.args
        n_test = eval_count(len(self.test_set), a.batch_size, a.eval_steps)
        self.test_loader = make_loader(self.test_set, self.local_batch, EvalShardSampler(n_test, self.world, self.rank),
                                       a.workers, drop_last=False, pin=self.device.type == "cuda")
        self.steps_per_epoch = len(self.train_set) // (self.local_batch * self.world)
        if a.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, a.steps_per_epoch)

    def config(self) -> dict:
        a = self.args
        return dict(network=a.network, init_channels=a.init_channels, layers=a.layers, auxiliary=a.auxiliary,
                    num_classes=self.num_classes, dataset=a.dataset, genotype=to_dict(self.genotype))

    def _read_checkpoint(self, path: str) -> dict:
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"checkpoint {path} is not a training checkpoint ({ckpt.get('format')!r})")
        check_config(ckpt["config"], self.config(), path)
        if ckpt["epoch"] > self.args.epochs:
            raise UsageError(f"checkpoint {path} is at epoch {ckpt['epoch']}, past --epochs {self.args.epochs}")
        return ckpt

    def _load(self, ckpt: dict, path: str) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["opt"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start = dict(epoch=int(ckpt["epoch"]), best_top1=float(ckpt["best_top1"]),
                          global_step=int(ckpt.get("global_step", 0)))
        self.resumed_from = path

    def _checkpoint(self, st) -> dict:
        return dict(format=CHECKPOINT_FORMAT, config=self.config(), epoch=st.epoch, model=self.model.state_dict(),
                    opt=self.opt.state_dict(), scaler=self.scaler.state_dict() if self.scaler is not None else None,
                    best_top1=st.best_top1, global_step=st.global_step, world_size=self.world)

    def _write_epoch(self, out, rec: dict, st, improved: bool) -> None:
        """Rank 0's writes at an epoch's end: the metrics row, best.pt when the test top-1 improved, checkpoint.pt."""
        out.metrics(rec)
        if improved:
            atomic_save(self._checkpoint(st), os.path.join(self.args.output_dir, "best.pt"))
        self._save(st)

    def _seed_step(self, epoch: int, step: int) -> None:
        """Drop-path masks from (seed, epoch, step, rank): different on each rank (the same masks would correlate
        the shards) and the same after a resume, whatever happened before."""
        torch.manual_seed((self.args.seed * 1_000_003 + epoch * 10_007 + step) * 1009 + self.rank + 1)

    def train_epoch(self, st):
        """Train the rest of epoch `st.epoch` from step `st.step` (an elastic restart continues mid-epoch)."""
        a = self.args
        epoch = st.epoch
        self.model.train()
        self.model.drop_path_prob = a.drop_path_prob * epoch / a.epochs
        self.train_set.set_epoch(epoch)
        sampler = GlobalBatchSampler(len(self.train_set), a.seed, epoch, self.world, self.rank, self.local_batch,
                                     st.pos)
        if self.device_images is not None:
            loader = fastpath.DeviceLoader(self.device_images, batch_sampler=sampler)
        else:
            loader = make_batch_loader(self.train_set, sampler, a.workers, pin=self.device.type == "cuda")
        lr = self._set_lr(epoch)
        sums = [0.0, 0.0, 0.0, 0.0]  # loss sum, top-1, top-5, images - of this rank since the last flush
        progress = Progress(progress_mode(a.progress), epoch, a.epochs, self.steps_per_epoch, st.step)
        t0 = time.time()
        for x, y, _ in loader:
            if st.step >= self.steps_per_epoch:
                break
            if a.lr_per_step:
                lr = self._set_lr(epoch + st.step / self.steps_per_epoch)
            self._seed_step(epoch, st.step)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if a.cuda_graph:
                logits, loss, norm = self._graphed_step().step(x, y)
            else:
                logits, loss, norm = self._eager_step(x, y)
            loss_v, ok = step_values([loss.detach(), norm.isfinite()])
            # under --amp a non-finite norm is an overflow step that the loss scaler skips, not divergence
            check_finite(ok or self.scaler is not None, "train", epoch, st.step + 1)
            k1, k5 = accuracy_counts(logits.detach(), y, (1, 5))
            sums = [sums[0] + loss_v * len(y), sums[1] + k1, sums[2] + k5, sums[3] + len(y)]
            st.step += 1
            st.pos += self.local_batch * self.world
            st.global_step += 1
            self.live_steps += 1
            progress.update(loss_v, self.local_batch * self.world, lr)
            if self._commit_due(st):
                sums = self._flush(st, sums, time.time() - t0)
                t0 = time.time()
                st.commit()
            if self._stop_due(st):
                self._flush(st, sums, time.time() - t0)
                self._stop(st)
        progress.close()
        self._flush(st, sums, time.time() - t0)
        return lr

    def _eager_step(self, x, y):
        """One step with Horovod's DistributedOptimizer (gradients averaged by its hooks, clipped after)."""
        a = self.args
        self.opt.zero_grad()
        with torch.autocast(self.device.type, dtype=self._autocast_dtype() or torch.bfloat16,
                            enabled=self._autocast_dtype() is not None):
            logits, loss = fastpath.train_loss(self.model, self.criterion, x, y, a.auxiliary_weight)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.opt.synchronize()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
            self.opt.synchronize()
        norm = fastpath.clip_gradients(self.params, a.grad_clip)
        with self.opt.skip_synchronize():
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
        return logits, loss, norm

    def _graphed_step(self):
        """--cuda-graph: the same step replayed from a CUDA graph; the same drop-path masks (the generator is
        seeded by _seed_step before each step either way), gradients averaged with a named grouped allreduce."""
        if self.graphed is None:
            a = self.args
            self.graphed = fastpath.GraphedTrainStep(
                self.model, self.criterion, list(self.model.parameters()), self.opt, a.grad_clip,
                aux_weight=a.auxiliary_weight, average=lambda g: dist.grouped_average(g, name="train_grads"),
                channels_last=a.channels_last, autocast_dtype=self._autocast_dtype())
        return self.graphed

    def _autocast_dtype(self):
        """bfloat16 (--bf16), float16 (--amp) or None."""
        return torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.amp else None

    def _set_lr(self, pos):
        a = self.args
        lr = lr_at(pos, a.lr, a.lr_min, a.epochs, a.warmup_epochs, a.lr_schedule)
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr

    # --- the whole run (the loop's frame: elastic.RunLoop) -------------------------------------------------
    def _stateful(self) -> dict:
        return {"model": self.model, "opt": self.opt} | ({"scaler": self.scaler} if self.scaler is not None else {})

    def _checked_tensors(self) -> dict:
        return {"weights": list(self.model.parameters())}

    def _output_args(self) -> dict:
        return _jsonable(vars(self.args)) | {"world_size": self.world, "genotype_resolved": to_dict(self.genotype)}

    def _start_line(self) -> str:
        a = self.args
        return (f"train: {self.world} rank(s) on {self.device.type}, global batch {a.batch_size}, "
                f"{self.steps_per_epoch} steps/epoch, {count_parameters(self.model)} parameters "
                f"(auxiliary head excluded), {'graphed' if a.cuda_graph else self.grad_allreduce} gradient allreduce, "
                f"{'bf16 autocast, ' if a.bf16 else ''}"
                f"{fastpath.compile_note(a.compile_backend if a.compile else None, self.device, 'ops')}"
                f"output {a.output_dir}")

    def _epochs(self, st):
        a = self.args
        out = self.out
        while st.epoch < a.epochs:
            epoch = st.epoch
            t0 = time.time()
            lr = self.train_epoch(st)
            dist.average_buffers(self.model)  # one network on every rank: evaluated, checkpointed
            te_loss, te1, te5, n_test = evaluate(self.model, self.test_loader, self.device,
                                                 self._autocast_dtype() or False,
                                                 self.local_batch if a.compile else None)
            check_finite(math.isfinite(te_loss), "valid", epoch, self.steps_per_epoch)
            self._consistency(f"end of epoch {epoch}")
            loss_sum, c1, c5, n = st.sums
            rec = dict(epoch=epoch, lr=lr, train_loss=loss_sum / max(n, 1), train_top1=100 * c1 / max(n, 1),
                       train_top5=100 * c5 / max(n, 1), test_loss=te_loss, test_top1=te1, test_top5=te5,
                       test_images=n_test, epoch_time_s=time.time() - t0,
                       images_per_s=n / max(st.train_time, 1e-9), world_size=self.world,
                       drop_path_prob=self.model.drop_path_prob)
            if self.elastic:
                rec.update(resets=st.resets, steps_redone=st.steps_redone)
            out.info(f"epoch {epoch + 1}/{a.epochs} lr {lr:.5f} train loss {rec['train_loss']:.4f} "
                     f"top1 {rec['train_top1']:.2f} | test loss {te_loss:.4f} top1 {te1:.2f} top5 {te5:.2f}")
            improved = te1 > st.best_top1
            st.best_top1 = max(st.best_top1, te1)
            st.epoch, st.step, st.pos, st.sums, st.train_time = epoch + 1, 0, 0, [0.0, 0.0, 0.0, 0.0], 0.0
            self._write_outputs(self._write_epoch, out, rec, st, improved)
            st.commit()
            if st.epoch < a.epochs and self._stop_due(st):
                self._stop(st)
        final = self._consistency("end of training")
        out.info(f"best test top1 {st.best_top1:.2f}; checkpoints in {a.output_dir}")
        out.info(f"all {self.world} rank(s) hold identical parameters (crc32 weights {final['weights']:08x})"
                 + (f"; elastic: {st.resets} reset(s), {st.steps_redone} step(s) redone" if self.elastic else ""))
        out.close()
        dist.barrier()
        return 0


def _jsonable(d):
    import json

    return json.loads(json.dumps(d, default=str))


def network_from_checkpoint(ckpt: dict):
    cfg = ckpt["config"]
    geno = from_dict(cfg["genotype"], where="checkpoint genotype")
    model = build_network(cfg["network"], cfg["init_channels"], cfg["num_classes"], cfg["layers"],
                          cfg["auxiliary"], geno)
    model.load_state_dict(ckpt["model"])
    return model


def main(argv=None) -> int:
    return Trainer(parse_args(argv)).run()
