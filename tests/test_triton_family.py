"""The Triton forward of the LIF family (kernels/lif_family_forward.py) against the torch op, float32.

Under TRITON_INTERPRET=1 on CPU (conftest) or on a GPU. Tolerances: spikes may differ at the
threshold boundary (fp32 summation order of the recurrent current; on a GPU, FMA and `tl.randn` ulps)
at a flip rate of at most FLIP of the entries, and a flip changes the active set only near it: the
active sets may differ in at most FLIP of the entries; at the common entries g and the traces
agree to TOL, the last spike exactly. On CPU the interpreter gives equal spikes and active sets in
these cases. The whole matrix recurrent x reset x traces x rule runs in the default test command
(about 20 s under the interpreter).
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from ztriton import SparseLIFLinear, get_distribution  # noqa: E402
from ztriton.backends.base import LIFConfig, SpikeRule, Workspace  # noqa: E402
from ztriton.backends.registry import OPS, dispatch  # noqa: E402
from ztriton.backends.triton_backend import TritonBackend  # noqa: E402
from ztriton.rng import PhiloxKey  # noqa: E402
from ztriton.sparse import ActiveSet  # noqa: E402

if not TritonBackend.available(torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32):
    pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from ztriton.kernels import lif_family_forward as kernel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLIP = 2e-3  # fraction of entries whose spike (or membership of the active set) may differ
TOL = dict(rtol=1e-4, atol=1e-5)


def case(steps=7, batch=3, n_in=11, n_out=21, density=0.3, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(steps, batch, n_in, generator=gen) < density).to(dtype)
    weight = torch.randn(n_out, n_in, generator=gen) * 0.9
    recurrent = torch.randn(n_out, n_out, generator=gen) * (1.5 / n_out ** 0.5)
    bias = torch.randn(n_out, generator=gen) * 0.1
    threshold = torch.rand(n_out, generator=gen) * 0.8 + 0.4
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(x), to(weight).to(dtype), to(recurrent).to(dtype), to(bias).to(dtype), to(threshold)


def rule_of(grad: str, m: int = 2) -> SpikeRule:
    return SpikeRule(grad, get_distribution("normal"), 0.4, m, 0.6)


def run_both(x, weight, bias, recurrent, threshold, cfg, needs_grad=True, key=PhiloxKey(1234, 5)):
    args = (x, weight, bias, recurrent, threshold, cfg, needs_grad, key)
    ref = OPS["lif_family_forward", "torch"].run(*args, Workspace())
    out, ran = dispatch("lif_family_forward", "triton", *args, Workspace())
    assert ran == "triton"
    return ref, out


def assert_same_forward(ref, out):
    flips = (ref.spikes != out.spikes).float().mean().item()
    assert flips <= FLIP, f"spike flip rate {flips}"
    assert (ref.g is None) == (out.g is None) and (ref.active is None) == (out.active is None)
    if ref.g is not None:  # dense path: g and the dense trace grids
        close = torch.isclose(ref.g, out.g, **TOL).float().mean().item()
        assert close >= 1 - FLIP
        for one, two in zip(ref.traces, out.traces):
            assert (one is None) == (two is None)
            if one is not None:
                assert torch.isclose(one, two, **TOL).float().mean().item() >= 1 - FLIP
        return
    if ref.active is None:
        return
    a, b = ref.active.index.cpu(), out.active.index.cpu()
    assert torch.equal(b, torch.sort(b).values)  # sorted by flat index
    common, ia, ib = _intersect(a, b)
    differ = a.numel() + b.numel() - 2 * common.numel()
    assert differ <= FLIP * ref.spikes.numel(), f"{differ} entries differ in the active sets"
    torch.testing.assert_close(out.active.grad.cpu()[ib], ref.active.grad.cpu()[ia], **TOL)
    for name, one, two in zip(("leak", "reset", "last"), ref.traces, out.traces):
        assert (one is None) == (two is None), name
        if one is None:
            continue
        if name == "last":
            assert torch.equal(two.cpu()[ib], one.cpu()[ia])
        else:
            torch.testing.assert_close(two.cpu()[ib], one.cpu()[ia], rtol=1e-4, atol=1e-4)


def _intersect(a, b):
    """(common values, their positions in a, in b) of two sorted int64 vectors."""
    both = torch.cat([a, b])
    values, counts = torch.unique(both, return_counts=True)
    common = values[counts > 1]
    return common, torch.searchsorted(a, common), torch.searchsorted(b, common)


CASES = list(itertools.product((True, False), ("subtract", "zero"), (False, True), ("localzo", "sparsegrad", "surrogate")))


@pytest.mark.parametrize("recurrent,reset,traces,grad", CASES)
def test_family_forward_matches_torch(recurrent, reset, traces, grad):
    x, weight, rec, bias, threshold = case(seed=CASES.index((recurrent, reset, traces, grad)))
    cfg = LIFConfig(0.85, 1.0, rule_of(grad), reset, trace_leak=traces, trace_reset=traces and reset == "subtract")
    ref, out = run_both(x, weight, bias, rec if recurrent else None, threshold, cfg)
    assert ref.spikes.sum() > 0 and (ref.spikes == 0).any()  # a case with spikes and silences
    if ref.active is not None:
        assert ref.active.nnz > 0
    assert_same_forward(ref, out)


def test_recurrent_current_over_several_tiles_with_skipped_ones():
    """N 300: BLOCK_N 512, TILE_K 16, 19 tiles of V per step; sparse spikes leave most tiles without a
    spike (skipped), so both branches run; no bias, layer's own spikes carry the activity."""
    assert kernel.block_width(300, True) == 512 and kernel.tile_k(512) == 16
    x, weight, rec, _, threshold = case(steps=5, batch=2, n_in=9, n_out=300, density=0.3, seed=3)
    cfg = LIFConfig(0.9, 1.0, rule_of("sparsegrad"), "zero", trace_leak=True)
    ref, out = run_both(x, weight, None, rec * 2.0, threshold, cfg)
    rate = ref.spikes.mean().item()
    assert 0.005 < rate < 0.5
    assert_same_forward(ref, out)


