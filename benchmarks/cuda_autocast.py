"""CUDA's autocast policy on the CPU: which dtype each op of a bf16 step really runs in on a GPU, without a GPU.

CPU and CUDA autocast disagree on a few ops that matter for the search cells: on CUDA `addcmul` promotes to the
widest input (a float32 0-dim scale makes the whole product float32) and `sum` without an explicit dtype runs in
float32 (so does `softmax`, `rsqrt`, `exp`, `pow`, ...); on the CPU they keep the input's dtype. A bf16 step traced
on the CPU therefore showed bf16 activations where the GPU ran float32 ones. `emulate()` registers CUDA's policy
for those ops under the AutocastCPU dispatch key (torch.library) for the duration of a `with`:

    with cuda_autocast.emulate(), torch.autocast("cpu", torch.bfloat16):
        loss = model(x)        # dtypes as under torch.autocast("cuda", torch.bfloat16)

Used by step_traffic.py (+bf16 variants) and the tests that keep the bf16 search cells in bf16.
"""

from __future__ import annotations

import contextlib

import torch

# CUDA autocast policies (aten/src/ATen/autocast_mode.cpp) of the ops CPU autocast leaves alone
PROMOTE = ("addcmul", "addcdiv")
FP32 = ("rsqrt", "exp", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "reciprocal", "log")
FP32_SET_OPT_DTYPE = ("sum", "sum.dim_IntList", "softmax.int", "log_softmax.int", "cumsum")


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def _cast(v, dtype):
    if _eligible(v):
        return v.to(dtype)
    if isinstance(v, (list, tuple)):
        return type(v)(_cast(x, dtype) for x in v)
    return v


def _below_autocast(op, args, kwargs):
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
        return op(*args, **kwargs)


def _kernel(op, policy):
    def promote(*args, **kwargs):
        ts = [a for a in list(args) + list(kwargs.values()) if _eligible(a)]
        widest = torch.float32 if any(t.dtype == torch.float32 for t in ts) else torch.get_autocast_dtype("cpu")
        return _below_autocast(op, _cast(args, widest), {k: _cast(v, widest) for k, v in kwargs.items()})

    def fp32(*args, **kwargs):
        return _below_autocast(op, _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()})

    def fp32_set_opt_dtype(*args, **kwargs):
        if kwargs.get("dtype") is None and _eligible(args[0]):
            kwargs = dict(kwargs, dtype=torch.float32)
        return _below_autocast(op, args, kwargs)

    return {"promote": promote, "fp32": fp32, "fp32_set_opt_dtype": fp32_set_opt_dtype}[policy]


@contextlib.contextmanager
def emulate():
    """CUDA's autocast policy for PROMOTE / FP32 / FP32_SET_OPT_DTYPE ops under CPU autocast, inside the block."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        for names, policy in ((PROMOTE, "promote"), (FP32, "fp32"), (FP32_SET_OPT_DTYPE, "fp32_set_opt_dtype")):
            for name in names:
                base, _, overload = name.partition(".")
                op = getattr(getattr(torch.ops.aten, base), overload or "default")
                lib.impl(name, _kernel(op, policy), "AutocastCPU")
        yield
    finally:
        lib._destroy()
