"""Shared helpers of the Triton kernel tests (test_depthwise.py, test_pooling.py): the interpreter in a
subprocess (TRITON_INTERPRET=1 must be set before triton is imported), and a compile for the H100 (sm_90) with
Triton's own compiler and ptxas, which needs no GPU."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import describe, launch, python_exe


def interpreted(script: str, *args, timeout=600):
    """Run `script` (python -c, with args) with the kernels in Triton's interpreter: its last stdout line as JSON."""
    res = launch([python_exe(), "-c", script, *args], timeout=timeout, env={"TRITON_INTERPRET": "1"})
    assert res.returncode == 0, describe(res)
    return json.loads(res.stdout.strip().splitlines()[-1])


def compile_sm90(fn, pointers: dict, ints, constexprs: dict, num_warps: int, aligned=3) -> str:
    """PTX of the @triton.jit `fn` for an H100: `pointers` name -> "*fp32"/"*bf16"/..., `ints` the int32 arguments,
    the first `aligned` pointers 16-byte aligned (as torch's allocations are)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(pointers)
    sig.update({a: "i32" for a in ints})
    sig.update({name: "constexpr" for name in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(aligned)}
    out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                         target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    return out.asm["ptx"]


def assert_no_spills(ptx: str, tmp_path: Path) -> None:
    """ptxas -v for sm_90a: it assembles, and spills no registers (skipped where triton ships no ptxas)."""
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() or shutil.which(str(ptxas)) is None:
        pytest.skip("triton ships no ptxas here")
    src = tmp_path / "k.ptx"
    src.write_text(ptx)
    res = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(src), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill stores", res.stderr)]
    assert spills and max(spills) == 0, res.stderr


VECTOR_LOAD = r"ld\.global(\.\w+)*\.v[248]"  # a vectorized load along the channels, in PTX

# The search net of the interpreted cell tests: 4 cells, the fewest with every kind of cell input (normal, reduction,
# reduction after a reduction, normal after a reduction); 2 of them reduction cells.
CELLS = 4
# The start of a script for interpreted(): counts the calls of MODULE.FUNCTION (an autograd Function's apply),
# builds a CELLS-cell channels_last search net with random architecture parameters and a batch of odd-sized maps
# (odd maps into the stride-2 ops), and defines compare(options) -> the batched net with BatchedOptions(**options)
# against the per-edge reference: loss, gradient and BN statistics differences in training, eval outputs, the
# bf16-autocast loss, and the counted calls of one forward.
NET_PRELUDE = r"""
import copy, json, torch, torch.nn.functional as F
from hvd_pcdarts import fastpath as fp
from hvd_pcdarts.experimental import MODULE
from hvd_pcdarts.models import BatchedOptions, SearchNetwork
calls = [0]
apply = MODULE.FUNCTION.apply
def counted(*a):
    calls[0] += 1
    return apply(*a)
MODULE.FUNCTION.apply = counted
torch.manual_seed(1)
ref = SearchNetwork(8, 10, CELLS, partial_k=4)
with torch.no_grad():
    for p in ref.arch_parameters():
        p.normal_(0, 1)
fp.to_channels_last(ref)
x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (2,))
def compare(options):
    r = copy.deepcopy(ref)
    n = copy.deepcopy(ref).set_batched_edges(True).set_batched_options(BatchedOptions(**options))
    before = calls[0]
    lr, ln = F.cross_entropy(r(x), y), F.cross_entropy(n(x), y)
    n_calls = calls[0] - before
    gr = torch.autograd.grad(lr, list(r.parameters()))
    gn = torch.autograd.grad(ln, list(n.parameters()))
    err = max(float((a - b).abs().max() / (a.abs().max() + 1e-12)) for a, b in zip(gr, gn))
    stats = max(float((a.double() - b.double()).abs().max())
                for a, b in zip(r.state_dict().values(), n.state_dict().values()))
    r.eval(), n.eval()
    with torch.no_grad():
        ev = float((r(x) - n(x)).abs().max())
    r.train(), n.train()
    with torch.autocast("cpu", torch.bfloat16):
        lb, nb = F.cross_entropy(r(x), y), F.cross_entropy(n(x), y)
    return dict(loss=abs(float(lr.detach()) - float(ln.detach())), grad=err, stats=stats, eval=ev,
                bf16=abs(float(lb.detach()) - float(nb.detach())), calls=n_calls)
"""


def net_script(module: str, function: str, body: str) -> str:
    """NET_PRELUDE for module.function, then `body` (which prints its JSON last)."""
    return NET_PRELUDE.replace("MODULE", module).replace("FUNCTION", function).replace("CELLS", str(CELLS)) + body


def assert_net_close(out: dict) -> None:
    """compare()'s results: float32 rounding in training and eval, bf16 rounding under autocast."""
    for r in out.values():
        assert r["loss"] < 1e-5 and r["grad"] < 1e-3 and r["stats"] < 1e-5 and r["eval"] < 1e-5, out
        assert r["bf16"] < 2e-2, out
