"""Interoperability with other SNN frameworks: LocalZO as the surrogate of snntorch and spikingjelly
neurons (`surrogates`). snntorch and spikingjelly are optional: nothing here imports them until an
adapter needs them."""

from .surrogates import LocalZOSpikeGrad, snntorch_spike_grad, spikingjelly_surrogate

__all__ = ["LocalZOSpikeGrad", "snntorch_spike_grad", "spikingjelly_surrogate"]
