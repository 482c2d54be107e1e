"""Deriving a cell: the P-DARTS skip cap on hand-made alphas and betas, bin/derive.py on a saved genotype.json, and the
diagnostics a search writes every epoch."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hvd_pcdarts.commands import derive
from hvd_pcdarts.diagnostics import cell_diagnostics
from hvd_pcdarts.models import SearchNetwork
from hvd_pcdarts.models.search_network import derive_cell
from hvd_pcdarts.space.genotypes import PRIMITIVES, load_genotype, save_genotype

SKIP, SEP3, MAX = (PRIMITIVES.index(n) for n in ("skip_connect", "sep_conv_3x3", "max_pool_3x3"))
EDGES, STEPS = 14, 4


def _skips(gene):
    return [i for i, (op, _) in enumerate(gene) if op == "skip_connect"]


def test_skip_cap_keeps_the_strongest_skips_and_gives_the_others_their_next_best_op():
    a = torch.zeros(EDGES, len(PRIMITIVES), dtype=torch.float64)
    a[:, SKIP] = 3.0 + 0.01 * torch.arange(EDGES)  # every edge prefers skip; sep_conv_3x3 next
    a[:, SEP3] = 1.0
    b = torch.zeros(EDGES, dtype=torch.float64)
    plain = derive_cell(a, b, STEPS)
    assert len(_skips(plain)) == 8
    capped = derive_cell(a, b, STEPS, skip_cap=2)
    assert [j for _, j in capped] == [j for _, j in plain]  # the same edges
    # the strongest skips by softmax(alpha) x edge-normalized softmax(beta): node 0's two edges (1/2 each)
    assert _skips(capped) == [0, 1]
    assert all(op == "sep_conv_3x3" for op, _ in capped[2:])
    assert derive_cell(a, b, STEPS, skip_cap=0) == [("sep_conv_3x3", j) for _, j in plain]
    assert derive_cell(a, b, STEPS, skip_cap=8) == plain == derive_cell(a, b, STEPS, skip_cap=20)


def test_skip_cap_ties_keep_the_earlier_edge_and_next_best_ties_the_lower_op():
    a = torch.zeros(EDGES, len(PRIMITIVES), dtype=torch.float64)
    a[:, SKIP] = 2.0  # all skips equally strong within a node; the other ops tie, max_pool_3x3 comes first
    b = torch.zeros(EDGES, dtype=torch.float64)
    capped = derive_cell(a, b, STEPS, skip_cap=1)
    assert _skips(capped) == [0]
    assert all(op == "max_pool_3x3" for op, _ in capped[1:])


def test_no_cap_is_the_pc_darts_derivation_of_the_network():
    torch.manual_seed(1)
    model = SearchNetwork(8, 10, 3)
    with torch.no_grad():
        model.alphas_normal.normal_()
        model.alphas_normal[:, SKIP] += 2.0
    geno = model.genotype()
    assert geno.normal == derive_cell(model.alphas_normal, model.betas_normal, STEPS)
    capped = model.genotype(skip_cap=1)
    assert len(_skips(capped.normal)) == 1 and capped.reduce == geno.reduce


def _saved(tmp_path, skip_boost=2.0):
    torch.manual_seed(2)
    model = SearchNetwork(8, 10, 3)
    with torch.no_grad():
        for p in model.arch_parameters():
            p.normal_()
        model.alphas_normal[:, SKIP] += skip_boost
    path = tmp_path / "genotype.json"
    save_genotype(model.genotype(), str(path), extra=model.arch_state())
    return model, path


def test_derive_py_rederives_from_the_saved_parameters_and_records_the_rule(tmp_path, capsys):
    model, path = _saved(tmp_path)
    out = tmp_path / "capped.json"
    assert derive([str(path), "--skip-cap", "2", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["derivation"] == {"skip_cap": 2}
    assert load_genotype(str(out)) == model.genotype(skip_cap=2)
    assert len(_skips(load_genotype(str(out)).normal)) <= 2
    assert saved["alphas_normal"] == json.loads(path.read_text())["alphas_normal"]
    # without a rule: the search's own derivation, no rule recorded
    plain = tmp_path / "plain.json"
    assert derive([str(path), "--out", str(plain)]) == 0
    assert load_genotype(str(plain)) == model.genotype() and "derivation" not in json.loads(plain.read_text())
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("content, words", [
    (None, "no such file"),
    ("{", "not a readable JSON"),
    (json.dumps({"genotype": {}}), "needs the genotype.json a search wrote"),
    (json.dumps({"alphas_normal": [[0.0] * 8] * 13, "alphas_reduce": [[0.0] * 8] * 14, "betas_normal": [0.0] * 13,
                 "betas_reduce": [0.0] * 14}), "no cell's edge count"),
])
def test_derive_py_refuses_bad_input_with_one_line(tmp_path, capsys, content, words):
    path = tmp_path / "g.json"
    if content is not None:
        path.write_text(content)
    assert derive([str(path), "--skip-cap", "1", "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not (tmp_path / "o.json").exists()


def test_cell_diagnostics_on_hand_made_parameters():
    a = torch.zeros(EDGES, len(PRIMITIVES), dtype=torch.float64)
    a[0, SEP3] = 10.0  # edge 0 decided, the others uniform
    b = torch.zeros(EDGES, dtype=torch.float64)
    b[0] = math.log(3.0)  # node 0: edge weights 3/4, 1/4
    d = cell_diagnostics(a, b, STEPS)
    assert d["margin"][0] > 0.99 and all(m == 0.0 for m in d["margin"][1:])
    assert d["entropy"][0] < 0.01 and all(abs(h - math.log(8)) < 1e-12 for h in d["entropy"][1:])
    assert [len(n) for n in d["betas"]] == [2, 3, 4, 5]
    assert abs(d["betas"][0][0] - 0.75) < 1e-12 and all(abs(sum(n) - 1) < 1e-12 for n in d["betas"])


def test_search_writes_diagnostics_every_epoch_and_the_capped_genotype(tmp_path):
    """In-process (size-1 Horovod): every metrics row has the diagnostics of its architecture; genotype.json holds
    the capped cell and the rule; TensorBoard gets them as scalars."""
    from hvd_pcdarts.search import Searcher, parse_args

    out = tmp_path / "run"
    args = parse_args(["--dataset", "digits", "--init-channels", "4", "--layers", "3", "--workers", "0",
                       "--no-progress", "--epochs", "3", "--arch-start-epoch", "0", "--batch-size", "32",
                       "--steps-per-epoch", "2", "--eval-steps", "1", "--arch-lr", "0.05", "--skip-cap", "0",
                       "--output-dir", str(out)])
    assert Searcher(args).run() == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    previous = None
    for r in rows:
        d = r["diagnostics"]
        assert set(d) == {"normal", "reduce", "normal_skips", "genotype_changed"}
        for cell in ("normal", "reduce"):
            assert len(d[cell]["margin"]) == len(d[cell]["entropy"]) == EDGES
            assert all(0 <= m <= 1 for m in d[cell]["margin"])
            assert all(0 <= h <= math.log(8) + 1e-12 for h in d[cell]["entropy"])
            assert all(abs(sum(n) - 1) < 1e-9 for n in d[cell]["betas"])
        assert d["normal_skips"] == 0 == sum(op == "skip_connect" for op, _ in r["genotype"]["normal"])
        assert isinstance(d["genotype_changed"], bool)
        if previous is not None:
            assert d["genotype_changed"] == (r["genotype"] != previous)
        previous = r["genotype"]
    saved = json.loads((out / "genotype.json").read_text())
    assert saved["derivation"] == {"skip_cap": 0} and saved["genotype"] == rows[-1]["genotype"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tb"))
    tb.Reload()
    tags = tb.Tags()["scalars"]
    assert "diagnostics/normal/margin/0" in tags and "diagnostics/normal_skips" in tags
    assert [e.step for e in tb.Scalars("diagnostics/normal/margin/0")] == [0, 1, 2]


def _search(out, *extra):
    from hvd_pcdarts.search import Searcher, parse_args

    args = parse_args(["--dataset", "digits", "--init-channels", "4", "--layers", "3", "--workers", "0",
                       "--no-progress", "--no-tensorboard", "--batch-size", "32", "--steps-per-epoch", "2",
                       "--eval-steps", "1", "--output-dir", str(out), *extra])
    assert Searcher(args).run() == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "genotype.json").read_text()), (out / "log.txt").read_text()


def test_early_stop_stable_ends_the_search_once_the_genotype_holds_for_k_epochs(tmp_path):
    """An architecture that barely moves (arch lr 1e-9) keeps its genotype: stable:2 ends the search after the
    second epoch of architecture training; the epochs before --arch-start-epoch do not count."""
    rows, saved, log = _search(tmp_path / "r", "--epochs", "8", "--arch-start-epoch", "2", "--arch-lr", "1e-9",
                               "--early-stop", "stable:2")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert [r["diagnostics"]["genotype_changed"] for r in rows] == [False] * 4
    assert saved["early_stop"] == {"rule": "stable:2", "epochs_run": 4,
                                   "reason": "the derived genotype has not changed for 2 epoch(s) (>= 2)"}
    assert saved["genotype"] == rows[-1]["genotype"]
    assert "early stop after epoch 4/8 (--early-stop stable:2)" in log


def test_early_stop_skip_ends_the_search_at_the_first_architecture_epoch_that_holds(tmp_path):
    rows, saved, log = _search(tmp_path / "r", "--epochs", "5", "--arch-start-epoch", "1", "--early-stop",
                               "skip:0", "--early-stop", "stable:9")
    assert [r["epoch"] for r in rows] == [0, 1]
    skips = rows[-1]["diagnostics"]["normal_skips"]
    assert saved["early_stop"]["rule"] == "skip:0" and saved["early_stop"]["epochs_run"] == 2
    assert f"holds {skips} skip_connect (>= 0)" in saved["early_stop"]["reason"] and "early stop after epoch 2/5" in log


def test_without_early_stop_the_search_runs_every_epoch(tmp_path):
    rows, saved, _ = _search(tmp_path / "r", "--epochs", "3", "--arch-start-epoch", "0", "--arch-lr", "1e-9")
    assert [r["epoch"] for r in rows] == [0, 1, 2] and "early_stop" not in saved


@pytest.mark.parametrize("rule", ["skip", "stable:0", "skips:2", "stable:x", "skip:-1"])
def test_a_bad_early_stop_rule_is_one_line_exit_2(rule, capsys):
    from hvd_pcdarts.search import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--early-stop", rule])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected skip:N (N >= 0) or stable:K (K >= 1)" in err[0]


def test_early_stop_counts_across_a_resume(tmp_path):
    """The count of unchanged epochs is in the checkpoint: 3 epochs (one of them architecture training), then a
    resume with stable:2 stops after the next epoch, as the uninterrupted run does."""
    common = ["--arch-start-epoch", "2", "--arch-lr", "1e-9"]
    _search(tmp_path / "r", "--epochs", "3", *common)
    rows, saved, log = _search(tmp_path / "r", "--epochs", "8", *common, "--early-stop", "stable:2", "--resume",
                               "auto")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert saved["early_stop"]["epochs_run"] == 4 and "resumed from" in log
