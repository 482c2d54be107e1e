"""Distributed retraining of a searched cell from scratch: `python bin/train.py --genotype NAME|PATH ...`.

Defaults are the PC-DARTS CIFAR-10 retraining recipe; `--preset imagenet` gives the ImageNet one. Evaluation on
the test split every epoch is sharded over the ranks without padding, so it is exact: N ranks report exactly
what 1 rank reports for the same weights.
"""

from __future__ import annotations

import argparse
import os
import random

import torch
import torch.nn as nn

from . import fastpath
from .checkpoint import atomic_save
from .cli import (
    ArgParser,
    apply_preset,
    eval_count,
    nonneg_float,
    positive_int,
)
from .data import (
    EvalShardSampler,
    SeededView,
    load_dataset,
    make_loader,
    make_transform,
)
from .dist import horovod as dist
from .errors import UsageError
from .flags import add_run_args, check_run_args
from .loop import RunLoop
from .models import NetworkCIFAR, NetworkImageNet, count_parameters
from .runtime import accuracy_counts, check_finite, jsonable, step_values
from .space.genotypes import from_dict, load_genotype, to_dict
from .steps import TrainStep

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
    p.add_argument("--genotype", required=True, help="a published name (PCDARTS, PC_DARTS_cifar, PC_DARTS_image) "
                   "or a genotype.json written by a search")
    p.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default=None)
    add_run_args(p, "retraining", "train")
    p.set_defaults(batch_size=96, lr=0.025, epochs=600, init_channels=36, layers=20, seed=0)
    g = p.add_argument_group("retraining network and regularization")
    a = g.add_argument
    a("--network", choices=["cifar", "imagenet"], default="cifar", help="eval network family (stem, aux head)")
    a("--auxiliary", dest="auxiliary", action="store_true", default=True)
    a("--no-auxiliary", dest="auxiliary", action="store_false")
    a("--auxiliary-weight", type=nonneg_float, default=0.4)
    a("--cutout", dest="cutout", action="store_true", default=True)
    a("--no-cutout", dest="cutout", action="store_false")
    a("--cutout-length", type=positive_int, default=16)
    a("--color-jitter", action="store_true", default=False)
    a("--drop-path-prob", type=nonneg_float, default=0.3, help="ramped linearly from 0 over the epochs")
    a("--label-smoothing", type=nonneg_float, default=0.0)
    p.add_argument("--deterministic", action="store_true", help=argparse.SUPPRESS)  # testing aid: cuDNN
    return p


