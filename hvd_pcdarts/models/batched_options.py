"""BatchedOptions: how the batched search cell (models/batched_cell.py) computes, a frozen value handed to the
network (SearchNetwork(batched_options=...)) and from it to each cell's runner."""

from __future__ import annotations

import dataclasses

from .batched_ops import STREAM_MODES

_CHOICES = {"pointwise": ("auto", "dense", "grouped"), "cl_grads": (True, False), "streams": STREAM_MODES,
            "dedup": (False, True), "dilated": ("native", "3x3", "all"), "fuse": ("off", "5x5", "all"),
            "depthwise": ("cudnn", "triton", "hybrid"), "pool": ("torch", "triton"), "pack": (True, False),
            "sums": ("torch", "triton")}
# the choices whose code is in experimental/: untimed on a GPU, off by default (first entry of _CHOICES)
EXPERIMENTAL = ("dedup", "dilated", "fuse", "depthwise", "pool", "sums")


@dataclasses.dataclass(frozen=True)
class BatchedOptions:
    """How the batched op computes, handed to the network (SearchNetwork(batched_options=...)) and from it to each
    cell's runner; benchmarks/search_step.py's variant suffixes (+pwg, +ud3, +tdh, ..., BE_OPTIONS there) build
    one for A/B timings. The results are the same for every choice (tests/test_batched.py and the kernel tests run
    each against the per-edge reference). A bad value is a ValueError here.

    - pointwise: the 1x1 convolutions of the stacked edges (pointwise convs, FactorizedReduce): "grouped"
      (groups=E, each edge's weight) or "dense" (one block-diagonal weight: E x the FLOPs, but one GEMM instead of
      cuDNN's grouped kernels with C/K channels per group, 5x slower on an H100); "auto": dense on CUDA, grouped
      elsewhere.
    - cl_grads: channels_last runs: the gradient reaching each group's ops made channels_last (the backward of the
      node sums/unbind hands back NCHW gradients, which send BN backward to its slow strided kernel and cuDNN to
      layout conversions).
    - streams: the independent ops of a group (pools, skip, separable and dilated convs) on CUDA side streams,
      forked from and joined back to the current stream: "capture" = only while a CUDA graph is captured (the
      graph then holds parallel branches, their backward runs on the same streams; H100: B=256 143.8 -> 129.5 ms,
      B=32 44.8 -> 34.0 ms, bit-identical results), "on" = eager too (launch-bound there: no gain expected), "off".
    - pack: the convolution weights of a cell as one tensor (models/weight_pack.py). False: a cat per grouped conv,
      a multiply by eye(E) per block-diagonal weight (a multiply + sum in its backward) and, under autocast, a
      cast per conv forward and per weight gradient: one search step's ops in the graph, counted on the CPU with
      CUDA's choices: 8,381 -> 7,253 in float32, 9,766 -> 7,498 in bf16. Bit-identical. Not yet timed on a GPU
      (benchmarks/RESULTS.md).
    - dedup, dilated, fuse, depthwise, pool, sums: untimed variants, off by default; their code and description
      are in experimental/batched_variants.py (imported only when one of them is chosen) and the Triton kernels
      experimental/depthwise.py, pooling.py and sums.py.
    """

    pointwise: str = "auto"
    cl_grads: bool = True
    streams: str = "capture"
    dedup: bool = False
    dilated: str = "native"
    fuse: str = "off"
    depthwise: str = "cudnn"
    pool: str = "torch"
    pack: bool = True
    sums: str = "torch"

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                words = [str(a) for a in allowed]
                raise ValueError(f"BatchedOptions.{name} = {value!r}: {', '.join(words[:-1])} or {words[-1]}")

    @property
    def experimental(self) -> bool:
        """Whether a choice other than the default's needs experimental/."""
        return any(getattr(self, name) != _CHOICES[name][0] for name in EXPERIMENTAL)
