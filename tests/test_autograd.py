"""Gradients under any composition: sparse input gradients travel through autograd itself.

Every test compares with the plain autograd BPTT of `ztriton.bptt` (written independently of the
engine), each layer using the g its own forward formed, on both paths and all three gradient rules.
"""

import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from ztriton import LeakyReadout, SilentLayerWarning, SparseLIFLinear, spike_count
from ztriton.bptt import BPTTLIF, BPTTReadout, Surrogate
from ztriton.sparse import ActiveSet, producer_of, values_at

TOL = dict(rtol=1e-9, atol=1e-9)  # float64 engine vs float64 autograd: summation order only
X = (torch.rand(19, 3, 11, generator=torch.Generator().manual_seed(3)) < 0.4).double()
MODES = ["localzo", "sparsegrad", "surrogate"]


def stack(grad, path, seed=0, delta=0.4):
    torch.manual_seed(seed)
    l1 = SparseLIFLinear(11, 9, beta=0.9, grad=grad, delta=delta, path=path).double()
    l2 = SparseLIFLinear(9, 7, beta=0.8, grad=grad, delta=delta, path=path).double()
    readout = LeakyReadout(7, 3, beta=0.85).double()
    with torch.no_grad():
        l1.weight.mul_(3)
        l2.weight.mul_(3)
    return l1, l2, readout


def g_of(layer, v_shape_spikes, grad):
    """The g a layer formed in its last forward (dense grid), read back for the reference."""
    active = producer_of(v_shape_spikes)
    if active is not None:
        return active.dense().double()
    return None


def reference(l1, l2, readout, x, g1, g2, between, grad, with_count=False):
    """Autograd BPTT with fixed g per layer (`None`: the dense normal surrogate at the layers' delta)."""
    surrogate = Surrogate.dense("normal", 0.4)
    r1, r2 = BPTTLIF.from_layer(l1, surrogate), BPTTLIF.from_layer(l2, surrogate)
    r3 = BPTTReadout.from_layer(readout)
    xi = x.clone().requires_grad_(True)
    h1 = r1(xi, g1)
    h1.retain_grad()
    h = between(h1.clone())
    h2 = r2(h, g2)
    loss = r3(h2).amax(0).pow(2).sum()
    if with_count:
        loss = loss + 0.3 * h1.sum(0).pow(2).sum() + 0.2 * h2.sum(0).sum()
    loss.backward()
    return [m.weight.grad for m in (r1, r2, r3)] + [xi.grad], h1.grad


def engine(grad, path, between, with_count=False, backward=None):
    l1, l2, readout = stack(grad, path)
    torch.manual_seed(5)
    xi = X.clone().requires_grad_(True)
    h1 = l1(xi)
    h1.retain_grad()
    g1 = g_of(l1, h1, grad)
    h = between(h1)
    h2 = l2(h)
    g2 = g_of(l2, h2, grad)
    loss = readout(h2).amax(0).pow(2).sum()
    if with_count:
        loss = loss + 0.3 * spike_count(h1).pow(2).sum() + 0.2 * spike_count(h2).sum()
    (backward or (lambda loss, mods: loss.backward()))(loss, (l1, l2, readout))
    grads = [m.weight.grad for m in (l1, l2, readout)] + [xi.grad]
    return (l1, l2, readout), grads, (g1, g2), h1


def check(grad, path, between, with_count=False, backward=None):
    mods, grads, (g1, g2), h1 = engine(grad, path, between, with_count, backward)
    if grad != "surrogate" and path == "dense":  # g of a dense-path layer is not exposed: take it from a sparse run
        _, _, (g1, g2), _ = engine(grad, "sparse", between, with_count)
    ref, ref_h1_grad = reference(*mods, X, g1, g2, between, grad, with_count)
    assert mods[0].stats["active_fraction"] > 0.01
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, **TOL)
    return h1, ref_h1_grad, g1


MASK = (torch.rand(19, 3, 9, generator=torch.Generator().manual_seed(8)) < 0.7).double()
IN_PLACE = {
    "mul_(2)": lambda h: h.mul_(2),
    "mul_(mask)": lambda h: h.mul_(MASK),  # in-place dropout
    "masked_fill_": lambda h: h.masked_fill_(MASK == 0, 0.0),
    "add_": lambda h: h.add_(0.5),
}


@pytest.mark.parametrize("op", sorted(IN_PLACE))
@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("grad", MODES)
def test_in_place_ops_between_layers(op, path, grad):
    check(grad, path, IN_PLACE[op])


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("grad", MODES)
def test_direct_stack_with_spike_count_regulariser(path, grad):
    check(grad, path, lambda h: h, with_count=True)


