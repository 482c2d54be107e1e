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
