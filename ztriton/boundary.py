"""The torch.compile boundary: the package's layers and their backwards run eagerly under torch.compile.

torch.compile (dynamo) cannot trace what a layer call does: it draws its LocalZO key from torch's
generator (inside a graph, inductor's own random numbers would differ from eager ones), chooses
its path from the measured activity, keeps active sets of data-dependent size, takes and returns
sparse COO tensors (events, sparse gradients between layers), which torch.compile does not
support, and calls numba / Triton kernels. `eager_under_compile` puts a `torch.compiler.disable`
boundary around such a function (and around `spike_count`, which reads a layer's cached events):
dynamo breaks the graph there (one break per call), runs
it and everything it calls eagerly, and compiles the code around it.
"""

from __future__ import annotations

import torch

#: why torch.compile runs the layers and their backwards eagerly (one graph break per layer; fullgraph=True
#: raises with this reason)
EAGER_UNDER_COMPILE = (
    "ztriton's SparseLIFLinear, LeakyReadout and spike_count run eagerly under torch.compile, forward and backward: the "
    "LocalZO RNG key must come from torch's generator outside the graph (inductor's random numbers differ "
    "from eager), the path is chosen from the measured activity, the active sets have data-dependent sizes, "
    "inputs and gradients may be sparse COO tensors (which torch.compile does not support) and the kernels "
    "are numba / Triton calls; compile with fullgraph=False (the default): the code around the layers compiles")


def eager_under_compile(function):
    """`function` behind a `torch.compiler.disable` boundary: torch.compile runs it eagerly (a graph
    break where a compiled frame calls it; every frame it calls stays eager too) and compiles the
    code around it. On the layers' forwards and the Functions' backwards (which the autograd engine
    calls from a compiled frame's `loss.backward()`, whose frames dynamo would otherwise trace).
    Eager cost: the wrapper's eval-frame switch, 1-4 us per call measured here."""
    return torch.compiler.disable(function, reason=EAGER_UNDER_COMPILE)
