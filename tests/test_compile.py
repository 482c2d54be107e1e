"""`--compile` (fastpath.compile_cells: torch.compile of each search cell's tensor work, with --batched-edges).

On the CPU the tests compile with the "aot_eager" backend: the same dynamo capture, functionalized BN-buffer
updates and compiled autograd as inductor, without inductor's C++ code generation (which takes over ten minutes for
a small search net on two cores). Inductor's own numerics are checked on a GPU (the CUDA test below and
benchmarks/search_step.py --check)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from helpers import REPO_ROOT, describe, horovodrun_cmd, launch, python_exe
from search_runs import assert_same_runs, final_state

from hvd_pcdarts import fastpath as fp

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SCRIPT = str(REPO_ROOT / "bin" / "train_search.py")


def _search(backend=None, freeze=False, steps=2, device="cpu", dtype=torch.float64, graph=False):
    model, arch, weights, a_opt, w_opt = fp.build_search(4, 4, 2, seed=4, device=device, batched_edges=True)
    model.to(dtype)
    if backend:
        fp.compile_cells(model, backend=backend)
    cls = fp.GraphedSearchStep if graph else fp.EagerSearchStep
    step = cls(model, nn.CrossEntropyLoss(), arch, weights, a_opt, w_opt, grad_clip=5.0, freeze_weights=freeze)
    g = torch.Generator().manual_seed(9)
    losses = []
    for _ in range(steps):
        xa, ya = torch.randn(6, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (6,), generator=g)
        xw, yw = torch.randn(6, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (6,), generator=g)
        losses += [float(step.arch_step(xa.to(device), ya.to(device))),
                   float(step.weight_step(xw.to(device), yw.to(device))[1])]
    assert all(p.requires_grad for p in model.parameters())  # frozen() gave the weights back
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(5, 3, 8, 8, generator=g, dtype=dtype).to(device))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, out


def _assert_same(a, b, tol):
    (l0, s0, o0), (l1, s1, o1) = a, b
    assert max(abs(x - y) for x, y in zip(l0, l1)) <= tol
    assert list(s0) == list(s1)
    for k in s0:
        assert torch.allclose(s0[k].double(), s1[k].double(), rtol=tol, atol=tol), k
    assert torch.allclose(o0.double(), o1.double(), rtol=tol, atol=tol)


def test_frozen_weights_change_nothing_in_the_eager_arch_step():
    _assert_same(_search(), _search(freeze=True), 0.0)


def test_frozen_restores_requires_grad_after_an_error():
    params = [nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))]
    params[1].requires_grad_(False)
    with pytest.raises(RuntimeError):
        with fp.frozen(params):
            assert not any(p.requires_grad for p in params)
            raise RuntimeError("boom")
    assert [p.requires_grad for p in params] == [True, False]  # only what it froze is unfrozen


def test_compiled_cells_equal_eager_float64():
    """Losses of arch and weight steps, every parameter, BN running statistics and counters after the steps, and
    eval-mode outputs: compiled cells (training, frozen-weight arch step, no-grad evaluation) equal eager."""
    from torch._dynamo.utils import counters

    counters.clear()
    _assert_same(_search(), _search(backend="aot_eager", freeze=True), 1e-10)
    # really compiled, in one piece per cell: 4 cells of 3 shapes x (training, arch step, no-grad eval)
    assert counters["stats"]["unique_graphs"] >= 9, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_deep_copy_of_a_compiled_net_computes_with_its_own_buffers():
    """The compiled functions are unbound (called with the runner/cell): a copy must not update the original's BN
    statistics (a compiled bound method would keep pointing at the original's shared buffers)."""
    import copy

    model = fp.build_search(4, 4, 2, seed=4, batched_edges=True)[0].double()
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64))  # aliases the shared BN buffers
    fp.compile_cells(model, backend="aot_eager")
    twin = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the original is untouched
    moved = [k for k, v in twin.state_dict().items() if "running_mean" in k and not torch.equal(v, before[k])]
    assert len(moved) > 100  # the copy's own statistics did move


