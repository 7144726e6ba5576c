"""The native (numba) LIF family ops (DESIGN.md section 9) against the torch reference ops.

`lif_family_forward`, `lif_adjoint` and `lif_adjoint_grid` of `backends.native_backend` and `backends.lif_family` on
the same arguments: float64 to 1e-12, float32 to rounding (the active sets and spikes are compared
exactly here; the sizes are small enough that no entry lies within float32 rounding of a
threshold), every variant, SparseGrad and LocalZO (the same draws by the RNG contract: the same
active set under one key), event-driven and dense (GEMM) input, batches of several blocks, the
capacity retry. And a recurrent layer at width 200 on both backends.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ztriton import SparseLIFLinear, native
from ztriton.backends import LIFConfig, SpikeRule, Workspace
from ztriton.distributions import get_distribution
from ztriton.rng import PhiloxKey
from ztriton.sparse import ActiveSet, producer_of

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason="numba is not installed")

if native.AVAILABLE:
    from ztriton.backends import lif_family as reference
    from ztriton.backends import native_backend

TOLERANCE = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}
VARIANTS = list(itertools.product([False, True], ["subtract", "zero"], [False, True], [False, True]))


def problem(dtype, recurrent, density, steps=17, batch=24, n_in=11, n_out=9, seed=0):
    """(x, W, b, V or None, theta) with enough spikes and near-threshold entries to mean anything."""
    gen = torch.Generator().manual_seed(seed)
    x = ((torch.rand(steps, batch, n_in, generator=gen) < density)
         * torch.rand(steps, batch, n_in, generator=gen).add(0.5)).to(dtype)
    weight = (torch.randn(n_out, n_in, generator=gen) * (0.6 / density ** 0.5)).to(dtype)
    bias = (torch.rand(n_out, generator=gen) * 0.2).to(dtype)
    rec = (torch.randn(n_out, n_out, generator=gen) * 0.5).to(dtype) if recurrent else None
    theta = torch.linspace(0.8, 1.2, n_out, dtype=dtype)
    return x, weight, bias, rec, theta


def config(grad, reset, learn_beta, learn_threshold):
    rule = SpikeRule(grad, get_distribution("normal"), 0.3, 3, 0.6)
    return LIFConfig(0.85, 0.01, rule, reset, trace_leak=learn_beta,
                     trace_reset=learn_threshold and reset == "subtract")


def both_forwards(x, weight, bias, rec, theta, cfg, needs_grad=True, key=PhiloxKey(123, 5)):
    args = (x, weight, bias, rec, theta, cfg, needs_grad, key)
    return reference.lif_family_forward(*args, Workspace()), native_backend.lif_family_forward(*args, Workspace())


def assert_same_forward(ref, got, dtype):
    assert torch.equal(ref.spikes, got.spikes)
    assert ref.g is None and got.g is None
    assert torch.equal(ref.active.index, got.active.index)
    assert ref.active.grad.dtype == got.active.grad.dtype and ref.active.shape == got.active.shape
    torch.testing.assert_close(got.active.grad, ref.active.grad, **TOLERANCE[dtype])
    for ours, theirs in zip(got.traces, ref.traces):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            assert ours.dtype == theirs.dtype
            torch.testing.assert_close(ours, theirs, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grad", ["sparsegrad", "localzo"])
@pytest.mark.parametrize("recurrent,reset,learn_beta,learn_threshold", VARIANTS)
def test_native_family_forward_equals_torch(recurrent, reset, learn_beta, learn_threshold, grad, dtype):
    cfg = config(grad, reset, learn_beta, learn_threshold)
    for density in (0.02, 0.3):  # events, then the GEMM current
        ref, got = both_forwards(*problem(dtype, recurrent, density), cfg)
        assert 0.02 < ref.spikes.mean() < 0.5 and ref.active.nnz > 50
        assert_same_forward(ref, got, dtype)
        if reset == "zero":
            assert (got.traces.last_spike >= 0).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_family_inference_forward_keeps_no_entries(dtype):
    ref, got = both_forwards(*problem(dtype, True, 0.02), config("localzo", "zero", True, True), needs_grad=False,
                             key=None)
    assert torch.equal(ref.spikes, got.spikes) and got.active is None and got.g is None
    assert got.traces == (None, None, None)


def test_native_family_capacity_retry_gives_the_same_result():
    x, weight, bias, rec, theta = problem(torch.float64, True, 0.02)
    cfg = config("sparsegrad", "zero", True, False)
    workspace = Workspace()
    workspace.hints.update(family_candidates_per_row=1, family_spikes_per_row=1)  # every row overflows
    got = native_backend.lif_family_forward(x, weight, bias, rec, theta, cfg, True, None, workspace)
    assert workspace.hints["family_candidates_per_row"] > 1 and workspace.hints["family_spikes_per_row"] > 1
    assert_same_forward(reference.lif_family_forward(x, weight, bias, rec, theta, cfg, True, None, Workspace()), got,
                        torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("recurrent,reset", [(False, "zero"), (True, "subtract"), (True, "zero")])
def test_native_adjoint_equals_torch(recurrent, reset, dtype):
    x, weight, bias, rec, theta = problem(dtype, recurrent, 0.3)
    forward = reference.lif_family_forward(x, weight, bias, rec, theta, config("sparsegrad", reset, False, False), True,
                                           None, Workspace())
    active = forward.active
    ext = torch.randn(active.nnz, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    index = torch.nonzero(x.reshape(-1)).squeeze(1)
    targets = ActiveSet(index, torch.ones(index.numel(), dtype=dtype), x.shape)
    spikes = forward.spikes if reset == "zero" else None
    for wanted, full_grid in ((targets, False), (None, True), (None, False)):
        args = (ext, active, 0.85, spikes, rec, weight, wanted, full_grid, Workspace())
        for ours, theirs in zip(native_backend.lif_adjoint(*args), reference.lif_adjoint(*args)):
            assert (ours is None) == (theirs is None)
            if ours is not None:
                assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
                torch.testing.assert_close(ours, theirs, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("recurrent,reset", [(False, "zero"), (True, "subtract"), (True, "zero")])
def test_native_adjoint_grid_equals_torch(recurrent, reset, dtype):
    x, weight, bias, rec, theta = problem(dtype, recurrent, 0.3)
    forward = reference.lif_family_forward(x, weight, bias, rec, theta, config("sparsegrad", reset, False, False), True,
                                           None, Workspace())
    g = forward.active.dense().to(dtype)
    ext = torch.randn(g.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    args = (ext, g, 0.85, forward.spikes if reset == "zero" else None, rec)
    for ours, theirs in zip(native_backend.lif_adjoint_grid(*args), reference.lif_adjoint_grid(*args)):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, **TOLERANCE[dtype])


def recurrent_layer(backend, dtype, grad="sparsegrad", seed=0):
    torch.manual_seed(seed)
    layer = SparseLIFLinear(60, 200, beta=0.9, recurrent=True, reset="zero", learn_beta=True, learn_threshold=True,
                            grad=grad, delta=0.2, path="sparse", bias=True, backend=backend,
                            generator=torch.Generator().manual_seed(11)).to(dtype)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    return layer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recurrent_layer_width_200_native_equals_torch(dtype):
    """T 50, B 8, width 200: the same spikes, active set and gradients; the family ops ran natively."""
    gen = torch.Generator().manual_seed(4)
    data = (torch.rand(50, 8, 60, generator=gen) < 0.1).to(dtype)
    results = []
    for backend in ("torch", "native"):
        layer = recurrent_layer(backend, dtype, grad="localzo")
        x = data.clone().requires_grad_()
        spikes = layer(x)
        (spikes * torch.linspace(-1, 1, 200, dtype=dtype)).sum().backward()
        results.append((spikes, producer_of(spikes), x.grad, {n: p.grad for n, p in layer.named_parameters()}))
        if backend == "native":
            ops = layer.stats["ops"]
            assert ops["forward"] == "native" and ops["adjoint"] == "native"
    (s_ref, active_ref, dx_ref, grads_ref), (s_got, active_got, dx_got, grads_got) = results
    assert 0.01 < s_ref.mean() < 0.3
    assert torch.equal(s_got, s_ref)
    assert torch.equal(active_got.index, active_ref.index)  # LocalZO: one key, the same draws
    tolerance = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx_got, dx_ref, **tolerance)
    assert grads_got.keys() == grads_ref.keys() == {"weight", "bias", "recurrent_weight", "beta_logit", "threshold"}
    for name, ref in grads_ref.items():
        torch.testing.assert_close(grads_got[name], ref, **tolerance, msg=lambda m: f"{name}: {m}")