def partial_then_full(loss, mods):
    torch.autograd.grad(loss, [mods[1].weight], retain_graph=True)
    loss.backward(inputs=[mods[2].weight], retain_graph=True)
    mods[2].weight.grad = None
    loss.backward()


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("grad", ["localzo", "sparsegrad"])
def test_partial_backward_first_leaves_no_stale_state(path, grad):
    check(grad, path, lambda h: h, backward=partial_then_full)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_retain_grad_and_hooks_see_the_true_gradient_at_active_entries(path):
    seen = []

    def hooked(h):
        h.register_hook(lambda grad: seen.append(grad))
        return h

    h1, ref_grad, g1 = check("sparsegrad", path, hooked)
    active = g1 != 0
    assert active.sum() > 0
    for grad in (h1.grad, seen[0]):
        # sparse path: a sparse COO gradient holding the active entries; dense path: dense
        assert grad.is_sparse == (path == "sparse")
        dense = grad.to_dense() if grad.is_sparse else grad
        torch.testing.assert_close(dense[active], ref_grad[active], **TOL)
    if path == "sparse":
        assert torch.equal(h1.grad._indices(), producer_of(h1).coo_indices)


def test_one_output_feeding_two_layers_and_retain_graph_twice():
    """Two consumers' sparse gradients sum in autograd; a second backward adds the same again."""
    first = {}
    for path in ("sparse", "dense"):
        l1, l2, readout = stack("sparsegrad", path)
        l3 = SparseLIFLinear(9, 7, beta=0.7, grad="sparsegrad", delta=0.4, path=path).double()
        with torch.no_grad():
            l3.weight.copy_(l2.weight * 1.1)
        xi = X.clone().requires_grad_(True)
        h1 = l1(xi)
        out = readout(l2(h1)).sum() + readout(l3(h1)).pow(2).sum()
        out.backward(retain_graph=True)
        first[path] = l1.weight.grad.clone()
        out.backward()
        torch.testing.assert_close(l1.weight.grad, 2 * first[path], **TOL)
    assert first["sparse"].abs().sum() > 0
    torch.testing.assert_close(first["sparse"], first["dense"], **TOL)  # both paths, the same gradient


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_activation_checkpoint_with_localzo_recomputes_the_same_z(path):
    def run(use_checkpoint):
        l1, l2, readout = stack("localzo", path)
        torch.manual_seed(3)
        xi = X.clone().requires_grad_(True)
        h = checkpoint(l1, xi, use_reentrant=False) if use_checkpoint else l1(xi)
        readout(l2(h)).amax(0).pow(2).sum().backward()
        return [m.weight.grad for m in (l1, l2, readout)] + [xi.grad]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, **TOL)


