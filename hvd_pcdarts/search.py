"""The distributed PC-DARTS search: `python bin/train_search.py ...` under horovodrun, mpirun or alone.

Order of one step (first-order PC-DARTS): from `--arch-start-epoch` on, an architecture step on a batch of the
architecture half (Adam over alphas and betas; gradients by torch.autograd.grad, averaged over ranks with a
named grouped allreduce; no weight gradient is produced), then a weight step on a batch of the weight half
(hvd.DistributedOptimizer over the weights only; gradients clipped after averaging).
"""

from __future__ import annotations

import argparse
import json
import os
import random

import torch
import torch.nn as nn

from . import fastpath
from .arch_reg import ARCH_REGS, DEFAULT_WEIGHT, make_arch_reg
from .cli import (
    ArgParser,
    apply_preset,
    eval_count,
    fraction,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
)
from .data import (
    EvalShardSampler,
    SeededView,
    class_sample_split,
    load_dataset,
    make_loader,
    make_transform,
    search_split,
)
from .diagnostics import early_stop_holds, early_stop_rule, search_diagnostics
from .dist import horovod as dist
from .dist import replicas
from .errors import UsageError
from .flags import add_run_args, check_run_args
from .loop import RunLoop
from .models import SearchNetwork
from .runtime import accuracy_counts, check_finite, jsonable, step_values
from .space.genotypes import derivation_rule, save_genotype, to_dict
from .steps import SearchStep, autocast, search_optimizers
from .tools.report import DEFAULT_THRESHOLD, log_report

CHECKPOINT_FORMAT = "hvd-pcdarts-search-v1"

SEARCH_PRESETS = {
    "cifar10": {},
    "imagenet": dict(dataset="imagefolder", partial_k=2, stem="imagenet", batch_size=1024, lr=0.5, arch_lr=6e-3,
                     arch_start_epoch=35, epochs=50, warmup_epochs=5, class_sample_fractions=[0.1, 0.025],
                     image_size=224),
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="train_search.py", description="Distributed PC-DARTS architecture search (Horovod). "
                  "Defaults are the PC-DARTS CIFAR-10 recipe; learning rates are for the global batch.")
    p.add_argument("--preset", choices=sorted(SEARCH_PRESETS), default=None,
                   help="recipe defaults: cifar10 (the defaults below) or imagenet (K=2, 224-px stem, per-class "
                        "sample)")
    groups = add_run_args(p, "search", "search")
    replicas.add_replica_args(groups["distributed"])
    p.set_defaults(batch_size=256, lr=0.1, epochs=50, init_channels=16, layers=8, seed=2)
    g = p.add_argument_group("architecture search (PC-DARTS)")
    a = g.add_argument
    a("--arch-lr", type=positive_float, default=6e-4)
    a("--arch-weight-decay", type=nonneg_float, default=1e-3)
    a("--arch-start-epoch", type=nonneg_int, default=15)
    a("--train-portion", type=fraction, default=0.5)
    a("--class-sample-fractions", type=fraction, nargs=2, metavar=("WEIGHTS", "ARCH"), default=None,
      help="per-class sample of the training set instead of the portion split (ImageNet recipe: 0.1 0.025)")
    a("--partial-k", type=positive_int, default=4)
    a("--stem", choices=["cifar", "imagenet"], default="cifar")
    a("--skip-cap", type=nonneg_int, default=None, metavar="N",
      help="P-DARTS (Chen et al., ICCV 2019): the derived normal cell keeps at most N skip_connect, the strongest; "
           "the other edges take their next-best operation (default: no cap, the PC-DARTS derivation)")
    a("--arch-reg", choices=ARCH_REGS, default=None,
      help="β-DARTS (Ye et al., CVPR 2022): beta-decay adds λ · mean over the edges of logsumexp(α) to the "
           "architecture loss, λ rising linearly with the epoch from 0 towards --arch-reg-weight (the schedule of "
           "the β-DARTS code) (default: none)")
    a("--arch-reg-weight", type=nonneg_float, default=None, metavar="W",
      help=f"λ at the end of the search for --arch-reg (default {DEFAULT_WEIGHT:g}, the β-DARTS code's)")
    a("--early-stop", type=early_stop_rule, action="append", default=[], metavar="skip:N|stable:K",
      help="DARTS+ (Liang et al., 2019): end the search once the derived normal cell holds >= N skip_connect "
           "(skip:N), or once the derived genotype has not changed for K epochs of architecture training "
           "(stable:K); repeatable; the genotype at that epoch is the result, and the log and genotype.json say why")
    a("--margin-threshold", type=fraction, default=DEFAULT_THRESHOLD, metavar="T",
      help="the report (OUTPUT_DIR/report.md) and the log's last line call an edge undecided when the top two "
           "entries of its softmax(alpha) differ by less than T (default %(default)s)")
    fast = groups["fast"].add_argument
    fast("--batched-edges", action="store_true", help="compute the edges of a cell that read states ready at the "
         "same time as one set of grouped convolutions (same parameters and results, fewer kernels)")
    fast("--fp64", action="store_true",
         help="verification mode: compute in float64 (slow); rank-count equivalence checks use it so that float32 "
              "rounding, amplified by BN on near-constant channels, cannot hide or fake a difference")
    p.add_argument("--trace-indices", default=None, help=argparse.SUPPRESS)  # testing aid: per-rank sample indices
    return p