def parse_args(argv=None):
    args = apply_preset(build_parser(), argv, TRAIN_PRESETS)
    if args.drop_path_prob >= 1:
        raise UsageError(f"--drop-path-prob must be below 1, got {args.drop_path_prob}")
    if args.label_smoothing >= 1:
        raise UsageError(f"--label-smoothing must be below 1, got {args.label_smoothing}")
    check_run_args(args)
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
    """Holds the network, optimizer and data pipeline of one rank; `run()` executes the whole retraining."""

    CHECKPOINT_FORMAT = CHECKPOINT_FORMAT

    def __init__(self, args):
        self._setup(args, "training", "train")
        a = args
        self.genotype = load_genotype(a.genotype)
        if a.deterministic:  # eager vs --cuda-graph comparisons: no run-to-run noise from atomics in cuDNN kernels
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        bundle = load_dataset(a.dataset, a.data_dir, download=a.download, image_size=a.image_size, need_test=True,
                              seed=a.seed, synthetic_size=a.synthetic_size, **self._data_sync())
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
        self._fast_model(fastpath.compile_ops)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)
        self.params = list(self.model.parameters())
        opt = torch.optim.SGD(self.params, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay)
        self.w_opt = self._weight_optimizer(opt, list(self.model.named_parameters()), "grads")
        if a.cuda_graph:
            self.step = fastpath.GraphedTrainStep(
                self.model, self.criterion, self.params, self.w_opt, a.grad_clip, a.auxiliary_weight,
                lambda g: dist.grouped_average(g, name="train_grads"), a.channels_last,
                autocast_dtype=self.autocast_dtype)
        else:
            self.step = TrainStep(self.model, self.criterion, self.params, self.w_opt, a.grad_clip,
                                  a.auxiliary_weight, self.autocast_dtype, self.scaler)
        self.start = dict(epoch=0, best_top1=-1.0, global_step=0)
        self._start()

    def _build_loaders(self):
        """Everything that depends on the number of ranks (rebuilt after an elastic reset)."""
        a = self.args
        n_test = eval_count(len(self.test_set), a.batch_size, a.eval_steps)
        self.test_loader = make_loader(self.test_set, self.local_batch, EvalShardSampler(n_test, self.world, self.rank),
                                       a.workers, drop_last=False, pin=self.device.type == "cuda")
        self.steps_per_epoch = self._steps_per_epoch(len(self.train_set))

    def _config(self) -> dict:
        a = self.args
        return dict(network=a.network, init_channels=a.init_channels, layers=a.layers, auxiliary=a.auxiliary,
                    num_classes=self.num_classes, dataset=a.dataset, genotype=to_dict(self.genotype))

    def _load(self, ckpt: dict, path: str) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.w_opt.load_state_dict(ckpt["opt"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start = dict(epoch=int(ckpt["epoch"]), best_top1=float(ckpt["best_top1"]),
                          global_step=int(ckpt.get("global_step", 0)))
        self.resumed_from = path

    def _checkpoint(self, st) -> dict:
        return dict(format=CHECKPOINT_FORMAT, config=self._config(), epoch=st.epoch, model=self.model.state_dict(),
                    opt=self.w_opt.state_dict(), scaler=self.scaler.state_dict() if self.scaler is not None else None,
                    best_top1=st.best_top1, global_step=st.global_step, world_size=self.world)

    def _write_epoch(self, out, rec: dict, st) -> None:
        """Rank 0's writes at an epoch's end: the metrics row, best.pt when the test top-1 improved, checkpoint.pt."""
        out.metrics(rec)
        if self.improved:
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
        loader = self._batches(self.train_set, a.seed, epoch, st.pos, self.device_images)
        lr = self.set_lr(epoch)
        self._epoch_begins(4)  # loss sum, top-1, top-5, images: of this rank since the last flush
        progress = self._progress(st)
        for x, y, _ in loader:
            if st.step >= self.steps_per_epoch:
                break
            if a.lr_per_step:
                lr = self.set_lr(epoch + st.step / self.steps_per_epoch)
            self._seed_step(epoch, st.step)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            logits, loss, norm = self.step.step(x, y)
            loss_v, ok = step_values([loss.detach(), norm.isfinite()])
            # under --amp a non-finite norm is an overflow step that the loss scaler skips, not divergence
            check_finite(ok or self.scaler is not None, "train", epoch, st.step + 1)
            k1, k5 = accuracy_counts(logits.detach(), y, (1, 5))
            self.sums = [self.sums[0] + loss_v * len(y), self.sums[1] + k1, self.sums[2] + k5, self.sums[3] + len(y)]
            self._step_done(st, progress, loss_v, self.local_batch * self.world, lr)
        progress.close()
        self._flush(st)
        return lr

    # --- the whole run (the loop's frame: loop.RunLoop) ----------------------------------------------------
    def _stateful(self) -> dict:
        return {"model": self.model, "opt": self.w_opt} | ({"scaler": self.scaler} if self.scaler is not None else {})

    def _checked_tensors(self) -> dict:
        return {"weights": list(self.model.parameters())}

    def _output_args(self) -> dict:
        return jsonable(vars(self.args)) | {"world_size": self.world, "genotype_resolved": to_dict(self.genotype)}

    def _start_line(self) -> str:
        a = self.args
        return (f"train: {self.world} rank(s) on {self.device.type}, global batch {a.batch_size}, "
                f"{self.steps_per_epoch} steps/epoch, {count_parameters(self.model)} parameters "
                f"(auxiliary head excluded), {self.grad_allreduce} gradient allreduce, "
                f"{'bf16 autocast, ' if a.bf16 else ''}"
                f"{fastpath.compile_note(a.compile_backend if a.compile else None, self.device, 'ops')}"
                f"output {a.output_dir}")

    def _end_epoch(self, st, epoch: int, lr: float) -> dict:
        """Test evaluation, the checks, the best top-1 so far, and the epoch's metrics row."""
        a = self.args
        te_loss, te1, te5, n_test = evaluate(self.model, self.test_loader, self.device, self.autocast_dtype or False,
                                             self.local_batch if a.compile else None)
        self._evaluated(st, epoch, te_loss)
        self.improved = te1 > st.best_top1
        st.best_top1 = max(st.best_top1, te1)
        loss_sum, c1, c5, n = st.sums
        return dict(epoch=epoch, lr=lr, train_loss=loss_sum / max(n, 1), train_top1=100 * c1 / max(n, 1),
                    train_top5=100 * c5 / max(n, 1), test_loss=te_loss, test_top1=te1, test_top5=te5,
                    test_images=n_test, images_per_s=n / max(st.train_time, 1e-9),
                    drop_path_prob=self.model.drop_path_prob)

    def _epoch_line(self, rec: dict) -> str:
        return (f"epoch {rec['epoch'] + 1}/{self.args.epochs} lr {rec['lr']:.5f} train loss {rec['train_loss']:.4f} "
                f"top1 {rec['train_top1']:.2f} | test loss {rec['test_loss']:.4f} top1 {rec['test_top1']:.2f} "
                f"top5 {rec['test_top5']:.2f}")

    def _finish(self, st, final: dict) -> None:
        self.out.info(f"best test top1 {st.best_top1:.2f}; checkpoints in {self.args.output_dir}")
        self.out.info(f"all {self.world} rank(s) hold identical parameters (crc32 weights {final['weights']:08x})"
                      + (f"; elastic: {st.resets} reset(s), {st.steps_redone} step(s) redone" if self.elastic else ""))


def network_from_checkpoint(ckpt: dict):
    cfg = ckpt["config"]
    geno = from_dict(cfg["genotype"], where="checkpoint genotype")
    model = build_network(cfg["network"], cfg["init_channels"], cfg["num_classes"], cfg["layers"],
                          cfg["auxiliary"], geno)
    model.load_state_dict(ckpt["model"])
    return model


def main(argv=None) -> int:
    return Trainer(parse_args(argv)).run()