def test_uncompiled_runs_a_new_shape_eagerly_without_compiling():
    from torch._dynamo.utils import counters

    model = fp.build_search(4, 4, 2, seed=4, batched_edges=True)[0].double().eval()
    fp.compile_cells(model, backend="aot_eager")
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        model(x)
        counters.clear()
        with fp.uncompiled():
            out = model(x[:2])  # another batch size: would compile every cell again
        assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
        with fp.uncompiled(False):
            again = model(x[:2])
        assert counters["stats"]["unique_graphs"] > 0  # without it: compiled anew
    assert torch.allclose(out, again, rtol=1e-12, atol=1e-12)


RUN = ["--dataset", "digits", "--init-channels", "8", "--layers", "5", "--workers", "0", "--no-tensorboard",
       "--no-progress", "--epochs", "2", "--arch-start-epoch", "0", "--batch-size", "32", "--steps-per-epoch", "2",
       "--no-augment", "--fp64", "--seed", "3", "--batched-edges"]
COMPILE = ["--compile", "--compile-backend", "aot_eager"]


def test_train_search_compile_one_rank_equals_eager(tmp_path):
    runs = {}
    for tag, extra in (("eager", []), ("compiled", COMPILE)):
        res = launch([python_exe(), SCRIPT, *RUN, *extra, "--device", "cpu", "--output-dir", tmp_path / tag],
                     timeout=600)
        assert res.returncode == 0, describe(res)
        assert ("compiled cells (aot_eager)" in res.stdout) == (tag == "compiled"), describe(res)
        runs[tag] = final_state(tmp_path / tag)
    assert_same_runs(runs["eager"], runs["compiled"])
    genotypes = [json.loads((tmp_path / t / "genotype.json").read_text())["genotype"] for t in runs]
    assert genotypes[0] == genotypes[1]


@pytest.mark.slow
def test_train_search_compile_two_ranks_with_hooks_equals_eager(tmp_path):
    """2 real ranks with Horovod's per-tensor hooks (--grad-allreduce overlap): the compiled arch step turns
    requires_grad off and on again around every forward, and the hooks must keep firing in the weight step."""
    runs = {}
    for tag, extra in (("eager", []), ("compiled", COMPILE)):
        res = launch(horovodrun_cmd(2, [SCRIPT, *RUN, *extra, "--grad-allreduce", "overlap",
                                        "--output-dir", tmp_path / tag]), timeout=900)
        assert res.returncode == 0, describe(res)
        assert "all 2 rank(s) hold identical parameters" in res.stdout + res.stderr, describe(res)
        runs[tag] = final_state(tmp_path / tag)
    assert_same_runs(runs["eager"], runs["compiled"])


def test_compile_without_batched_edges_is_one_line_usage_error(tmp_path):
    run = [a for a in RUN if a != "--batched-edges"]
    res = launch([python_exe(), SCRIPT, *run, "--compile", "--device", "cpu", "--output-dir", tmp_path / "o"],
                 timeout=120)
    assert res.returncode == 2, describe(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--compile needs --batched-edges" in lines[0], describe(res)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor's GPU code)")
@pytest.mark.parametrize("graph", [False, True])
def test_inductor_compiled_step_equals_eager_cuda(graph, strict_fp32):
    """Inductor on the GPU, eager step and inside the CUDA graph (--compile --cuda-graph): float32, different
    kernels, so equal to a tolerance."""
    ref = _search(device="cuda", dtype=torch.float32, steps=3)
    new = _search(backend="inductor", freeze=True, device="cuda", dtype=torch.float32, steps=3, graph=graph)
    (l0, s0, o0), (l1, s1, o1) = ref, new
    assert max(abs(a - b) for a, b in zip(l0, l1)) < 1e-4
    num = sum(float((s0[k] - s1[k]).double().pow(2).sum()) for k in s0 if s0[k].is_floating_point()) ** 0.5
    den = sum(float(s0[k].double().pow(2).sum()) for k in s0 if s0[k].is_floating_point()) ** 0.5
    assert num / den < 1e-4
    assert torch.allclose(o0, o1, rtol=1e-3, atol=1e-4)
