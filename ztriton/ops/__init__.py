"""The autograd Functions of the layers, one per op: each takes tensors, a frozen configuration and
a backend (`ztriton.backends`), and returns its stats instead of writing into a module."""

from .leaky_readout import LeakyReadoutFunction
from .lif_family import LIFFamilyFunction
from .lif_linear import LIFFunction, LIFStats, PathPolicy

__all__ = ["LIFFamilyFunction", "LIFFunction", "LIFStats", "LeakyReadoutFunction", "PathPolicy"]
