"""Networks: the PC-DARTS search supernet and the evaluation networks built from a genotype."""

from .batched_cell import BatchedOptions
from .eval_network import NetworkCIFAR, NetworkImageNet, count_parameters
from .search_network import ARCH_PARAM_NAMES, MixedOp, SearchNetwork, derive_cell

__all__ = ["ARCH_PARAM_NAMES", "BatchedOptions", "MixedOp", "NetworkCIFAR", "NetworkImageNet", "SearchNetwork",
           "count_parameters", "derive_cell"]
