"""The distributed PC-DARTS search: `python bin/train_search.py ...` under horovodrun, mpirun or alone.

Order of one step (first-order PC-DARTS): from `--arch-start-epoch` on, an architecture step on a batch of the
architecture half (Adam over alphas and betas; gradients by torch.autograd.grad, averaged over ranks with a
named grouped allreduce; no weight gradient is produced), then a weight step on a batch of the weight half
(hvd.DistributedOptimizer over the weights only; gradients clipped after averaging).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import torch
import torch.nn as nn

from . import distributed as dist
from . import fastpath
from .checkpoint import check_config, load_checkpoint
from .cli import (
    ArgParser,
    add_output_args,
    add_quick_run_args,
    apply_preset,
    eval_count,
    fraction,
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
    class_sample_split,
    load_dataset,
    make_batch_loader,
    make_loader,
    make_transform,
    search_split,
)
from .elastic import (
    RunLoop,
    add_elastic_args,
    check_elastic_args,
    local_checks_only,
    per_rank_batch,
)
from .errors import UsageError
from .genotypes import save_genotype, to_dict
from .models import SearchNetwork
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
    a = p.add_argument
    a("--preset", choices=sorted(SEARCH_PRESETS), default=None,
      help="recipe defaults: cifar10 (the defaults below) or imagenet (K=2, 224-px stem, per-class sample)")
    a("--dataset", choices=DATASETS, default="cifar10")
    a("--data-dir", default="./data")
    a("--download", action="store_true", help="download CIFAR if missing (one process per node)")
    a("--image-size", type=positive_int, default=None, help="imagefolder/synthetic image size")
    a("--synthetic-size", type=positive_int, default=2048, help="synthetic: number of training images")
    a("--batch-size", type=positive_int, default=256, help="GLOBAL batch, split evenly over the ranks")
    a("--lr", type=positive_float, default=0.1)
    a("--lr-min", type=nonneg_float, default=0.0)
    a("--lr-schedule", choices=["cosine", "linear", "step"], default="cosine")
    a("--lr-per-step", action="store_true", help="update the learning rate every step (default: every epoch)")
    a("--momentum", type=nonneg_float, default=0.9)
    a("--weight-decay", type=nonneg_float, default=3e-4)
    a("--epochs", type=positive_int, default=50)
    a("--warmup-epochs", type=nonneg_float, default=0.0)
    a("--arch-lr", type=positive_float, default=6e-4)
    a("--arch-weight-decay", type=nonneg_float, default=1e-3)
    a("--arch-start-epoch", type=nonneg_int, default=15)
    a("--train-portion", type=fraction, default=0.5)
    a("--class-sample-fractions", type=fraction, nargs=2, metavar=("WEIGHTS", "ARCH"), default=None,
      help="per-class sample of the training set instead of the portion split (ImageNet recipe: 0.1 0.025)")
    a("--init-channels", type=positive_int, default=16)
    a("--layers", type=positive_int, default=8)
    a("--partial-k", type=positive_int, default=4)
    a("--stem", choices=["cifar", "imagenet"], default="cifar")
    a("--grad-clip", type=nonneg_float, default=5.0, help="0 disables clipping")
    a("--seed", type=nonneg_int, default=2)
    a("--workers", type=nonneg_int, default=2, help="data loader processes per rank")
    a("--sync-bn", action="store_true", help="batch norm statistics of the global batch")
    a("--fp16-allreduce", action="store_true", help="compress weight gradients to fp16 for the allreduce")
    a("--amp", action="store_true", help="mixed precision (CUDA only)")
    a("--bf16", action="store_true", help="bfloat16 autocast of the forward passes (weights, gradients and "
      "optimizers stay float32; no loss scaling); works with --cuda-graph, also on the CPU")
    a("--cuda-graph", action="store_true", help="fast path (CUDA only): replay the forward+backward of the arch "
      "and weight steps as CUDA graphs; gradient averaging and optimizer steps stay outside (benchmarks/)")
    a("--channels-last", action="store_true", help="fast path: NHWC memory format for weights and images")
    a("--batched-edges", action="store_true", help="fast path: compute the edges of a cell that read states "
      "ready at the same time as one set of grouped convolutions (same parameters and results, fewer kernels)")
    a("--compile", action="store_true", help="fast path (with --batched-edges): torch.compile each search cell "
      "(fused batch norm and elementwise kernels); compiles every distinct cell once during the first steps; "
      "composes with --cuda-graph and --channels-last")
    a("--gpu-data", action="store_true", help="fast path: keep both halves of the training set on the device as "
      "uint8 and augment a batch there (the same crops and flips as the loader; tensor datasets only)")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a("--grad-allreduce", choices=dist.GRAD_ALLREDUCE_MODES, default="auto",
      help="how the weight gradients are averaged over the ranks: overlap = one allreduce per tensor started during "
           "backward (hvd.DistributedOptimizer), flat = all of them as one tensor after backward; auto = flat on "
           "the CPU (nothing to overlap with there; 0.81 -> 0.94 scaling efficiency on 2 ranks), overlap on GPUs")
    a("--fp64", action="store_true",
      help="verification mode: compute in float64 (slow); rank-count equivalence checks use it so that float32 "
           "rounding, amplified by BN on near-constant channels, cannot hide or fake a difference")
    a("--no-augment", action="store_true")
    add_output_args(p, "search")
    a("--trace-indices", default=None, help=argparse.SUPPRESS)  # testing aid: per-rank sample indices
    a("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # testing aid: aot_eager compiles quickly
    add_quick_run_args(p)
    add_elastic_args(p)
    add_preemption_args(p)
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
    if args.lr_min > args.lr:
        raise UsageError(f"--lr-min {args.lr_min} is larger than --lr {args.lr}")
    if args.warmup_epochs >= args.epochs:
        raise UsageError(f"--warmup-epochs {args.warmup_epochs:g} must be less than --epochs {args.epochs}")
    check_elastic_args(args)
    return args


def model_config(args, num_classes: int) -> dict:
    return dict(init_channels=args.init_channels, layers=args.layers, partial_k=args.partial_k,
                stem=args.stem, num_classes=num_classes, dataset=args.dataset)


class Searcher(RunLoop):
    """Holds the model, optimizers and data pipeline of one rank; `run()` executes the whole search."""

    def __init__(self, args):
        self.args = args
        a = args
        dist.init(cpu_tuning=not a.sync_bn)
        self.world, self.rank = dist.size(), dist.rank()
        self.local_batch, _ = per_rank_batch(a.batch_size, self.world, strict=True)
        if a.amp and a.bf16:
            raise UsageError("--amp (float16 with loss scaling) and --bf16 exclude each other: pick one")
        self.device = pick_device(a)
        if a.output_dir is None:
            a.output_dir = default_output_dir("search")
        # elastic: no collective before the elastic loop (a worker joining later would meet it alone); the
        # loop's first sync makes every rank equal to rank 0
        self.elastic = bool(a.elastic)
        self._prepare_data()
        torch.manual_seed(a.seed)
        random.seed(a.seed)
        self.model = SearchNetwork(a.init_channels, self.num_classes, a.layers, partial_k=a.partial_k,
                                   stem=a.stem, batched_edges=a.batched_edges).to(self.device)
        self.dtype = torch.float64 if a.fp64 else torch.float32
        if a.fp64:
            for flag in ("amp", "bf16"):
                if getattr(a, flag):
                    raise UsageError(f"--fp64 and --{flag} exclude each other")
            self.model.double()

        if a.sync_bn and self.world > 1:
            dist.convert_sync_batchnorm(self.model)
        fastpath.check_fast_flags(a, self.device, self.world)
        if a.channels_last:
            fastpath.to_channels_last(self.model)
        if a.compile:
            fastpath.compile_cells(self.model, backend=a.compile_backend)
        self.graphed = None  # --cuda-graph: fastpath.GraphedSearchStep, captured at the first step
        self.criterion = nn.CrossEntropyLoss()
        self.arch_params = self.model.arch_parameters()
        self.weights = list(self.model.weight_parameters())
        w_opt = torch.optim.SGD(self.weights, lr=a.lr, momentum=a.momentum,
                                weight_decay=a.weight_decay)
        # --cuda-graph: a plain SGD; the graphed step averages the gradients itself (hooks do not replay in a graph)
        self.grad_allreduce = dist.grad_allreduce_mode(a.grad_allreduce, self.device)
        self.w_opt = w_opt if a.cuda_graph else dist.weight_optimizer(
            w_opt, self.model.named_weight_parameters(), self.grad_allreduce, a.fp16_allreduce, name="w_grads")
        self.a_opt = torch.optim.Adam(self.arch_params, lr=a.arch_lr, betas=(0.5, 0.999),
                                      weight_decay=a.arch_weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if a.amp else None
        self.start = dict(epoch=0, arch_pass=0, arch_sample=0, global_step=0)
        self._resume()
        if not self.elastic:
            self._sync_start()
        self._build_loaders()

    # --- setup ----------------------------------------------------------------------------------------------
    def _prepare_data(self):
        a = self.args
        sync = local_checks_only() if a.elastic else dict(
            is_local_root=dist.local_rank() == 0, barrier=dist.barrier,
            agree=lambda ok: all(dist.allgather_object(bool(ok))))
        bundle = load_dataset(a.dataset, a.data_dir, download=a.download, image_size=a.image_size,
                              need_test=False, seed=a.seed, synthetic_size=a.synthetic_size, **sync)
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

    def _read_checkpoint(self, path: str) -> dict:
        a = self.args
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"checkpoint {path} is not a search checkpoint ({ckpt.get('format')!r})")
        check_config(ckpt["config"], model_config(a, self.num_classes), path)
        if ckpt["epoch"] > a.epochs:
            raise UsageError(f"checkpoint {path} is at epoch {ckpt['epoch']}, past --epochs {a.epochs}")
        return ckpt

    def _load(self, ckpt: dict, path: str) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.w_opt.load_state_dict(ckpt["w_opt"])
        self.a_opt.load_state_dict(ckpt["a_opt"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        arch_sample = ckpt.get("arch_sample", int(ckpt["arch_pos"]) * self.args.batch_size)
        self.start = dict(epoch=int(ckpt["epoch"]), arch_pass=int(ckpt["arch_pass"]), arch_sample=int(arch_sample),
                          global_step=int(ckpt["global_step"]))
        torch.set_rng_state(ckpt["rng_torch"])
        self.resumed_from = path

    def _build_loaders(self):
        """Everything that depends on the number of ranks (rebuilt after an elastic reset)."""
        a = self.args
        self.loader_kw = dict(workers=a.workers, pin=self.device.type == "cuda")
        self.steps_per_epoch = len(self.weight_set) // (self.local_batch * self.world)
        if a.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, a.steps_per_epoch)
        self._arch_iter = None
        n_valid = eval_count(len(self.valid_set), a.batch_size, a.eval_steps)
        self.v_sampler = EvalShardSampler(n_valid, self.world, self.rank)
        self.v_loader = make_loader(self.valid_set, self.local_batch, self.v_sampler, drop_last=False,
                                    **self.loader_kw)

    def _batches(self, dataset, seed: int, epoch: int, start: int):
        """Loader of the global batches of one pass from global sample position `start` (GlobalBatchSampler:
        the same global batches for any number of ranks, resumable anywhere)."""
        sampler = GlobalBatchSampler(len(dataset), seed, epoch, self.world, self.rank, self.local_batch, start)
        if self.device_images is not None:
            return fastpath.DeviceLoader(self.device_images[id(dataset)], batch_sampler=sampler)
        return make_batch_loader(dataset, sampler, self.loader_kw["workers"], self.loader_kw["pin"])

    def _arch_batch(self, st):
        """Next batch of the architecture half from a persistent iterator; a new shuffled pass when it ends."""
        while True:
            if self._arch_iter is None:
                self.arch_set.set_epoch(st.arch_pass)
                self._arch_iter = iter(self._batches(self.arch_set, self.args.seed + 1, st.arch_pass,
                                                     st.arch_sample))
            try:
                batch = next(self._arch_iter)
                st.arch_sample += self.local_batch * self.world
                return batch
            except StopIteration:
                self._arch_iter = None
                st.arch_pass += 1
                st.arch_sample = 0

    # --- one step -------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.args.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.scaler is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast("cuda", dtype=torch.float16)

    def _graphed_step(self):
        if self.graphed is None:
            self.graphed = fastpath.GraphedSearchStep(
                self.model, self.criterion, self.arch_params, self.weights, self.a_opt, self.w_opt,
                self.args.grad_clip, average_arch=lambda g: dist.grouped_average(g, name="arch_grads"),
                average_weights=lambda g: dist.grouped_average(g, name="w_grads"),
                channels_last=self.args.channels_last, freeze_weights=self.args.compile,
                autocast_dtype=torch.bfloat16 if self.args.bf16 else None)
        return self.graphed

    def arch_step(self, x, y):
        if self.args.cuda_graph:
            return float(self._graphed_step().arch_step(x, y))
        self.a_opt.zero_grad(set_to_none=True)
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        # compiled cells: weights frozen, else the compiled backward would compute their gradients too
        with fastpath.frozen(self.weights if self.args.compile else []):
            with self._autocast():
                loss = self.criterion(self.model(x), y)
            grads = torch.autograd.grad(loss * scale, self.arch_params)
        grads = dist.grouped_average([g / scale for g in grads], name="arch_grads")
        if self.scaler is not None and not all(torch.isfinite(g).all() for g in grads):
            return float(loss.detach())  # overflow: skip, on every rank alike (the grads were averaged)
        for p, g in zip(self.arch_params, grads):
            p.grad = g
        self.a_opt.step()
        return float(loss.detach())

    def weight_step(self, x, y):
        a = self.args
        if a.cuda_graph:
            return self._graphed_step().weight_step(x, y)
        self.w_opt.zero_grad()
        with self._autocast():
            logits = self.model(x)
            loss = self.criterion(logits, y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.w_opt.synchronize()
            self.scaler.unscale_(self.w_opt)
        else:
            loss.backward()
            self.w_opt.synchronize()
        norm = fastpath.clip_gradients(self.weights, a.grad_clip)
        with self.w_opt.skip_synchronize():
            if self.scaler is not None:
                self.scaler.step(self.w_opt)
                self.scaler.update()
            else:
                self.w_opt.step()
        return logits.detach(), loss.detach(), norm

    def set_lr(self, epoch_pos: float):
        a = self.args
        lr = lr_at(epoch_pos, a.lr, a.lr_min, a.epochs, a.warmup_epochs, a.lr_schedule)
        for g in self.w_opt.param_groups:
            g["lr"] = lr
        return lr

    # --- epochs ---------------------------------------------------------------------------------------------
    def train_epoch(self, st):
        """Train the rest of epoch `st.epoch` from step `st.step` (an elastic restart continues mid-epoch)."""
        a = self.args
        self.model.train()
        epoch = st.epoch
        self.weight_set.set_epoch(epoch)
        loader = self._batches(self.weight_set, a.seed, epoch, st.pos)
        arch_on = epoch >= a.arch_start_epoch
        sums = [0.0, 0.0, 0.0, 0.0]  # loss sum, correct, images, arch images - of this rank since the last flush
        lr = self.set_lr(epoch)
        trace = [] if a.trace_indices else None
        progress = Progress(progress_mode(a.progress), epoch, a.epochs, self.steps_per_epoch, st.step)
        step_images = self.local_batch * self.world * (2 if arch_on else 1)
        t0 = time.time()
        for x, y, idx in loader:
            if st.step >= self.steps_per_epoch:
                break
            if a.lr_per_step:
                lr = self.set_lr(epoch + st.step / self.steps_per_epoch)
            x, y = x.to(self.device, self.dtype, non_blocking=True), y.to(self.device, non_blocking=True)
            if arch_on:
                xa, ya, ia = self._arch_batch(st)
                self.arch_step(xa.to(self.device, self.dtype, non_blocking=True), ya.to(self.device, non_blocking=True))
                sums[3] += len(ya)
                if trace is not None:
                    trace.append({"epoch": epoch, "step": st.step, "kind": "arch", "idx": ia.tolist()})
            logits, loss, norm = self.weight_step(x, y)
            if trace is not None:
                trace.append({"epoch": epoch, "step": st.step, "kind": "weight", "idx": idx.tolist()})
            loss_v, correct, w_ok, *a_ok = step_values([loss, (logits.argmax(1) == y).sum(), norm.isfinite()],
                                                       *([self.arch_params] if arch_on else []))
            check_finite(all(a_ok), "arch", epoch, st.step + 1)
            # under --amp a non-finite norm is an overflow step that the loss scaler skips, not divergence
            check_finite(w_ok or self.scaler is not None, "train", epoch, st.step + 1)
            n = len(y)
            sums[0] += loss_v * n
            sums[1] += correct
            sums[2] += n
            st.step += 1
            st.pos += self.local_batch * self.world
            st.global_step += 1
            self.live_steps += 1
            progress.update(loss_v, step_images, lr)
            if self._commit_due(st):
                sums = self._flush(st, sums, time.time() - t0)
                t0 = time.time()
                self._write_trace(trace)
                st.commit()
            if self._stop_due(st):
                self._flush(st, sums, time.time() - t0)
                self._write_trace(trace)
                self._stop(st)
        progress.close()
        self._flush(st, sums, time.time() - t0)
        self._write_trace(trace)
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
            with self._autocast(), fastpath.uncompiled(self.args.compile and len(x) != self.local_batch):
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
                    global_step=st.global_step, rng_torch=torch.get_rng_state(), world_size=self.world,
                    args=_jsonable(vars(a)))

    def _write_epoch(self, out, rec: dict, st) -> None:
        """Rank 0's writes at an epoch's end: the metrics row, genotype.json, checkpoint.pt."""
        out.metrics(rec)
        self.write_genotype()
        self._save(st)

    def write_genotype(self):
        if not dist.is_root():
            return
        geno = self.model.genotype()
        save_genotype(geno, os.path.join(self.args.output_dir, "genotype.json"), extra=self.model.arch_state())
        return geno

    # --- the whole search (the loop's frame: elastic.RunLoop) ---------------------------------------------
    def _stateful(self) -> dict:
        d = {"model": self.model, "w_opt": self.w_opt, "a_opt": self.a_opt}
        return d | ({"scaler": self.scaler} if self.scaler is not None else {})

    def _begin(self, st):
        self._arch_iter = None  # a (re)started loop: the arch iterator follows the synced position
        super()._begin(st)

    def _output_args(self) -> dict:
        return _jsonable(vars(self.args)) | {"world_size": self.world}

    def _start_line(self) -> str:
        a = self.args
        n_w = sum(p.numel() for p in self.weights)
        return (f"search: {self.world} rank(s) on {self.device.type}, global batch {a.batch_size} "
                f"({self.local_batch}/rank), {self.steps_per_epoch} steps/epoch, {n_w} weights, "
                f"weight/arch images {len(self.weight_set)}/{len(self.arch_set)}, "
                f"{'graphed' if a.cuda_graph else self.grad_allreduce} gradient allreduce, "
                f"{'bf16 autocast, ' if a.bf16 else ''}{self._compile_note()}output {a.output_dir}")

    def _compile_note(self) -> str:
        return fastpath.compile_note(self.args.compile_backend if self.args.compile else None, self.device, "cells")

    def _epochs(self, st):
        a = self.args
        out = self.out
        while st.epoch < a.epochs:
            epoch = st.epoch
            t0 = time.time()
            lr = self.train_epoch(st)
            dist.average_buffers(self.model)  # identical BN statistics everywhere before evaluating/saving
            v_loss, v_acc = self.validate()
            check_finite(math.isfinite(v_loss), "valid", epoch, self.steps_per_epoch)
            self._consistency(f"end of epoch {epoch}")
            s_loss, s_correct, s_count, s_arch = st.sums
            geno = self.model.genotype()
            rec = dict(epoch=epoch, lr=lr, train_loss=s_loss / max(s_count, 1),
                       train_acc=100.0 * s_correct / max(s_count, 1), valid_loss=v_loss, valid_acc=v_acc,
                       epoch_time_s=time.time() - t0, images_per_s=(s_count + s_arch) / max(st.train_time, 1e-9),
                       world_size=self.world, genotype=to_dict(geno), arch=self.model.arch_state())
            if self.elastic:
                rec.update(resets=st.resets, steps_redone=st.steps_redone)
            out.info(f"epoch {epoch + 1}/{a.epochs} lr {lr:.5f} train loss {rec['train_loss']:.4f} "
                     f"acc {rec['train_acc']:.2f} | search-valid loss {v_loss:.4f} acc {v_acc:.2f} | "
                     f"{rec['epoch_time_s']:.1f}s, {rec['images_per_s']:.0f} img/s")
            st.epoch, st.step, st.pos, st.sums, st.train_time = epoch + 1, 0, 0, [0.0, 0.0, 0.0, 0.0], 0.0
            self._write_outputs(self._write_epoch, out, rec, st)
            st.commit()
            if st.epoch < a.epochs and self._stop_due(st):
                self._stop(st)
        final = self._consistency("end of search")
        self._write_outputs(self.write_genotype)
        geno = self.model.genotype()
        if dist.is_root():
            out.info(f"genotype: {geno}")
            out.info(f"all {self.world} rank(s) hold identical parameters (crc32 weights {final['weights']:08x}, "
                     f"arch {final['arch']:08x})")
            if self.elastic:
                out.info(f"elastic: {st.resets} reset(s), {st.steps_redone} step(s) redone")
            out.info(f"wrote {os.path.join(a.output_dir, 'genotype.json')}, metrics.jsonl, checkpoint.pt")
            _render_pictures(geno, a.output_dir, out)
        out.close()
        dist.barrier()
        return 0


def _render_pictures(geno, out_dir, out):
    try:
        from .visualize import have_graphviz, render_genotype
    except Exception:
        return
    if have_graphviz():
        try:
            files = render_genotype(geno, os.path.join(out_dir, "cells"))
            out.info(f"cell pictures: {', '.join(files)}")
        except Exception as e:  # a picture must never cost a search result
            out.info(f"cell pictures skipped ({type(e).__name__}: {e})")


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def main(argv=None) -> int:
    args = parse_args(argv)
    return Searcher(args).run()
