"""Interoperability with the rest of the field (DESIGN.md section 10): NIR export and import
(`to_nir`, `from_nir`) and LocalZO as the surrogate of snntorch and spikingjelly neurons
(`snntorch_spike_grad`, `spikingjelly_surrogate`). nir, snntorch and spikingjelly are optional:
nothing here imports them until a function needs them (pip install "ztriton[interop]")."""

from .nir import DEFAULT_DT, SUBTRACT_RESETS, from_nir, to_nir
from .surrogates import LocalZOSpikeGrad, snntorch_spike_grad, spikingjelly_surrogate

__all__ = ["DEFAULT_DT", "SUBTRACT_RESETS", "LocalZOSpikeGrad", "from_nir", "snntorch_spike_grad",
           "spikingjelly_surrogate", "to_nir"]
