"""Retraining (bin/train.py) and evaluation (bin/evaluate.py): 2 real ranks, exact sharded evaluation, the
search -> retrain -> evaluate chain, ImageNet presets on a tiny ImageFolder tree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, assert_progress_lines, describe, horovodrun_cmd, launch, png_tree, python_exe

TRAIN = str(REPO_ROOT / "bin" / "train.py")
EVAL = str(REPO_ROOT / "bin" / "evaluate.py")
SEARCH = str(REPO_ROOT / "bin" / "train_search.py")
SMALL = ["--init-channels", "8", "--layers", "5", "--workers", "0", "--no-tensorboard", "--no-progress",
         "--cutout-length", "4", "--drop-path-prob", "0.1", "--lr", "0.1"]


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.ranks
@pytest.mark.slow
def test_two_rank_retraining_improves_and_writes_outputs(tmp_path):
    out = tmp_path / "tr"
    small = [a for a in SMALL if a != "--no-progress"]  # stdout is a pipe: rank 0 prints progress lines
    res = launch(horovodrun_cmd(2, [TRAIN, "--genotype", "PCDARTS", "--dataset", "digits", *small,
                                    "--batch-size", "64", "--epochs", "4", "--output-dir", out]), timeout=900)
    assert res.returncode == 0, describe(res)
    assert_progress_lines(res.stdout, epochs=4, steps=22)
    m = _metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in m] == [0, 1, 2, 3]
    assert all(r["world_size"] == 2 and r["test_images"] == 360 for r in m)
    assert m[-1]["test_top1"] > m[0]["test_top1"] + 10, [r["test_top1"] for r in m]
    for name in ("args.json", "log.txt", "checkpoint.pt", "best.pt"):
        assert (out / name).exists(), name
    args = json.loads((out / "args.json").read_text())
    assert args["batch_size"] == 64 and args["auxiliary"] is True


@pytest.mark.ranks
def test_retraining_flat_and_overlap_gradient_allreduce_give_the_same_run(tmp_path):
    """2 real ranks of bin/train.py (auxiliary head, drop path, cutout): one flat allreduce of all gradients after
    backward (--grad-allreduce flat, the CPU default) and per-tensor hook allreduces (overlap, the GPU default)
    end bit-identical."""
    ckpts = {}
    for mode in ("overlap", "flat"):
        out = tmp_path / mode
        res = launch(horovodrun_cmd(2, [TRAIN, "--genotype", "PCDARTS", "--dataset", "digits", *SMALL,
                                        "--batch-size", "32", "--epochs", "1", "--steps-per-epoch", "3",
                                        "--eval-steps", "1", "--grad-allreduce", mode, "--output-dir", out]),
                     timeout=600)
        assert res.returncode == 0, describe(res)
        assert f"{mode} gradient allreduce" in res.stdout, describe(res)
        ckpts[mode] = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    a, b = ckpts["overlap"], ckpts["flat"]
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.ranks
def test_sharded_evaluation_equals_one_rank_exactly(tmp_path):
    png_tree(tmp_path / "data", n_val=5)  # 15 test images: does not divide by 2 ranks
    out = tmp_path / "tr"
    res = launch([python_exe(), TRAIN, "--genotype", "PC_DARTS_cifar", "--dataset", "imagefolder", "--data-dir",
                  tmp_path / "data", "--image-size", "16", "--batch-size", "6", "--epochs", "1", "--init-channels",
                  "4", "--layers", "3", "--workers", "0", "--no-tensorboard", "--output-dir", out], timeout=300)
    assert res.returncode == 0, describe(res)
    results = {}
    for ranks in (1, 2):
        cmd = [EVAL, out / "checkpoint.pt", "--data-dir", tmp_path / "data", "--image-size", "16", "--batch-size",
               "4", "--workers", "0", "--output", tmp_path / f"eval{ranks}.json"]
        res = launch([python_exe(), *cmd] if ranks == 1 else horovodrun_cmd(2, cmd), timeout=300)
        assert res.returncode == 0, describe(res)
        results[ranks] = json.loads((tmp_path / f"eval{ranks}.json").read_text())
        last = [ln for ln in res.stdout.splitlines() if ln.strip()][-1]
        last = last.split(":", 1)[1] if last.startswith("[") else last
        assert set(json.loads(last)) >= {"top1", "top5", "loss", "params", "macs"}
    assert results[1]["images"] == results[2]["images"] == 15
    assert results[1]["top1"] == results[2]["top1"] and results[1]["top5"] == results[2]["top5"]
    # the loss is a float32 sum whose order depends on the sharding: equal to rounding
    assert abs(results[1]["loss"] - results[2]["loss"]) < 1e-6
    assert results[1]["params"] == results[2]["params"] > 0 and results[1]["macs"] > 0


@pytest.mark.ranks
@pytest.mark.slow
def test_search_retrain_evaluate_chain(tmp_path):
    s_out, t_out = tmp_path / "search", tmp_path / "train"
    res = launch([python_exe(), SEARCH, "--dataset", "digits", "--init-channels", "8", "--layers", "5",
                  "--workers", "0", "--no-tensorboard", "--epochs", "2", "--arch-start-epoch", "1",
                  "--batch-size", "64", "--steps-per-epoch", "4", "--eval-steps", "1", "--output-dir", s_out],
                 timeout=600)
    assert res.returncode == 0, describe(res)
    res = launch(horovodrun_cmd(2, [TRAIN, "--genotype", s_out / "genotype.json", "--dataset", "digits", *SMALL,
                                    "--batch-size", "64", "--epochs", "2", "--output-dir", t_out]), timeout=600)
    assert res.returncode == 0, describe(res)
    args = json.loads((t_out / "args.json").read_text())
    searched = json.loads((s_out / "genotype.json").read_text())["genotype"]
    assert args["genotype_resolved"] == searched
    res = launch([python_exe(), EVAL, t_out / "best.pt", "--workers", "0"], timeout=300)
    assert res.returncode == 0, describe(res)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    best = max(r["test_top1"] for r in _metrics(t_out / "metrics.jsonl"))
    assert abs(result["top1"] - best) < 1e-9


def test_digits_without_scikit_learn_equal_its_loader_and_split():
    """The digits bundle reads scikit-learn's file and a stored split: the same images, labels and train/test split
    as load_digits() with train_test_split(test_size=0.2, random_state=0, stratify=labels)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from hvd_pcdarts.data import digits_arrays, digits_test_mask

    d = load_digits()
    images, labels = digits_arrays()
    assert np.array_equal(images, d.images) and np.array_equal(labels, d.target)
    _, test = train_test_split(np.arange(len(d.target)), test_size=0.2, random_state=0, stratify=d.target)
    assert np.array_equal(np.flatnonzero(digits_test_mask(len(d.target))), np.sort(test))


