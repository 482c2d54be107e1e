"""The console commands (pyproject [project.scripts]) and bin/export.py: a retrained network (CIFAR and ImageNet
families) exported to ONNX and TorchScript runs like the torch network at any batch size."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import REPO_ROOT, describe, find_exe, launch, python_exe

EXPORT = str(REPO_ROOT / "bin" / "export.py")
COMMANDS = {"hvd-pcdarts-search": "train_search.py", "hvd-pcdarts-train": "train.py",
            "hvd-pcdarts-evaluate": "evaluate.py", "hvd-pcdarts-doctor": "doctor.py",
            "hvd-pcdarts-export": "export.py"}
TINY = ["--genotype", "PCDARTS", "--init-channels", "8", "--layers", "3", "--epochs", "1", "--steps-per-epoch", "1",
        "--eval-steps", "1", "--batch-size", "16", "--workers", "0", "--no-tensorboard", "--no-progress"]
NETWORKS = {"cifar": ["--dataset", "digits"],
            "imagenet": ["--network", "imagenet", "--dataset", "synthetic", "--image-size", "32", "--synthetic-size",
                         "64"]}


def test_console_commands_are_declared_and_installed():
    """Each command in pyproject runs the same function as its bin/ script, and bin/ scripts edit no sys.path."""
    toml = (REPO_ROOT / "pyproject.toml").read_text()
    table = toml.split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^(\S+) = "(\S+)"$', table, re.M))
    assert set(COMMANDS) <= set(scripts)
    for cmd, script in COMMANDS.items():
        func = scripts[cmd].split(":")[1]
        text = (REPO_ROOT / "bin" / script).read_text()
        assert f"from hvd_pcdarts.commands import {func}\n" in text and f"sys.exit({func}())" in text, script
    for path in (REPO_ROOT / "bin").glob("*.py"):
        assert "sys.path" not in path.read_text(), path.name
    for cmd, script in COMMANDS.items():
        exe = find_exe(cmd)
        assert exe is not None, f"{cmd} is not installed: run `make setup`"
        res = launch([exe, "--help"], timeout=120)
        assert res.returncode == 0 and re.search(rf"usage: {re.escape(script)}\b", res.stdout), describe(res)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """best.pt of a one-step retraining of each network family, written by the hvd-pcdarts-train command."""
    base = tmp_path_factory.mktemp("export")
    out = {}
    for name, extra in NETWORKS.items():
        res = launch([find_exe("hvd-pcdarts-train"), *TINY, *extra, "--output-dir", base / name], timeout=300)
        assert res.returncode == 0, describe(res)
        out[name] = base / name / "best.pt"
    return out


def _reference(ckpt_path):
    """The checkpoint's network in eval mode (logits only) and its parameter count without the auxiliary head."""
    from hvd_pcdarts.train import network_from_checkpoint

    ckpt = torch.load(ckpt_path, weights_only=True)
    net = network_from_checkpoint(ckpt).eval()
    params = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("auxiliary_head."))
    return (lambda x: net(x)[0]), params


def _export(ckpt, fmt, out, *extra):
    res = launch([python_exe(), EXPORT, ckpt, "--format", fmt, "--out", out, *extra], timeout=300)
    return res, json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else None


@pytest.mark.slow
@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_onnx_export_equals_torch_at_any_batch(checkpoints, network, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "net.onnx"
    res, rep = _export(checkpoints[network], "onnx", out)
    assert res.returncode == 0, describe(res)
    net, params = _reference(checkpoints[network])
    size = 16 if network == "cifar" else 32
    assert rep["format"] == "onnx" and rep["out"] == str(out) and rep["image_size"] == size
    assert rep["max_abs_diff"] <= 1e-4 and rep["params"] == params and rep["macs"] > 0, rep
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and [o.name for o in session.get_outputs()] == \
        ["logits"]
    for batch in (1, 5):
        x = torch.randn(batch, 3, size, size)
        got = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
        with torch.no_grad():
            assert got.shape == (batch, 10) and torch.allclose(got, net(x), atol=1e-4, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]  # no temporary file left


@pytest.mark.slow
def test_torchscript_export_equals_torch_at_any_batch(checkpoints, tmp_path):
    res, rep = _export(checkpoints["cifar"], "torchscript", tmp_path / "net.pt")
    assert res.returncode == 0 and "Warning" not in res.stderr, describe(res)
    net, params = _reference(checkpoints["cifar"])
    assert rep["format"] == "torchscript" and rep["max_abs_diff"] <= 1e-4 and rep["params"] == params, rep
    loaded = torch.jit.load(str(tmp_path / "net.pt"))
    for batch in (1, 4):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(loaded(x), net(x), atol=1e-5, rtol=0)


def test_export_fails_with_exit_1_when_the_file_disagrees(checkpoints, tmp_path, monkeypatch, capsys):
    from hvd_pcdarts.tools import export

    monkeypatch.setattr(export, "run_torchscript", lambda path, x: torch.zeros(len(x), 10) + 1.0)
    assert export.main([str(checkpoints["cifar"]), "--format", "torchscript", "--out", str(tmp_path / "n.pt")]) == 1
    out, err = capsys.readouterr()
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["max_abs_diff"] > 1e-4 and "differ from torch's" in err


@pytest.mark.parametrize("case", ["missing", "not-a-checkpoint", "search-checkpoint", "no-folder"])
def test_export_bad_input_is_one_line_exit_2(case, checkpoints, tmp_path):
    ckpt, out = checkpoints["cifar"], tmp_path / "x.onnx"
    if case == "missing":
        ckpt = tmp_path / "none.pt"
    elif case == "not-a-checkpoint":
        ckpt = tmp_path / "text.pt"
        ckpt.write_text("not a checkpoint")
    elif case == "search-checkpoint":
        ckpt = tmp_path / "search.pt"
        torch.save({"format": "hvd-pcdarts-search-v1"}, ckpt)
    else:
        out = tmp_path / "none" / "x.onnx"
    res = launch([find_exe("hvd-pcdarts-export"), ckpt, "--out", out], timeout=120)
    assert res.returncode == 2, describe(res)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvd-pcdarts-export: error:") and "Traceback" not in res.stderr
    assert not out.exists() and not any(p.suffix == ".onnx" for p in tmp_path.rglob("*"))