def test_inference_and_half_precision():
    x, weight, rec, bias, threshold = case(seed=5)
    cfg = LIFConfig(0.8, 1.0, rule_of("localzo"), "subtract")
    ref, out = run_both(x, weight, bias, rec, threshold, cfg, needs_grad=False)
    assert out.g is None and out.active is None and out.traces == (None, None, None)
    assert torch.equal(ref.spikes, out.spikes)
    half = [t.half() if t.is_floating_point() and t is not threshold else t for t in case(seed=5)]
    ref, out = run_both(*half[:2], half[3], half[2], threshold, cfg)
    assert out.spikes.dtype == torch.float16
    assert (ref.spikes != out.spikes).float().mean().item() <= 0.02  # fp16 current: a few more flips allowed


def test_capacity_retry_gives_the_same_set():
    """A capacity hint of 1 entry: the kernel runs again with the exact count, same draws."""
    x, weight, rec, bias, threshold = case(seed=6)
    cfg = LIFConfig(0.85, 1.0, rule_of("localzo"), "zero", trace_leak=True)
    args = (x, weight, bias, rec, threshold, cfg, True, PhiloxKey(99, 0))
    space = Workspace()
    first = OPS["lif_family_forward", "triton"].run(*args, space)
    space.hints["family_active"] = 1
    again = OPS["lif_family_forward", "triton"].run(*args, space)
    assert torch.equal(first.active.index, again.active.index) and torch.equal(first.active.grad, again.active.grad)
    assert torch.equal(first.traces.last_spike, again.traces.last_spike)