def test_class_sample_split_fractions_balance_and_determinism():
    from hvd_pcdarts.data import class_sample_split

    targets = [c for c in range(4) for _ in range(40)]
    w, a = class_sample_split(targets, 0.1, 0.025, seed=7)
    assert len(w) == 16 and len(a) == 4 and set(w).isdisjoint(a)
    assert [sum(targets[i] == c for i in w) for c in range(4)] == [4, 4, 4, 4]
    assert [sum(targets[i] == c for i in a) for c in range(4)] == [1, 1, 1, 1]
    assert class_sample_split(targets, 0.1, 0.025, seed=7) == (w, a)  # every rank computes the same sample
    assert class_sample_split(targets, 0.1, 0.025, seed=8) != (w, a)


@pytest.mark.slow
def test_imagenet_presets_on_tiny_imagefolder(tmp_path):
    png_tree(tmp_path / "data", classes=2, n_train=16, n_val=3, size=40)
    out = tmp_path / "s"
    res = launch([python_exe(), SEARCH, "--preset", "imagenet", "--data-dir", tmp_path / "data", "--image-size",
                  "32", "--batch-size", "4", "--init-channels", "4", "--layers", "3", "--epochs", "2",
                  "--arch-start-epoch", "0", "--warmup-epochs", "1", "--class-sample-fractions", "0.5", "0.25",
                  "--workers", "0", "--no-tensorboard", "--output-dir", out], timeout=300)
    assert res.returncode == 0, describe(res)
    args = json.loads((out / "args.json").read_text())
    assert args["partial_k"] == 2 and args["stem"] == "imagenet" and args["arch_lr"] == 6e-3 and args["lr"] == 0.5
    assert "weight/arch images 16/8" in res.stdout
    t_out = tmp_path / "t"
    res = launch([python_exe(), TRAIN, "--preset", "imagenet", "--genotype", "PC_DARTS_image", "--data-dir",
                  tmp_path / "data", "--image-size", "32", "--batch-size", "4", "--init-channels", "8", "--layers",
                  "3", "--epochs", "2", "--warmup-epochs", "1", "--steps-per-epoch", "2", "--workers", "0",
                  "--no-tensorboard", "--output-dir", t_out], timeout=300)
    assert res.returncode == 0, describe(res)
    targs = json.loads((t_out / "args.json").read_text())
    assert targs["network"] == "imagenet" and targs["label_smoothing"] == 0.1 and targs["weight_decay"] == 3e-5
    assert targs["lr_schedule"] == "linear" and targs["color_jitter"] is True and targs["layers"] == 3
    ck = torch.load(t_out / "checkpoint.pt", weights_only=True)
    assert ck["config"]["network"] == "imagenet"


