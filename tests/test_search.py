"""Distributed search: N ranks equal 1 rank, separation of weights/architecture, learning, resume, data paths.

Multi-rank tests launch real horovodrun / mpirun processes (Horovod's optimizer hooks only exist with size > 1).
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, assert_progress_lines, describe, horovodrun_cmd, launch, mpirun_cmd, python_exe

SCRIPT = str(REPO_ROOT / "bin" / "train_search.py")
TINY = ["--dataset", "digits", "--init-channels", "8", "--layers", "3", "--workers", "0", "--no-tensorboard",
        "--no-progress", "--eval-steps", "2"]
# two epochs of one step, each an architecture and a weight step (arch from epoch 0), global batch 32, synchronized
# BN, float64; the P-DARTS skip cap in the derivation and the β-DARTS regularization (lambda 5 in the second epoch)
EQUIV = TINY + ["--epochs", "2", "--arch-start-epoch", "0", "--batch-size", "32", "--steps-per-epoch", "1",
                "--no-augment", "--sync-bn", "--fp64", "--seed", "3", "--skip-cap", "1", "--arch-reg", "beta-decay",
                "--arch-reg-weight", "10"]


def _state(out_dir):
    ckpt = torch.load(os.path.join(out_dir, "checkpoint.pt"), weights_only=True)
    return ckpt["model"]


def _max_diffs(a, b):
    arch = max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith(("alphas", "betas")))
    weights = max(float((a[k].double() - b[k].double()).abs().max()) for k in a
                  if not k.startswith(("alphas", "betas")) and "running" not in k and "num_batches" not in k)
    return arch, weights


@pytest.fixture(scope="module")
def one_rank_equiv(tmp_path_factory):
    out = tmp_path_factory.mktemp("eq1")
    res = launch([python_exe(), SCRIPT, *EQUIV, "--output-dir", out], timeout=300)
    assert res.returncode == 0, describe(res)
    return out


@pytest.fixture(scope="module")
def two_rank_equiv(tmp_path_factory):
    """`two_rank_equiv(launcher)`: the output folder of a 2-rank EQUIV run under `launcher` (once per module).
    -overlap: the weight gradients averaged by hvd.DistributedOptimizer's hooks (the GPU default) instead of one
    flat allreduce after backward (the CPU default)."""
    runs = {}

    def get(launcher):
        if launcher not in runs:
            out = tmp_path_factory.mktemp("eq2")
            args = [SCRIPT, *EQUIV, "--output-dir", out]
            name = launcher
            if name.endswith("-overlap"):
                args += ["--grad-allreduce", "overlap"]
                name = name[: -len("-overlap")]
            if name == "mpirun":
                cmd = mpirun_cmd(2, args)
            elif name == "horovodrun-hostfile":
                cmd = horovodrun_cmd(2, args)
                i = cmd.index("-H")
                cmd[i:i + 2] = ["--hostfile", str(REPO_ROOT / "hostfiles" / "localhost")]
            else:
                cmd = horovodrun_cmd(2, args, controller=name.split("-")[1])
            res = launch(cmd, timeout=600)
            assert res.returncode == 0, describe(res)
            assert f"{'overlap' if launcher.endswith('-overlap') else 'flat'} gradient allreduce" in res.stdout
            runs[launcher] = out
        return runs[launcher]

    return get


@pytest.mark.ranks
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovodrun-gloo", "horovodrun-gloo-overlap", "horovodrun-mpi",
                                      "horovodrun-hostfile", "mpirun"])
def test_two_ranks_equal_one_rank(launcher, one_rank_equiv, two_rank_equiv):
    out = two_rank_equiv(launcher)
    two = _state(out)
    arch, weights = _max_diffs(_state(one_rank_equiv), two)
    # the arch parameters must have moved (so the comparison is not vacuous) ...
    moved = max(float((two[k] - torch.zeros_like(two[k])).abs().max()) for k in ("alphas_normal",))
    assert moved > 0
    # ... and agree with the one-rank run
    assert arch < 1e-4, f"alphas/betas differ by {arch}"
    assert weights < 1e-4, f"weights differ by {weights}"
    g1 = json.loads((out / "genotype.json").read_text())
    assert set(g1) >= {"genotype", "alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"}
    assert g1["derivation"] == {"skip_cap": 1}
    assert g1["genotype"] == json.loads((one_rank_equiv / "genotype.json").read_text())["genotype"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1] and all(m["world_size"] == 2 for m in metrics)
    assert [m["arch_reg"]["lambda"] for m in metrics] == [0.0, 5.0]
    # the diagnostics of 2 ranks are those of 1 rank
    ones = [json.loads(line) for line in (one_rank_equiv / "metrics.jsonl").read_text().splitlines()]
    for m, o in zip(metrics, ones):
        d, e = m["diagnostics"], o["diagnostics"]
        assert d["normal_skips"] == e["normal_skips"] <= 1 and d["genotype_changed"] == e["genotype_changed"]
        for cell in ("normal", "reduce"):
            for key in ("margin", "entropy"):
                assert max(abs(x - y) for x, y in zip(d[cell][key], e[cell][key])) < 1e-6, (cell, key)


@pytest.mark.ranks
@pytest.mark.parametrize("extra", [[], ["--fp16-allreduce"]], ids=["fp32", "fp16-allreduce"])
def test_flat_and_overlap_gradient_allreduce_give_the_same_run(tmp_path, extra, two_rank_equiv):
    """2 real ranks: averaging every weight gradient as one flat tensor after backward (--grad-allreduce flat)
    and one allreduce per tensor from backward hooks (overlap, hvd.DistributedOptimizer) are the same
    elementwise averages: the same final parameters and metrics, and identical parameters on every rank (fp32:
    the equivalence runs of both modes; fp16: two runs of their own, without --sync-bn)."""
    runs = {}
    for mode in ("overlap", "flat"):
        if not extra:
            out = two_rank_equiv("horovodrun-gloo" + ("-overlap" if mode == "overlap" else ""))
        else:
            out = tmp_path / mode
            args = [SCRIPT, *TINY, "--epochs", "2", "--arch-start-epoch", "0", "--batch-size", "32",
                    "--steps-per-epoch", "2", "--no-augment", "--fp64", "--seed", "3", "--grad-allreduce", mode,
                    *extra, "--output-dir", out]
            res = launch(horovodrun_cmd(2, args), timeout=600)
            assert res.returncode == 0, describe(res)
            assert f"{mode} gradient allreduce" in res.stdout, describe(res)
        assert "all 2 rank(s) hold identical parameters" in (out / "log.txt").read_text()
        runs[mode] = (_state(out), (out / "metrics.jsonl").read_text())
    (a, ma), (b, mb) = runs["overlap"], runs["flat"]
    arch, weights = _max_diffs(a, b)
    assert arch < 1e-12 and weights < 1e-12, (arch, weights)
    assert max(float((a[k] - torch.zeros_like(a[k])).abs().max()) for k in ("alphas_normal",)) > 0
    la = [json.loads(x)["train_loss"] for x in ma.splitlines()]
    lb = [json.loads(x)["train_loss"] for x in mb.splitlines()]
    assert len(la) == 2 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-12


@pytest.mark.ranks
def test_early_stop_with_two_ranks_stops_where_one_rank_stops(tmp_path):
    """--early-stop under mpirun: both ranks end after the same epoch (no rank waits on a collective the other
    skipped), with the result and the reason of the one-rank run."""
    args = [*EQUIV, "--epochs", "4", "--arch-start-epoch", "1", "--early-stop", "skip:0"]
    res = launch([python_exe(), SCRIPT, *args, "--output-dir", tmp_path / "one"], timeout=300)
    assert res.returncode == 0, describe(res)
    res = launch(mpirun_cmd(2, [SCRIPT, *args, "--output-dir", tmp_path / "two"]), timeout=300)
    assert res.returncode == 0, describe(res)
    one, two = (json.loads((tmp_path / d / "genotype.json").read_text()) for d in ("one", "two"))
    assert two["early_stop"] == one["early_stop"] and one["early_stop"]["epochs_run"] == 2
    assert two["genotype"] == one["genotype"]
    assert max(_max_diffs(_state(tmp_path / "one"), _state(tmp_path / "two"))) < 1e-4
    rows = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [0, 1]


def test_weight_optimizer_holds_no_arch_parameter_and_arch_step_changes_no_weight(tmp_path):
    """In-process (size-1 Horovod): the parameter groups are disjoint and an arch step touches only alphas/betas."""
    from hvd_pcdarts.dist.elastic import LocalState
    from hvd_pcdarts.search import Searcher, parse_args

    args = parse_args(TINY + ["--epochs", "2", "--arch-start-epoch", "0", "--batch-size", "32",
                              "--output-dir", str(tmp_path / "o")])
    s = Searcher(args)
    arch_ids = {id(p) for p in s.model.arch_parameters()}
    w_ids = {id(p) for g in s.w_opt.param_groups for p in g["params"]}
    assert arch_ids.isdisjoint(w_ids)
    assert {id(p) for g in s.a_opt.param_groups for p in g["params"]} == arch_ids
    assert len(w_ids) + len(arch_ids) == len(list(s.model.parameters()))
    before_w = [p.detach().clone() for p in s.model.weight_parameters()]
    before_a = [p.detach().clone() for p in s.model.arch_parameters()]
    s.model.train()
    st = LocalState(**s._counters())
    xa, ya, _ = s._arch_batch(st)
    assert st.arch_sample == 32
    s.step.arch_step(xa, ya)
    assert all(torch.equal(b, p) for b, p in zip(before_w, s.model.weight_parameters()))
    assert all(p.grad is None for p in s.model.weight_parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before_a, s.model.arch_parameters()))
    x, y, _ = next(iter(s._half(s.weight_set, 0, 0, 0)))
    s.step.weight_step(x, y)
    after_a = [p.detach().clone() for p in s.model.arch_parameters()]
    s.step.weight_step(x, y)  # weight steps never move the architecture
    assert all(torch.equal(b, p) for b, p in zip(after_a, s.model.arch_parameters()))


@pytest.mark.ranks
@pytest.mark.slow
def test_halves_never_share_an_index_on_any_rank(tmp_path):
    trace = tmp_path / "trace"
    args = [SCRIPT, *TINY, "--epochs", "2", "--arch-start-epoch", "0", "--batch-size", "64",
            "--steps-per-epoch", "6", "--output-dir", tmp_path / "o", "--trace-indices", trace]
    res = launch(horovodrun_cmd(2, args), timeout=600)
    assert res.returncode == 0, describe(res)
    recs = {r: [json.loads(line) for line in (trace / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    n_train = 1437
    split = n_train // 2
    for epoch in range(2):
        w_all, a_all = [], []
        for r in (0, 1):
            w = [i for rec in recs[r] if rec["epoch"] == epoch and rec["kind"] == "weight" for i in rec["idx"]]
            a = [i for rec in recs[r] if rec["epoch"] == epoch and rec["kind"] == "arch" for i in rec["idx"]]
            assert len(w) == 6 * 32 and len(a) == 6 * 32
            assert set(w).isdisjoint(a), f"rank {r} epoch {epoch}: weight and arch batches share indices"
            assert all(i < split for i in w) and all(i >= split for i in a)
            w_all += w
            a_all += a
        assert len(set(w_all)) == len(w_all), "two ranks drew the same weight sample in one epoch"
        assert set(w_all).isdisjoint(a_all)
    # the architecture iterator persists across epochs: within one pass over the arch half (719 // 64 = 11
    # global batches: epoch 0's 6 and 5 of epoch 1) no sample may repeat, over both ranks; the 12th batch starts
    # the next pass
    arch_batches = {r: [rec["idx"] for rec in recs[r] if rec["kind"] == "arch"] for r in (0, 1)}
    assert len(arch_batches[0]) == 12
    for start in (0, 11):
        seen = [i for r in (0, 1) for b in arch_batches[r][start:start + 11] for i in b]
        assert len(set(seen)) == len(seen), "two ranks drew the same arch sample in one pass"


@pytest.mark.ranks
@pytest.mark.slow
def test_two_rank_search_learns_digits_and_writes_outputs(tmp_path):
    out = tmp_path / "learn"
    # no --no-progress: stdout is a pipe here, as under every launcher, so rank 0 prints plain progress lines
    tiny = [a for a in TINY if a != "--no-progress"]
    args = [SCRIPT, *tiny, "--layers", "5", "--eval-steps", "4", "--epochs", "7", "--arch-start-epoch", "3",
            "--batch-size", "64", "--seed", "2", "--output-dir", out]
    res = launch(horovodrun_cmd(2, args), timeout=900)
    assert res.returncode == 0, describe(res)
    assert_progress_lines(res.stdout, epochs=7, steps=11)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(7))
    for m in metrics:
        assert set(m) >= {"epoch", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc", "epoch_time_s",
                          "images_per_s", "world_size", "genotype"}
    assert metrics[-1]["valid_acc"] >= 85.0, [m["valid_acc"] for m in metrics]
    from hvd_pcdarts.space.genotypes import load_genotype

    geno = load_genotype(str(out / "genotype.json"))
    assert len(geno.normal) == 8 and len(geno.reduce) == 8
    raw = json.loads((out / "genotype.json").read_text())
    assert len(raw["alphas_normal"]) == 14 and len(raw["alphas_normal"][0]) == 8 and len(raw["betas_reduce"]) == 14
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 7
    assert (out / "args.json").exists() and (out / "log.txt").exists()
    # only rank 0 writes: no stray files from rank 1 (e.g. a second log)
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == \
        ["args.json", "checkpoint.pt", "genotype.json", "log.txt", "metrics.jsonl", "report.md"]
    assert sorted(p.name for p in (out / "report").iterdir()) == ["arch_weights.png", "margins.png"]
    assert "of the result are" in (out / "log.txt").read_text().splitlines()[-1]  # the report's verdict, last


def _write_cifar10(root, n_per_batch=40, n_test=30, seed=0):
    rng = np.random.RandomState(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        entry = {"batch_label": name, "labels": rng.randint(0, 10, n).tolist(),
                 "data": rng.randint(0, 256, (n, 3072)).astype(np.uint8), "filenames": [f"{i}.png" for i in range(n)]}
        with open(base / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": n_per_batch}, f)


def test_cifar10_python_layout_search(tmp_path):
    _write_cifar10(tmp_path / "data")
    out = tmp_path / "o"
    res = launch([python_exe(), SCRIPT, "--dataset", "cifar10", "--data-dir", tmp_path / "data", "--epochs", "1",
                  "--arch-start-epoch", "0", "--batch-size", "16", "--init-channels", "4", "--layers", "3",
                  "--steps-per-epoch", "2", "--workers", "0", "--no-tensorboard", "--output-dir", out], timeout=300)
    assert res.returncode == 0, describe(res)
    assert "200 images" not in res.stderr
    assert "weight/arch images 100/100" in res.stdout
    assert (out / "genotype.json").exists()


def test_cifar_missing_without_download_is_one_line(tmp_path):
    res = launch([python_exe(), SCRIPT, "--dataset", "cifar10", "--data-dir", tmp_path / "none", "--output-dir",
                  tmp_path / "o"], timeout=120)
    assert res.returncode == 2, describe(res)
    assert len(res.stderr.strip().splitlines()) == 1 and "--download" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_cifar_pickle_with_code_is_refused(tmp_path):
    _write_cifar10(tmp_path / "data")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with open(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    res = launch([python_exe(), SCRIPT, "--dataset", "cifar10", "--data-dir", tmp_path / "data", "--output-dir",
                  tmp_path / "o", "--workers", "0"], timeout=120)
    assert res.returncode == 2, describe(res)
    assert not (tmp_path / "pwned").exists()
    assert "Traceback" not in res.stderr


def test_imagefolder_search_on_pngs(tmp_path):
    from PIL import Image

    rng = np.random.RandomState(0)
    for c in range(3):
        d = tmp_path / "data" / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.randint(0, 256, (20, 20, 3)).astype(np.uint8)).save(d / f"{i}.png")
    out = tmp_path / "o"
    res = launch([python_exe(), SCRIPT, "--dataset", "imagefolder", "--data-dir", tmp_path / "data",
                  "--image-size", "16", "--epochs", "1", "--arch-start-epoch", "0", "--batch-size", "8",
                  "--init-channels", "4", "--layers", "3", "--workers", "0", "--no-tensorboard",
                  "--output-dir", out], timeout=300)
    assert res.returncode == 0, describe(res)
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["epoch"] == 0 and rec["world_size"] == 1


@pytest.mark.parametrize("extra,needle", [
    pytest.param(["--batch-size", "33"], "does not divide", marks=pytest.mark.ranks),  # 2 ranks
    (["--arch-start-epoch", "50", "--epochs", "50"], "arch-start-epoch"),
    (["--lr", "-1"], "--lr"),
    (["--epochs", "0"], "--epochs"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, extra, needle):
    cmd = [SCRIPT, *TINY, "--output-dir", tmp_path / "o", *extra]
    res = launch(horovodrun_cmd(2, cmd) if "33" in extra else [python_exe(), *cmd], timeout=120)
    assert res.returncode == 2 or (res.returncode != 0 and "33" in extra), describe(res)
    assert needle in res.stderr + res.stdout
    # the ranks print one line each; (horovodrun's own launcher adds its report when a rank exits non-zero)
    rank_lines = [ln for ln in (res.stderr + res.stdout).splitlines() if ln.startswith("[")] if "33" in extra \
        else res.stderr.splitlines()
    assert not any("Traceback" in ln for ln in rank_lines), describe(res)
