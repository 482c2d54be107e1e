"""Shared pytest fixtures. Subprocess helpers live in tests/helpers.py (``from helpers import launch``)."""

from __future__ import annotations

import os
import sys

import pytest

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:  # `from helpers import ...` works whatever pytest's import mode
    sys.path.insert(0, _TESTS_DIR)

import helpers  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on the machine's cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # (OpenMP threads spinning against the other worker's
    import torch  # noqa: E402                      # processes slow small CPU tests several-fold)

    torch.set_num_threads(1)


def pytest_itemcollected(item):
    """xdist groups for `make test` (--dist loadgroup): the tests marked `ranks` (they launch several processes) in
    one group, run one at a time by one worker: two 2-rank jobs at once put four processes on two cores, and every
    collective then waits for a descheduled peer (the 2-rank equivalence runs took 2.5x longer). The other tests
    are grouped by file (a file's module fixtures run once) and spread over the workers."""
    if item.config.pluginmanager.hasplugin("xdist"):
        item.add_marker(pytest.mark.xdist_group("ranks" if item.get_closest_marker("ranks") else item.path.stem))


@pytest.fixture(scope="session")
def repo_root():
    """The repository root (a pathlib.Path)."""
    return helpers.REPO_ROOT


@pytest.fixture(scope="session")
def python_exe():
    """The project's interpreter (.venv/bin/python when present)."""
    return helpers.python_exe()


@pytest.fixture(scope="session")
def run_ranks():
    """`run_ranks(cmd_list, timeout=120, env=None, cwd=None)` -> CompletedProcess: helpers.launch, i.e. the
    command with .venv/bin on PATH, Open MPI allowed as root and the repo on PYTHONPATH."""
    return helpers.launch


@pytest.fixture(scope="session")
def two_rank_search(tmp_path_factory):
    """`two_rank_search(args)` -> (output folder, CompletedProcess) of `horovodrun -np 2 python
    bin/train_search.py ARGS --output-dir ...`, run once per session for the same ARGS: equivalence tests in
    different files share a reference run (the `ranks` tests all run in one worker's session)."""
    runs = {}

    def run(args, timeout=900):
        key = tuple(map(str, args))
        if key not in runs:
            out = tmp_path_factory.mktemp("search") / "run"
            cmd = helpers.horovodrun_cmd(2, [helpers.REPO_ROOT / "bin" / "train_search.py", *args, "--output-dir", out])
            runs[key] = (out, helpers.launch(cmd, timeout=timeout))
        return runs[key]

    return run


@pytest.fixture(scope="session")
def horovodrun_exe():
    exe = helpers.find_exe("horovodrun")
    if exe is None:
        pytest.fail("horovodrun not found in .venv/bin or on PATH: run `make setup`")
    return exe


@pytest.fixture(scope="session")
def mpirun_exe():
    exe = helpers.find_exe("mpirun")
    if exe is None:
        pytest.skip("mpirun (Open MPI) is not installed on this machine")
    return exe


@pytest.fixture
def torch_single_thread():
    """One intra-op thread for the duration of a test, restored afterwards. Small CPU models gain nothing from
    more, and on a busy 2-core machine OpenMP threads that spin against other processes slow tests ~5x.
    Opt in with `pytestmark = pytest.mark.usefixtures("torch_single_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def strict_fp32():
    """GPU comparisons in true float32: deterministic cuDNN and no TF32 (torch lets cuDNN's convolutions use TF32
    by default; its ~1e-3 rounding differs per kernel, so a batched grouped convolution and the per-edge ones
    differed by 3e-4 in the loss on an H200). Restored afterwards."""
    import torch

    b = torch.backends
    before = (b.cudnn.deterministic, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32)
    b.cudnn.deterministic, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = True, False, False
    yield
    b.cudnn.deterministic, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = before