def parse_args(argv=None):
    args = apply_preset(build_parser(), argv, SEARCH_PRESETS)
    if args.arch_start_epoch >= args.epochs:
        raise UsageError(f"--arch-start-epoch {args.arch_start_epoch} is not before the last epoch "
                         f"(--epochs {args.epochs}): the architecture would never be trained")
    if args.layers < 3:
        raise UsageError(f"--layers {args.layers}: the search network needs at least 3 (a normal cell and the two "
                         f"reduction cells, at layers/3 and 2*layers/3)")
    if args.init_channels % args.partial_k:
        raise UsageError(f"--partial-k {args.partial_k} must divide --init-channels {args.init_channels} (each edge "
                         f"computes 1/K of the channels)")
    if args.arch_reg_weight is not None and args.arch_reg is None:
        raise UsageError(f"--arch-reg-weight {args.arch_reg_weight:g} has no effect without --arch-reg beta-decay")
    check_run_args(args)
    replicas.check_replica_args(args)
    return args


def model_config(args, num_classes: int) -> dict:
    return dict(init_channels=args.init_channels, layers=args.layers, partial_k=args.partial_k,
                stem=args.stem, num_classes=num_classes, dataset=args.dataset)


class Searcher(RunLoop):
    """Holds the model, optimizers and data pipeline of one rank; `run()` executes the whole search."""

    CHECKPOINT_FORMAT = CHECKPOINT_FORMAT

    def __init__(self, args):
        self._setup(args, "search", "search")
        a = args
        self._prepare_data()
        torch.manual_seed(a.seed)
        random.seed(a.seed)
        self.model = SearchNetwork(a.init_channels, self.num_classes, a.layers, partial_k=a.partial_k,
                                   stem=a.stem, batched_edges=a.batched_edges).to(self.device)
        self.dtype = torch.float64 if a.fp64 else torch.float32
        if a.fp64:
            self.model.double()
        self._fast_model(fastpath.compile_cells)
        self.criterion = nn.CrossEntropyLoss()
        self.arch_reg = make_arch_reg(a.arch_reg, a.arch_reg_weight, self.model, a.epochs)
        self.arch_params = self.model.arch_parameters()
        self.weights = list(self.model.weight_parameters())
        w_opt, self.a_opt = search_optimizers(self.model, a.lr, a.momentum, a.weight_decay, a.arch_lr,
                                              a.arch_weight_decay)
        self.w_opt = self._weight_optimizer(w_opt, self.model.named_weight_parameters(), "w_grads")
        average_arch = lambda g: dist.grouped_average(g, name="arch_grads")  # noqa: E731
        if a.cuda_graph:
            self.step = fastpath.GraphedSearchStep(
                self.model, self.criterion, self.arch_params, self.weights, self.a_opt, self.w_opt, a.grad_clip,
                average_arch, lambda g: dist.grouped_average(g, name="w_grads"), self.autocast_dtype,
                a.channels_last, freeze_weights=a.compile, arch_reg=self.arch_reg)
        else:
            self.step = SearchStep(self.model, self.criterion, self.arch_params, self.weights, self.a_opt,
                                   self.w_opt, a.grad_clip, average_arch, self.autocast_dtype, self.scaler,
                                   freeze_weights=a.compile, channels_last=a.channels_last, arch_reg=self.arch_reg)
        # last_genotype: derived at the end of the epoch before (diagnostics' genotype_changed)
        # stable_epochs: epochs of architecture training in a row that left the genotype unchanged (--early-stop)
        self.start = dict(epoch=0, arch_pass=0, arch_sample=0, global_step=0, last_genotype=None, stable_epochs=0)
        self.early_stop = None  # why the search ended early: genotype.json's "early_stop"
        self._start()

    # --- setup ----------------------------------------------------------------------------------------------
    def _prepare_data(self):
        a = self.args
        bundle = load_dataset(a.dataset, a.data_dir, download=a.download, image_size=a.image_size,
                              need_test=False, seed=a.seed, synthetic_size=a.synthetic_size, **self._data_sync())
        self.num_classes = bundle.num_classes
        n = len(bundle.train)
        if a.class_sample_fractions:
            targets = getattr(bundle.train, "targets", None)
            w_idx, a_idx = class_sample_split(targets, a.class_sample_fractions[0], a.class_sample_fractions[1],
                                              a.seed)
        else:
            w_idx, a_idx = search_split(n, a.train_portion)
        for name, idx in (("weight", w_idx), ("architecture", a_idx)):
            if len(idx) < a.batch_size:
                raise UsageError(f"the {name} half has {len(idx)} images, fewer than one global batch "
                                 f"(--batch-size {a.batch_size}): lower the batch size or use more data")
        tf_train = make_transform(bundle, train=True, augment=not a.no_augment, dataset=a.dataset)
        tf_eval = make_transform(bundle, train=False, augment=False, dataset=a.dataset)
        self.weight_set = SeededView(bundle.train, w_idx, tf_train, a.seed, stream=0)
        self.arch_set = SeededView(bundle.train, a_idx, tf_train, a.seed, stream=1)
        self.valid_set = SeededView(bundle.train, a_idx, tf_eval, a.seed, stream=2)
        self.device_images = None
        if a.gpu_data:  # both halves on the device as uint8; batches augmented there, identical to the loader's
            spec = fastpath.augment_spec(bundle, True, not a.no_augment, a.dataset)
            dt = torch.float64 if a.fp64 else torch.float32
            self.device_images = {id(v): fastpath.DeviceImages(v, spec, self.device, dt, a.channels_last)
                                  for v in (self.weight_set, self.arch_set)}
        self.image_size = bundle.image_size

    def _config(self) -> dict:
        return model_config(self.args, self.num_classes)

    def _load(self, ckpt: dict, path: str) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.w_opt.load_state_dict(ckpt["w_opt"])
        self.a_opt.load_state_dict(ckpt["a_opt"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        arch_sample = ckpt.get("arch_sample", int(ckpt["arch_pos"]) * self.args.batch_size)
        self.start = dict(epoch=int(ckpt["epoch"]), arch_pass=int(ckpt["arch_pass"]), arch_sample=int(arch_sample),
                          global_step=int(ckpt["global_step"]), last_genotype=ckpt.get("last_genotype"),
                          stable_epochs=int(ckpt.get("stable_epochs", 0)))
        torch.set_rng_state(ckpt["rng_torch"])
        self.resumed_from = path

    def _build_loaders(self):
        """Everything that depends on the number of ranks (rebuilt after an elastic reset)."""
        a = self.args
        self.steps_per_epoch = self._steps_per_epoch(len(self.weight_set))
        self._arch_iter = None
        n_valid = eval_count(len(self.valid_set), a.batch_size, a.eval_steps)
        self.v_loader = make_loader(self.valid_set, self.local_batch, EvalShardSampler(n_valid, self.world, self.rank),
                                    a.workers, drop_last=False, pin=self.device.type == "cuda")

    def _half(self, dataset, seed: int, epoch: int, start: int):
        images = self.device_images[id(dataset)] if self.device_images is not None else None
        return self._batches(dataset, seed, epoch, start, images)

    def _arch_batch(self, st):
        """Next batch of the architecture half from a persistent iterator; a new shuffled pass when it ends."""
        while True:
            if self._arch_iter is None:
                self.arch_set.set_epoch(st.arch_pass)
                self._arch_iter = iter(self._half(self.arch_set, self.args.seed + 1, st.arch_pass, st.arch_sample))
            try:
                batch = next(self._arch_iter)
                st.arch_sample += self.local_batch * self.world
                return batch
            except StopIteration:
                self._arch_iter = None
                st.arch_pass += 1
                st.arch_sample = 0

    # --- epochs ---------------------------------------------------------------------------------------------
    def train_epoch(self, st):
        """Train the rest of epoch `st.epoch` from step `st.step` (an elastic restart continues mid-epoch): per
        step, from `--arch-start-epoch` on, an architecture step, then a weight step."""
        a = self.args
        self.model.train()
        epoch = st.epoch
        self.weight_set.set_epoch(epoch)
        loader = self._half(self.weight_set, a.seed, epoch, st.pos)
        arch_on = epoch >= a.arch_start_epoch
        if self.arch_reg is not None:
            self.arch_reg.set_epoch(epoch)
        trace = [] if a.trace_indices else None
        # loss sum, correct, images, arch images: of this rank since the last flush
        self._epoch_begins(4, on_flush=lambda: self._write_trace(trace))
        lr = self.set_lr(epoch)
        progress = self._progress(st)
        step_images = self.local_batch * self.world * (2 if arch_on else 1)
        for x, y, idx in loader:
            if st.step >= self.steps_per_epoch:
                break
            if a.lr_per_step:
                lr = self.set_lr(epoch + st.step / self.steps_per_epoch)
            x, y = x.to(self.device, self.dtype, non_blocking=True), y.to(self.device, non_blocking=True)
            if arch_on:
                xa, ya, ia = self._arch_batch(st)
                self.step.arch_step(xa.to(self.device, self.dtype, non_blocking=True),
                                    ya.to(self.device, non_blocking=True))
                self.sums[3] += len(ya)
                if trace is not None:
                    trace.append({"epoch": epoch, "step": st.step, "kind": "arch", "idx": ia.tolist()})
            logits, loss, norm = self.step.weight_step(x, y)
            if trace is not None:
                trace.append({"epoch": epoch, "step": st.step, "kind": "weight", "idx": idx.tolist()})
            loss_v, correct, w_ok, *a_ok = step_values([loss, (logits.argmax(1) == y).sum(), norm.isfinite()],
                                                       *([self.arch_params] if arch_on else []))
            check_finite(all(a_ok), "arch", epoch, st.step + 1)
            # under --amp a non-finite norm is an overflow step that the loss scaler skips, not divergence
            check_finite(w_ok or self.scaler is not None, "train", epoch, st.step + 1)
            self.sums[0] += loss_v * len(y)
            self.sums[1] += correct
            self.sums[2] += len(y)
            self._step_done(st, progress, loss_v, step_images, lr)
        progress.close()
        self._flush(st)
        return lr

    def _write_trace(self, trace):
        if trace:
            os.makedirs(self.args.trace_indices, exist_ok=True)
            with open(os.path.join(self.args.trace_indices, f"rank{self.rank}.jsonl"), "a") as f:
                for rec in trace:
                    f.write(json.dumps(rec) + "\n")
            trace.clear()

    @torch.no_grad()
    def validate(self):
        """Search-validation on the architecture half, every sample exactly once over all ranks."""
        self.model.eval()
        loss_sum = correct = count = 0.0
        for x, y, _ in self.v_loader:
            x, y = x.to(self.device, self.dtype), y.to(self.device)
            # --compile: a last batch of another size runs eagerly rather than compiling every cell again
            with autocast(self.device.type, self.step.autocast_dtype), \
                    fastpath.uncompiled(self.args.compile and len(x) != self.local_batch):
                logits = self.model(x)
            loss_sum += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
            correct += accuracy_counts(logits, y, (1,))[0]
            count += len(y)
        s_loss, s_correct, s_count = dist.sum_metrics([loss_sum, correct, count], "valid_m")
        return s_loss / max(s_count, 1), 100.0 * s_correct / max(s_count, 1)

    def _checked_tensors(self) -> dict:
        return {"weights": self.weights, "arch": self.arch_params}

    def _checkpoint(self, st) -> dict:
        a = self.args
        return dict(format=CHECKPOINT_FORMAT, config=model_config(a, self.num_classes), epoch=st.epoch,
                    model=self.model.state_dict(), w_opt=self.w_opt.state_dict(), a_opt=self.a_opt.state_dict(),
                    scaler=self.scaler.state_dict() if self.scaler is not None else None,
                    arch_pass=st.arch_pass, arch_pos=st.arch_sample // a.batch_size, arch_sample=st.arch_sample,
                    global_step=st.global_step, last_genotype=st.last_genotype, stable_epochs=st.stable_epochs,
                    rng_torch=torch.get_rng_state(), world_size=self.world, args=jsonable(vars(a)))

    def _write_epoch(self, out, rec: dict, st) -> None:
        """Rank 0's writes at an epoch's end: the metrics row, genotype.json, checkpoint.pt."""
        out.metrics(rec)
        self.write_genotype()
        self._save(st)

    def genotype(self):
        return self.model.genotype(skip_cap=self.args.skip_cap)

    def write_genotype(self):
        if not dist.is_root():
            return
        save_genotype(self.genotype(), os.path.join(self.args.output_dir, "genotype.json"),
                      extra=self.model.arch_state() | derivation_rule(self.args.skip_cap)
                      | ({"early_stop": self.early_stop} if self.early_stop else {}))

    # --- the whole search (the loop's frame: loop.RunLoop) ------------------------------------------------
    def _stateful(self) -> dict:
        d = {"model": self.model, "w_opt": self.w_opt, "a_opt": self.a_opt}
        return d | ({"scaler": self.scaler} if self.scaler is not None else {})

    def _begin(self, st):
        self._arch_iter = None  # a (re)started loop: the arch iterator follows the synced position
        if st.last_genotype is None:  # a fresh search: the genotype of the initial architecture
            st.last_genotype = to_dict(self.genotype())
        super()._begin(st)

    def _output_args(self) -> dict:
        return jsonable(vars(self.args)) | {"world_size": self.world}

    def _start_line(self) -> str:
        a = self.args
        n_w = sum(p.numel() for p in self.weights)
        return (f"search: {self.world} rank(s) on {self.device.type}, global batch {a.batch_size} "
                f"({self.local_batch}/rank), {self.steps_per_epoch} steps/epoch, {n_w} weights, "
                f"weight/arch images {len(self.weight_set)}/{len(self.arch_set)}, "
                f"{self.grad_allreduce} gradient allreduce, "
                f"{'bf16 autocast, ' if a.bf16 else ''}{self._compile_note()}output {a.output_dir}")

    def _compile_note(self) -> str:
        return fastpath.compile_note(self.args.compile_backend if self.args.compile else None, self.device, "cells")

    def _end_epoch(self, st, epoch: int, lr: float) -> dict:
        """Search-validation, the checks, and the epoch's metrics row."""
        v_loss, v_acc = self.validate()
        self._evaluated(st, epoch, v_loss)
        s_loss, s_correct, s_count, s_arch = st.sums
        geno = self.genotype()
        previous, st.last_genotype = st.last_genotype, to_dict(geno)
        changed = previous != st.last_genotype
        if epoch >= self.args.arch_start_epoch:
            st.stable_epochs = 0 if changed else st.stable_epochs + 1
        return dict(epoch=epoch, lr=lr, train_loss=s_loss / max(s_count, 1),
                    train_acc=100.0 * s_correct / max(s_count, 1), valid_loss=v_loss, valid_acc=v_acc,
                    images_per_s=(s_count + s_arch) / max(st.train_time, 1e-9),
                    genotype=to_dict(geno), arch=self.model.arch_state(),
                    diagnostics=search_diagnostics(self.model, geno, changed)) | self._arch_reg_row(epoch)

    def _arch_reg_row(self, epoch: int) -> dict:
        """The metrics row's `arch_reg`: the regularizer and its λ in this epoch."""
        if self.arch_reg is None:
            return {}
        return {"arch_reg": {"name": self.args.arch_reg, "lambda": self.arch_reg.at(epoch)}}

    def _epoch_line(self, rec: dict) -> str:
        return (f"epoch {rec['epoch'] + 1}/{self.args.epochs} lr {rec['lr']:.5f} train loss {rec['train_loss']:.4f} "
                f"acc {rec['train_acc']:.2f} | search-valid loss {rec['valid_loss']:.4f} acc {rec['valid_acc']:.2f} | "
                f"{rec['epoch_time_s']:.1f}s, {rec['images_per_s']:.0f} img/s")

    def _done_early(self, st, rec: dict) -> bool:
        """--early-stop: whether a rule holds after this epoch (from the architecture: the same on every rank)."""
        if rec["epoch"] < self.args.arch_start_epoch:
            return False
        held = early_stop_holds(self.args.early_stop, rec["diagnostics"]["normal_skips"], st.stable_epochs)
        if held is None:
            return False
        rule, why = held
        self.early_stop = dict(rule=rule, epochs_run=rec["epoch"] + 1, reason=why)
        self.out.info(f"early stop after epoch {rec['epoch'] + 1}/{self.args.epochs} (--early-stop {rule}): {why}")
        return True

    def _finish(self, st, final: dict) -> None:
        a, out = self.args, self.out
        self._write_outputs(self.write_genotype)
        geno = self.genotype()
        if dist.is_root():
            out.info(f"genotype: {geno}")
            out.info(f"all {self.world} rank(s) hold identical parameters (crc32 weights {final['weights']:08x}, "
                     f"arch {final['arch']:08x})")
            if self.elastic:
                out.info(f"elastic: {st.resets} reset(s), {st.steps_redone} step(s) redone")
            out.info(f"wrote {os.path.join(a.output_dir, 'genotype.json')}, metrics.jsonl, checkpoint.pt")
            # RUN/report.md with the cell pictures; the last line: a warning when edges are undecided
            log_report(a.output_dir, a.margin_threshold, out)


def main(argv=None) -> int:
    args = parse_args(argv)
    return replicas.run(args, lambda: Searcher(args).run())
