"""--arch-reg beta-decay (β-DARTS): the term and its gradient, its schedule, its place in the architecture step, and
a search that runs with it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from hvd_pcdarts.arch_reg import BetaDecay, beta_decay_loss, make_arch_reg
from hvd_pcdarts.models import SearchNetwork
from hvd_pcdarts.steps import arch_gradients


def test_beta_decay_gradient_matches_a_finite_difference():
    torch.manual_seed(0)
    alphas = [torch.randn(14, 8, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    reg = BetaDecay(alphas, weight=30.0, epochs=10)
    reg.set_epoch(4)
    (grads) = torch.autograd.grad(reg(), alphas)
    h = 1e-6
    for t, g in zip(alphas, grads):
        for idx in [(0, 0), (3, 5), (13, 7)]:
            with torch.no_grad():
                t[idx] += h
                up = float(reg())
                t[idx] -= 2 * h
                down = float(reg())
                t[idx] += h
            assert abs((up - down) / (2 * h) - float(g[idx])) < 1e-8
    # and the closed form: lambda * softmax(alpha_edge) / (number of edges)
    for t, g in zip(alphas, grads):
        assert torch.allclose(g, 12.0 * torch.softmax(t.detach(), -1) / 28, atol=1e-12)


def test_beta_decay_term_is_the_mean_of_logsumexp_over_the_edges_of_both_cells():
    a = torch.zeros(14, 8, dtype=torch.float64)
    b = torch.zeros(14, 8, dtype=torch.float64)
    b[0, 3] = 5.0
    expected = (27 * torch.log(torch.tensor(8.0, dtype=torch.float64))
                + torch.log(torch.tensor(7.0 + torch.e ** 5, dtype=torch.float64))) / 28
    assert abs(float(beta_decay_loss([a, b])) - float(expected)) < 1e-12


def test_lambda_rises_linearly_from_zero_with_the_epoch():
    reg = BetaDecay([torch.zeros(2, 8)], weight=50.0, epochs=50)
    assert [reg.at(e) for e in (0, 1, 25, 49)] == [0.0, 1.0, 25.0, 49.0]
    reg.set_epoch(10)
    assert float(reg.lam) == 10.0 and float(reg()) == pytest.approx(10.0 * float(torch.log(torch.tensor(8.0))))
    assert make_arch_reg(None, None, None, 5) is None
    model = SearchNetwork(4, 10, 3)
    default = make_arch_reg("beta-decay", None, model, 5)
    assert default.weight == 50.0 and default.alphas == [model.alphas_normal, model.alphas_reduce]


def test_the_architecture_step_adds_the_term_to_the_gradients_not_to_the_loss():
    torch.manual_seed(1)
    model = SearchNetwork(4, 10, 3).double()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    params = model.arch_parameters()
    reg = make_arch_reg("beta-decay", 20.0, model, 4)
    reg.set_epoch(2)
    torch.manual_seed(2)
    loss0, plain = arch_gradients(model, nn.CrossEntropyLoss(), params, x, y)
    torch.manual_seed(2)  # the same partial-channel shuffle
    loss1, with_reg = arch_gradients(model, nn.CrossEntropyLoss(), params, x, y, reg=reg)
    assert float(loss0) == float(loss1)
    term = torch.autograd.grad(reg(), [model.alphas_normal, model.alphas_reduce])
    for name, g0, g1 in zip(["alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"], plain, with_reg):
        extra = term[0] if name == "alphas_normal" else term[1] if name == "alphas_reduce" else 0
        assert torch.allclose(g1, g0 + extra, atol=1e-12, rtol=0), name
    assert float(term[0].abs().max()) > 1e-3  # the term is not vacuous


def _search(out, *extra):
    from hvd_pcdarts.search import Searcher, parse_args

    args = parse_args(["--dataset", "digits", "--init-channels", "4", "--layers", "3", "--workers", "0",
                       "--no-progress", "--no-tensorboard", "--batch-size", "32", "--steps-per-epoch", "3",
                       "--eval-steps", "1", "--epochs", "3", "--arch-start-epoch", "0", "--arch-lr", "0.01",
                       "--output-dir", str(out), *extra])
    assert Searcher(args).run() == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    saved = json.loads((out / "genotype.json").read_text())
    return rows, saved


def _mean_logsumexp(saved):
    return float(beta_decay_loss([torch.tensor(saved["alphas_normal"]), torch.tensor(saved["alphas_reduce"])]))


def test_a_search_with_beta_decay_logs_lambda_and_keeps_the_alphas_lower(tmp_path):
    plain_rows, plain = _search(tmp_path / "plain")
    rows, reg = _search(tmp_path / "reg", "--arch-reg", "beta-decay", "--arch-reg-weight", "30")
    assert "arch_reg" not in plain_rows[0]
    assert [r["arch_reg"] for r in rows] == [{"name": "beta-decay", "lambda": v} for v in (0.0, 10.0, 20.0)]
    # epoch 0 (lambda 0) is the plain search; then every alpha is pulled down in proportion to its softmax weight
    assert _mean_logsumexp(reg) < _mean_logsumexp(plain) - 0.005
    assert rows[0]["diagnostics"] == plain_rows[0]["diagnostics"]


@pytest.mark.parametrize("argv, words", [
    (["--arch-reg-weight", "5"], "--arch-reg-weight 5 has no effect without --arch-reg beta-decay"),
    (["--arch-reg", "l2"], "invalid choice"),
    (["--arch-reg", "beta-decay", "--arch-reg-weight", "-1"], "--arch-reg-weight"),
])
def test_bad_arch_reg_flags_are_one_line_exit_2(argv, words, capsys):
    from hvd_pcdarts.errors import UsageError
    from hvd_pcdarts.search import parse_args

    try:
        parse_args(argv)
    except SystemExit as e:  # argparse's own refusals
        rc, err = e.code, capsys.readouterr().err.strip().splitlines()
    except UsageError as e:  # run_main: one line, exit 2
        rc, err = 2, str(e).splitlines()
    assert rc == 2
    assert len(err) == 1 and words in err[0]
