"""ztriton: sparse training of spiking neural networks with LocalZO (Mukhoty, Bojković et al., NeurIPS 2023) and SparseGrad."""

from ._checks import set_value_checks
from .distributions import (
    Distribution,
    distribution_from_surrogate,
    get_distribution,
)
from .functional import localzo_spike, sparsegrad_spike, spike_count, surrogate_spike
from .layers import BackendFallbackWarning, LeakyReadout, SilentLayerWarning, SparseLIFLinear
from .calibration import calibrate
from .interop import from_nir, to_nir
from .scheduler import Scheduler

__version__ = "0.1.0"

__all__ = [
    "BackendFallbackWarning",
    "Distribution",
    "LeakyReadout",
    "Scheduler",
    "SilentLayerWarning",
    "SparseLIFLinear",
    "calibrate",
    "distribution_from_surrogate",
    "from_nir",
    "get_distribution",
    "localzo_spike",
    "set_value_checks",
    "sparsegrad_spike",
    "spike_count",
    "surrogate_spike",
    "to_nir",
]