@pytest.mark.parametrize("extra,needle", [
    (["--genotype", "nope_not_a_genotype"], "no such file"),
    (["--genotype", "PCDARTS", "--drop-path-prob", "1.5"], "drop-path-prob"),
])
def test_train_bad_input_one_line(tmp_path, extra, needle):
    res = launch([python_exe(), TRAIN, "--dataset", "digits", "--output-dir", tmp_path / "o", *extra], timeout=120)
    assert res.returncode == 2, describe(res)
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_evaluate_rejects_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    res = launch([python_exe(), EVAL, bad], timeout=120)
    assert res.returncode == 2, describe(res)
    assert "cannot be loaded" in res.stderr and "Traceback" not in res.stderr


def test_progress_lines_every_tenth_of_an_epoch_or_interval(capsys, monkeypatch):
    """Plain progress lines (stderr no terminal): one per 10% of the epoch's steps, or per `every_s` seconds when
    that comes first, none at the last step; a resumed epoch counts from its first step; nothing from a rank > 0
    or with --no-progress."""
    from helpers import progress_lines

    from hvd_pcdarts import runtime

    clock = [100.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(runtime.dist, "is_root", lambda: True)  # rank 0, without initializing Horovod

    def run(mode, steps, start=0, dt=0.5, every_s=30.0, epochs=3):
        p = runtime.Progress(mode, 1, epochs, steps, start, every_s=every_s)
        for _ in range(start, steps):
            clock[0] += dt
            p.update(2.0, 64, 0.1)
        p.close()
        return progress_lines(capsys.readouterr().out)

    lines = run("lines", 40)
    assert [p["step"] for p in lines] == [4, 8, 12, 16, 20, 24, 28, 32, 36]
    first = lines[0]
    assert (first["epoch"], first["epochs"], first["steps"], first["images_per_s"], first["loss"]) == (2, 3, 40, 128,
                                                                                                       2.0)
    assert [p["step"] for p in run("lines", 40, every_s=1.0)] == list(range(2, 40, 2))  # 2 steps a second
    assert [p["step"] for p in run("lines", 40, start=30)] == [34, 38]
    assert [p["step"] for p in run("lines", 5)] == [1, 2, 3, 4]
    p = runtime.Progress("lines", 0, 3, 40, 0, every_s=1e9)
    for _ in range(10):  # 2 s a step: 30 steps left in this epoch, 80 in the two after it
        clock[0] += 2.0
        p.update(1.0, 64, 0.1)
    text = p.line(clock[0])
    assert "epoch 1/3 step 10/40 | 32 img/s | loss 1.0000 | ETA epoch 1m00s, run 3m40s" in text, text
    capsys.readouterr()
    assert (runtime._duration(3599.4), runtime._duration(3600), runtime._duration(7290)) == ("59m59s", "1h00m",
                                                                                              "2h01m")
    assert run(None, 40) == [] and run("bar", 40) == []
    monkeypatch.setattr(runtime.dist, "is_root", lambda: False)
    assert run("lines", 40) == []