def test_double_backward_is_a_clear_error():
    l1, l2, readout = stack("localzo", "sparse")
    loss = readout(l2(l1(X))).sum()
    with pytest.raises(RuntimeError, match="LeakyReadout does not support double backward"):
        torch.autograd.grad(loss, [l1.weight], create_graph=True)
    out = l1(X).sum()
    with pytest.raises(RuntimeError, match=r"SparseLIFLinear does not support double backward: its sparse "
                                           r"backward is first-order only \(backward was called with create_graph=True\)"):
        torch.autograd.grad(out, [l1.weight], create_graph=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_half_precision_forms_the_current_in_half_and_runs_the_membrane_in_fp32(dtype, path):
    """Spikes equal a float64 recurrence of the half-precision current; gradients equal the float64
    reference with the same g up to the final rounding to the layer's dtype."""
    steps = 300
    torch.manual_seed(0)
    layer = SparseLIFLinear(40, 30, beta=0.95, grad="sparsegrad", delta=0.3, path=path)
    with torch.no_grad():
        layer.weight.mul_(2)
    layer = layer.to(dtype)
    x = (torch.rand(steps, 4, 40, generator=torch.Generator().manual_seed(1)) < 0.3).to(dtype)
    grad_out = torch.randn(steps, 4, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    xi = x.clone().requires_grad_(True)
    spikes = layer(xi)
    spikes.backward(grad_out.to(dtype))
    current = torch.matmul(x, layer.weight.detach().t()).double()  # formed in the layer's dtype, as nn.Linear
    w = layer.weight.detach().double().requires_grad_(True)
    lif = BPTTLIF(40, 30, beta=0.95, surrogate=Surrogate.truncated("normal", 0.3))  # its dynamics on `current`
    ref = lif.dynamics(current)
    assert spikes.dtype == dtype
    assert (spikes.double() != ref).double().mean() < 1e-3  # fp32 vs fp64 membrane: flips at threshold only
    assert 0.02 < ref.mean() < 0.5
    exact = x.double() @ w.t()
    straight_through = current + (exact - exact.detach())  # the half current's value, the gradient of x W^T
    ref_w = lif.dynamics(straight_through)
    ref_w.backward(grad_out)
    scale = float(w.grad.abs().max())
    torch.testing.assert_close(layer.weight.grad.double(), w.grad, rtol=2e-2, atol=2e-2 * scale)


def test_half_precision_membrane_matches_fp32_on_a_long_sequence():
    """At T = 500 a bf16 membrane flips a few % of spikes; the fp32 membrane of a bf16 layer does not."""
    torch.manual_seed(0)
    layer = SparseLIFLinear(70, 50, beta=0.98, grad="sparsegrad", delta=0.1)
    with torch.no_grad():
        layer.weight.mul_(3)
    x = (torch.rand(500, 4, 70, generator=torch.Generator().manual_seed(1)) < 0.1).float()
    half = layer.to(torch.bfloat16)
    with torch.no_grad():
        current = torch.matmul(x.bfloat16(), half.weight.t()).float()
        ref = BPTTLIF(70, 50, beta=0.98).dynamics(current)
        out = half(x.bfloat16())
    assert ref.mean() > 0.02
    assert (out.float() != ref).float().mean() < 1e-3


def test_a_silent_layer_warns_once_naming_itself():
    layer = SparseLIFLinear(10, 6, beta=0.9, delta=0.05)
    with torch.no_grad():
        layer.weight.mul_(1e-3)
    x = (torch.rand(20, 2, 10, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    with pytest.warns(SilentLayerWarning, match=r"SparseLIFLinear\(10, 6, beta=0.9, .*\) neither fired nor had an "
                                                r"active entry .* scale up its initial weights"):
        layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # once only
        with torch.no_grad():
            SparseLIFLinear(10, 6, beta=0.9)(torch.zeros(5, 1, 10))  # inference never warns
        active = SparseLIFLinear(10, 6, beta=0.9, delta=0.5)
        with torch.no_grad():
            active.weight.mul_(5)
        active(x)


def test_spike_count_backward():
    l1, _, _ = stack("sparsegrad", "sparse")
    h = l1(X)
    weights = torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((spike_count(h) * weights).sum(), [h])
    active = producer_of(h)
    assert grad.is_sparse and grad._nnz() == active.nnz
    t, b, n = active.coo_indices
    torch.testing.assert_close(grad.to_dense()[t, b, n], weights[b, n], rtol=0, atol=0)
    plain = torch.rand(4, 3, 9, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad((spike_count(plain) * weights).sum(), [plain])
    assert not grad.is_sparse
    torch.testing.assert_close(grad, weights.expand(4, 3, 9), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"spikes must have shape \(T, B, N\), got 2 dimensions \(3, 9\)"):
        spike_count(torch.zeros(3, 9))
    with pytest.raises(TypeError, match="spikes must be a floating-point tensor, got dtype torch.int64"):
        spike_count(torch.zeros(2, 3, 9, dtype=torch.int64))


def test_values_at_aligns_any_incoming_gradient():
    shape = torch.Size((3, 2, 4))
    active = ActiveSet(torch.tensor([1, 5, 6, 20]), torch.ones(4), shape)
    dense = torch.arange(24, dtype=torch.float64).view(shape)
    assert values_at(dense, active, torch.float64).tolist() == [1.0, 5.0, 6.0, 20.0]
    assert values_at(dense.to_sparse(), active, torch.float64).tolist() == [1.0, 5.0, 6.0, 20.0]
    # uncoalesced, entries outside the set, a set entry missing
    flat = torch.tensor([5, 5, 23, 1, 0])
    coords = torch.stack([flat // 8, (flat // 4) % 2, flat % 4])
    sparse = torch.sparse_coo_tensor(coords, torch.tensor([1.0, 2.0, 9.0, 4.0, 7.0]), shape, check_invariants=True)
    assert values_at(sparse, active, torch.float64).tolist() == [4.0, 3.0, 0.0, 0.0]
    empty = ActiveSet.empty(shape, "cpu")
    assert values_at(sparse, empty, torch.float64).numel() == 0


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("grad", MODES)
def test_autocast_does_not_change_the_layers(backend, grad):
    """Inside torch.autocast the layers compute in their own dtype, exactly as outside it."""
    if backend == "triton":
        pytest.importorskip("triton")
        from ztriton.backends.triton_backend import TritonBackend

        if not TritonBackend.available(torch.device("cpu"), torch.float32):
            pytest.skip("the Triton backend runs on CPU only under TRITON_INTERPRET=1")
    x = X.float()
    runs = []
    for autocast in (False, True):
        torch.manual_seed(0)
        l1 = SparseLIFLinear(11, 9, beta=0.9, grad=grad, delta=0.4, backend=backend, bias=True)
        readout = LeakyReadout(9, 3, beta=0.85, backend=backend, bias=True)
        with torch.no_grad():
            l1.weight.mul_(3)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            spikes = l1(x)
            out = readout(spikes)
            loss = out.amax(0).pow(2).sum()
        loss.backward()
        assert spikes.dtype == out.dtype == torch.float32
        runs.append([spikes, out, l1.weight.grad, l1.bias.grad, readout.weight.grad])
    for plain, cast in zip(*runs):
        assert torch.equal(plain, cast)