def test_wide_layers(monkeypatch):
    """Above MAX_WIDTH (patched to 16 here): a recurrent layer is declined and runs on torch; a
    feed-forward one runs on Triton in several column blocks per row."""
    monkeypatch.setattr(kernel, "MAX_WIDTH", 16)
    x, weight, rec, bias, threshold = case(n_out=40, seed=7)
    cfg = LIFConfig(0.85, 1.0, rule_of("localzo"), "subtract", trace_leak=True, trace_reset=True)
    args = (x, weight, bias, rec, threshold, cfg, True, PhiloxKey(7, 0), Workspace())
    assert dispatch("lif_family_forward", "triton", *args)[1] == "torch"
    ref, out = run_both(x, weight, bias, None, threshold, cfg)
    assert kernel.block_width(40, False) == 16  # three column blocks
    assert_same_forward(ref, out)
    with pytest.raises(ValueError, match="MAX_WIDTH"):
        kernel.block_width(40, True)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_layer_reports_the_op_that_ran_and_trains_like_torch(reset, monkeypatch):
    """SparseLIFLinear(recurrent=True) on the Triton backend: stats['ops'] names the Triton forward and
    adjoint; spikes and gradients match the torch backend's. Wider than MAX_WIDTH the forward op is torch's."""
    x = (torch.rand(6, 3, 10, generator=torch.Generator().manual_seed(8)) < 0.3).float().to(DEVICE)
    layers, outs, grads = {}, {}, {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        layer = SparseLIFLinear(10, 20, beta=0.85, recurrent=True, reset=reset, learn_beta=True, learn_threshold=True,
                                grad="sparsegrad", bias=True, path="sparse", backend=backend).to(DEVICE)
        with torch.no_grad():
            layer.weight.mul_(3.0)
        spikes = layer(x)
        (spikes * torch.linspace(-1, 1, spikes.numel(), device=DEVICE).view_as(spikes)).sum().backward()
        layers[backend], outs[backend] = layer, spikes
        grads[backend] = [p.grad for p in layer.parameters()]
    assert layers["triton"].stats["ops"]["forward"] == "triton"
    assert layers["triton"].stats["ops"]["adjoint"] == "triton", layers["triton"].stats["ops"]
    assert 0 < outs["torch"].sum() and (outs["torch"] != outs["triton"]).float().mean().item() <= FLIP
    for one, two in zip(grads["torch"], grads["triton"]):
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(kernel, "MAX_WIDTH", 16)
    layers["triton"](x)
    assert layers["triton"].stats["ops"]["forward"] == "torch"


def _adjoint_case(steps, batch, n_out, n_in, recurrent, zero, seed, density=0.3):
    gen = torch.Generator().manual_seed(seed)
    index = torch.nonzero((torch.rand(steps, batch, n_out, generator=gen) < density).view(-1)).squeeze(1)
    active = ActiveSet(index.to(DEVICE), torch.rand(index.numel(), generator=gen).to(DEVICE), (steps, batch, n_out))
    ext = torch.randn(index.numel(), generator=gen).to(DEVICE)
    spikes = (torch.rand(steps, batch, n_out, generator=gen) < 0.2).float().to(DEVICE) if zero else None
    recurrent_weight = torch.randn(n_out, n_out, generator=gen).to(DEVICE) if recurrent else None
    weight = torch.randn(n_out, n_in, generator=gen).to(DEVICE)
    upstream = torch.nonzero((torch.rand(steps, batch, n_in, generator=gen) < 0.3).view(-1)).squeeze(1).to(DEVICE)
    targets = ActiveSet(upstream, torch.ones(upstream.numel(), device=DEVICE), (steps, batch, n_in))
    return ext, active, spikes, recurrent_weight, weight, targets


@pytest.mark.parametrize("recurrent,zero", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("shape", [(6, 3, 21), (1, 2, 5), (4, 2, 300)])
def test_adjoint_matches_torch(recurrent, zero, shape):
    """ds at the active entries, dL/dx at the upstream targets and the delta grid, against the torch op
    (T 1, odd widths, a row of 300 over BLOCK_E 16 entries per tile)."""
    ext, active, spikes, rec, weight, targets = _adjoint_case(*shape, 7, recurrent, zero, seed=sum(shape))
    for use_targets, full in ((True, False), (False, True), (False, False)):
        args = (ext, active, 0.8, spikes, rec, weight, targets if use_targets else None, full, Workspace())
        ref = OPS["lif_adjoint", "torch"].run(*args)
        out, ran = dispatch("lif_adjoint", "triton", *args)
        assert ran == "triton"
        # float32 sums of up to N terms in another order: 1e-4 relative
        torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-4)
        for one, two in zip(ref[1:], out[1:]):
            assert (one is None) == (two is None)
            if one is not None:
                torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-4)


def test_adjoint_of_an_empty_set_and_above_the_width(monkeypatch):
    ext, active, spikes, rec, weight, targets = _adjoint_case(3, 2, 9, 4, True, True, seed=1, density=0.0)
    assert active.nnz == 0
    out, ran = dispatch("lif_adjoint", "triton", ext, active, 0.8, spikes, rec, weight, targets, True, Workspace())
    assert ran == "triton" and out[0].numel() == 0 and not out[2].any() and not out[1].any()
    monkeypatch.setattr(kernel, "MAX_WIDTH", 8)
    assert dispatch("lif_adjoint", "triton", ext, active, 0.8, spikes, rec, weight, targets, True, Workspace())[1] == "torch"
