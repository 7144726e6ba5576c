"""Triton kernels against their plain-torch references (interpreter on CPU, compiled on a GPU)."""

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from ztriton.kernels import lif_forward as fused  # noqa: E402
from ztriton.kernels.event_current import event_current, event_current_reference  # noqa: E402
from ztriton.kernels.event_weight_grad import event_weight_grad, event_weight_grad_reference  # noqa: E402
from ztriton.events import events_of  # noqa: E402
from ztriton.kernels.lif_forward import lif_localzo_forward_reference, sample_abs_z  # noqa: E402
from ztriton.kernels.sparse_input_grad import sparse_input_grad, sparse_input_grad_reference  # noqa: E402
from ztriton.kernels.sparse_weight_grad import sparse_weight_grad, sparse_weight_grad_reference  # noqa: E402
from ztriton.kernels.time_filter import (  # noqa: E402
    time_filter, time_filter_reference, trace_checkpoints, trace_checkpoints_reference,
)
from ztriton import get_distribution  # noqa: E402
from ztriton.distributions import FastSigmoid, Sigmoid  # noqa: E402
from ztriton.backends.triton_backend import sampler_args  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tolerances per input dtype, against references computed in float64 (the kernels accumulate in fp32)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3)}
Z = 5.0  # standard errors allowed in statistical checks


@pytest.mark.parametrize("shape", [(1, 5), (7, 3, 11), (13, 300), (50, 2, 3)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("beta", [0.83, 1.0, 0.0])
def test_time_filter(shape, reverse, dtype, beta):
    """Time tiles of 16 steps: T below, at and across several tiles; beta at its limits."""
    src = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype).to(DEVICE)
    out = time_filter(src, beta, reverse=reverse)
    ref = time_filter_reference(src.cpu(), beta, reverse=reverse)
    torch.testing.assert_close(out.cpu().double(), ref, **TOL[torch.float32])


def _active(steps, batch, n_out, fraction, seed):
    gen = torch.Generator().manual_seed(seed)
    index = torch.nonzero(torch.rand(steps * batch * n_out, generator=gen) < fraction).squeeze(1)
    ds = torch.randn(index.numel(), generator=gen)
    return index // n_out, index % n_out, ds


@pytest.mark.parametrize("steps,k", [(1, 4), (16, 16), (37, 16), (9, 4)])
def test_trace_checkpoints(steps, k):
    src = torch.randn(steps, 3, 5, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out = trace_checkpoints(src, 0.83, k)
    assert out.shape == (-(-steps // k), 3, 5)
    torch.testing.assert_close(out.cpu().double(), trace_checkpoints_reference(src.cpu(), 0.83, k), **TOL[torch.float32])


@pytest.mark.parametrize("steps,batch,n_in,n_out,fraction", [(5, 3, 7, 9, 0.3), (37, 2, 130, 17, 0.05),
                                                             (3, 1, 20, 5, 0.0), (40, 4, 9, 6, 0.2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_weight_grad(steps, batch, n_in, n_out, fraction, dtype):
    """dW and db against float64 index_add of the full trace: T past several checkpoints, odd widths."""
    gen = torch.Generator().manual_seed(1)
    x = ((torch.rand(steps, batch, n_in, generator=gen) < 0.3) * torch.rand(steps, batch, n_in, generator=gen)).to(dtype)
    rows, neurons, ds = _active(steps, batch, n_out, fraction, 2)
    args = (x.to(DEVICE), ds.to(DEVICE), rows.to(DEVICE), neurons.to(DEVICE), n_out, 0.83)
    grad_w, grad_b = sparse_weight_grad(*args, bias=True, block_in=64)
    ref_w, ref_b = sparse_weight_grad_reference(x.double(), ds, rows, neurons, n_out, 0.83)
    torch.testing.assert_close(grad_w.cpu().double(), ref_w, **TOL[torch.float32])
    torch.testing.assert_close(grad_b.cpu().double(), ref_b, **TOL[torch.float32])
    again_w, again_b = sparse_weight_grad(*args, bias=True, block_in=64)
    assert torch.equal(grad_w, again_w) and torch.equal(grad_b, again_b)  # no atomics: bit-identical
    assert sparse_weight_grad(*args, bias=False)[1] is None


@pytest.mark.parametrize("steps,batch,n_in,n_out,density", [(7, 3, 33, 45, 0.1), (1, 1, 5, 130, 0.5), (4, 2, 9, 3, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_event_current(steps, batch, n_in, n_out, density, dtype):
    gen = torch.Generator().manual_seed(7)
    x = ((torch.rand(steps, batch, n_in, generator=gen) < density) * torch.rand(steps, batch, n_in, generator=gen))
    weight = torch.randn(n_out, n_in, generator=gen).to(dtype)
    events = events_of(x.to_sparse().to(DEVICE))
    out = event_current(events.row_ptr, events.cols, events.values, weight.to(DEVICE), (steps, batch), block_n=64)
    assert out.dtype == dtype and out.shape == (steps, batch, n_out)
    ref = event_current_reference(events.row_ptr.cpu(), events.cols.cpu(), events.values.cpu(), weight, (steps, batch))
    torch.testing.assert_close(out.cpu().double(), ref, **TOL[dtype])
    torch.testing.assert_close(ref, x.double() @ weight.double().t())


@pytest.mark.parametrize("steps,batch,n_in,n_out,density", [(7, 3, 33, 45, 0.1), (1, 1, 5, 130, 0.5),
                                                             (4, 2, 9, 3, 0.0), (40, 2, 20, 7, 0.05)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_event_weight_grad(steps, batch, n_in, n_out, density, dtype):
    """D^T x over the events equals the dense product, bit-identical when run again (no atomics)."""
    gen = torch.Generator().manual_seed(8)
    x = ((torch.rand(steps, batch, n_in, generator=gen) < density) * torch.rand(steps, batch, n_in, generator=gen))
    filtered = torch.randn(steps, batch, n_out, generator=gen)
    events = events_of(x.to(dtype).to_sparse().to(DEVICE))
    args = (filtered.to(DEVICE), events.row_ptr, events.cols, events.values, n_in)
    out = event_weight_grad(*args, block_o=64)
    ref = event_weight_grad_reference(filtered, events.row_ptr.cpu(), events.cols.cpu(), events.values.cpu(), n_in)
    torch.testing.assert_close(out.cpu().double(), ref, **TOL[torch.float32])
    dense_ref = filtered.reshape(-1, n_out).double().t() @ x.to(dtype).reshape(-1, n_in).double()
    torch.testing.assert_close(ref, dense_ref)
    assert torch.equal(out, event_weight_grad(*args, block_o=64))


@pytest.mark.parametrize("rows_n,n_out,n_in,targets", [(15, 9, 7, 20), (40, 130, 3, 77), (4, 5, 6, 0)])
def test_sparse_input_grad(rows_n, n_out, n_in, targets):
    gen = torch.Generator().manual_seed(3)
    filtered = torch.randn(rows_n, n_out, generator=gen)
    weight = torch.randn(n_out, n_in, generator=gen)
    rows = torch.randint(0, rows_n, (targets,), generator=gen)
    inputs = torch.randint(0, n_in, (targets,), generator=gen)
    out = sparse_input_grad(filtered.to(DEVICE), weight.to(DEVICE), rows.to(DEVICE), inputs.to(DEVICE))
    ref = sparse_input_grad_reference(filtered, weight, rows, inputs)
    torch.testing.assert_close(out.cpu().double(), ref, **TOL[torch.float32])


LAWS = {
    "normal": lambda d: get_distribution("normal"),
    "uniform": lambda d: get_distribution("uniform"),
    "laplace": lambda d: get_distribution("laplace"),
    "sigmoid": lambda d: Sigmoid(delta=d),
    "fast_sigmoid": lambda d: FastSigmoid(delta=d),
}


def _dense(out, shape):
    grid = torch.zeros(shape, dtype=torch.float64)
    grid.view(-1)[out.index.cpu()] = out.values.cpu().double()
    return grid


@pytest.mark.parametrize("name", sorted(LAWS))
@pytest.mark.parametrize("m", [1, 3])
def test_fused_forward_matches_reference_with_the_same_z(name, m):
    delta = 0.3
    law = LAWS[name](delta)
    steps, batch, n = 9, 3, 37
    current = torch.randn(steps, batch, n, generator=torch.Generator().manual_seed(4)) * 0.8 + 0.3
    args = sampler_args(law, torch.device(DEVICE))
    out = fused.lif_forward(current.to(DEVICE), 0.9, 1.0, mode=fused.LOCALZO, delta=delta, m=m, seed=1234, offset=8,
                            alpha=law.alpha, c=law.c, block=64, **args)
    abs_z = torch.stack([sample_abs_z(current.numel(), 1234, 8, k, DEVICE, **args) for k in range(m)])
    abs_z = abs_z.cpu().view(m, steps, batch, n)
    ref_spikes, ref_grad = lif_localzo_forward_reference(current, 0.9, 1.0, law.alpha, law.c, delta, abs_z)
    flips = (out.spikes.cpu().double() != ref_spikes).double().mean()
    assert flips <= 1e-3  # a spike can flip only for v within rounding of 0
    assert torch.equal(out.index, out.index.sort().values) and bool((out.values > 0).all())
    grad = _dense(out, current.shape)
    agree = (grad != 0) == (ref_grad != 0)
    assert agree.double().mean() >= 1 - 1e-3
    assert 0.02 < (ref_grad != 0).double().mean() < 0.9
    torch.testing.assert_close(grad[agree], ref_grad[agree], rtol=1e-5, atol=1e-6)


def test_fused_forward_other_modes_bias_and_spike_dtype():
    gen = torch.Generator().manual_seed(6)
    current = (torch.randn(11, 2, 29, generator=gen) * 0.8).to(DEVICE)
    bias = (torch.randn(29, generator=gen) * 0.3).to(DEVICE)
    ref_spikes, _ = lif_localzo_forward_reference(current.cpu() + bias.cpu(), 0.9, 1.0, 1, 1.0, 1.0,
                                                  torch.ones(1, *current.shape))
    membrane = fused.lif_forward(current, 0.9, 1.0, mode=fused.MEMBRANE, bias=bias)
    assert torch.equal(membrane.spikes.cpu().double(), ref_spikes) and membrane.index is None
    assert torch.equal(membrane.spikes, (membrane.membrane > 0).float())
    sparse = fused.lif_forward(current, 0.9, 1.0, mode=fused.SPARSEGRAD, bias=bias, bth=0.2, capacity=3)
    expected = torch.nonzero(membrane.membrane.abs().view(-1) < 0.2).squeeze(1)
    assert torch.equal(sparse.index, expected)  # the 3-entry buffer overflowed: rerun at the exact size
    assert torch.equal(sparse.values, membrane.membrane.abs().view(-1)[expected])
    half = fused.lif_forward(current, 0.9, 1.0, mode=fused.SPIKES, bias=bias, spike_dtype=torch.float16)
    assert half.spikes.dtype == torch.float16 and torch.equal(half.spikes.float(), membrane.spikes)
    assert half.index is None and half.membrane is None


@pytest.mark.parametrize("steps", [0, 1, 2])
def test_fused_forward_at_the_fewest_steps(steps):
    """The loads of I[0] and of the next step are masked by block comparisons with T (a scalar
    comparison broke the mask in Triton 3.9's interpreter): T 1 has no next step, T 0 no launch."""
    current = (torch.randn(steps, 2, 29, generator=torch.Generator().manual_seed(8)) * 0.8 + 0.5).to(DEVICE)
    out = fused.lif_forward(current, 0.9, 1.0, mode=fused.MEMBRANE)
    assert out.spikes.shape == out.membrane.shape == current.shape
    if steps:
        ref_spikes, _ = lif_localzo_forward_reference(current.cpu(), 0.9, 1.0, 1, 1.0, 1.0,
                                                      torch.ones(1, *current.shape))
        assert torch.equal(out.spikes.cpu().double(), ref_spikes)
        torch.testing.assert_close(out.membrane[0], current[0] - 1.0)  # v[0] = I[0] - u_th from v[-1] = -u_th


def test_fused_forward_is_reproducible_by_seed():
    law = get_distribution("normal")
    current = torch.randn(6, 2, 50, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    args = dict(mode=fused.LOCALZO, delta=0.5, **sampler_args(law, torch.device(DEVICE)))
    a = fused.lif_forward(current, 0.9, 1.0, seed=7, offset=0, **args)
    b = fused.lif_forward(current, 0.9, 1.0, seed=7, offset=0, capacity=1, **args)  # one more launch, same set
    c = fused.lif_forward(current, 0.9, 1.0, seed=8, offset=0, **args)
    d = fused.lif_forward(current, 0.9, 1.0, seed=7, offset=4, **args)
    assert torch.equal(a.spikes, b.spikes) and torch.equal(a.index, b.index) and torch.equal(a.values, b.values)
    for other in (c, d):  # same spikes, new z for another seed or offset
        assert torch.equal(a.spikes, other.spikes) and not torch.equal(a.index, other.index)


@pytest.mark.parametrize("name,mean_abs", [("normal", math.sqrt(2 / math.pi)), ("uniform", math.sqrt(3) / 2),
                                           ("laplace", 1 / math.sqrt(2)), ("sigmoid", None)])
def test_in_kernel_z_statistics(name, mean_abs):
    law = LAWS[name](0.05)
    n = 200_000
    z = sample_abs_z(n, 99, 0, 0, DEVICE, **sampler_args(law, torch.device(DEVICE))).cpu().double()
    square = z * z
    assert abs(square.mean() - 1.0) < Z * square.std() / math.sqrt(n)  # unit variance
    expected = mean_abs if mean_abs is not None else law.backprop_threshold(0.05) / 0.05
    assert abs(z.mean() - expected) < Z * z.std() / math.sqrt(n)


def test_in_kernel_fast_sigmoid_follows_its_cdf():
    law = FastSigmoid(k=100.0, delta=0.05)
    z = sample_abs_z(100_000, 5, 0, 0, DEVICE, **sampler_args(law, torch.device(DEVICE))).cpu().double().sort().values
    y = 100 * 0.05 * z
    empirical = torch.arange(1, z.numel() + 1, dtype=torch.float64) / z.numel()
    assert ((y / (1 + y)) ** 2 - empirical).abs().max() < 1.95 / math.sqrt(z.numel())


@pytest.mark.gpu
def test_gpu_fused_forward_with_bf16_current():
    law = get_distribution("normal")
    current = torch.randn(50, 64, 200, device="cuda") * 0.8 + 0.3
    args = sampler_args(law, torch.device("cuda"))
    out = fused.lif_forward(current.bfloat16(), 0.9, 1.0, mode=fused.LOCALZO, delta=0.05, seed=3,
                            spike_dtype=torch.bfloat16, **args)
    abs_z = sample_abs_z(current.numel(), 3, 0, 0, "cuda", **args).cpu().view(1, 50, 64, 200)
    ref_spikes, _ = lif_localzo_forward_reference(current.bfloat16().float().cpu(), 0.9, 1.0, 1, 1.0, 0.05, abs_z)
    assert (out.spikes.cpu().double() != ref_spikes).double().mean() < 1e-3


@pytest.mark.gpu
def test_gpu_weight_grad_at_paper_shape():
    x = (torch.rand(500, 256, 700, device="cuda") < 0.02).float()
    rows, neurons, ds = _active(500, 256, 200, 0.005, 6)
    grad_w, grad_b = sparse_weight_grad(x, ds.cuda(), rows.cuda(), neurons.cuda(), 200, 0.82, bias=True)
    ref_w, ref_b = sparse_weight_grad_reference(x.cpu(), ds, rows, neurons, 200, 0.82)
    torch.testing.assert_close(grad_w.cpu().double(), ref_w, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad_b.cpu().double(), ref_b, rtol=1e-4, atol=1e-3)


# --- the layer on the Triton backend -------------------------------------------------------------

from ztriton import BackendFallbackWarning, LeakyReadout, SparseLIFLinear  # noqa: E402
from ztriton.sparse import producer_of  # noqa: E402


def _stack(backend, grad, seed=0, bias=False, path="sparse", gain=1.0):
    torch.manual_seed(seed)
    kwargs = dict(grad=grad, delta=0.3, path=path, backend=backend, bias=bias)
    layers = [SparseLIFLinear(24, 19, beta=0.9, **kwargs), SparseLIFLinear(19, 13, beta=0.8, **kwargs)]
    readout = LeakyReadout(13, 4, beta=0.85)
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(3 * gain)
            if bias:
                layer.bias.normal_(0.0, 0.2)
    return [layer.to(DEVICE) for layer in layers], readout.to(DEVICE)


def _run(layers, readout, x):
    """Spikes (on the layers' device) and every gradient (on CPU) of one forward and backward."""
    torch.manual_seed(11)
    xi = x.to(DEVICE).clone().requires_grad_(True)
    h, spikes = xi, []
    for layer in layers:
        h = layer(h)
        spikes.append(h)
    (readout(h).amax(0).pow(2).sum() + 0.1 * sum(s.sum() for s in spikes)).backward()
    biases = [m.bias.grad for m in layers if m.bias is not None]
    return spikes, [g.cpu() for g in [m.weight.grad for m in layers + [readout]] + biases + [xi.grad]]


X = (torch.rand(14, 3, 24, generator=torch.Generator().manual_seed(2)) < 0.4).float()


@pytest.mark.parametrize("grad,path,bias", [("sparsegrad", "sparse", False), ("sparsegrad", "sparse", True),
                                            ("surrogate", "dense", True), ("surrogate", "sparse", False)])
def test_triton_layer_equals_torch_layer_without_draws(grad, path, bias):
    """SparseGrad and the surrogate rule draw nothing, so both backends see the same g."""
    results = {}
    for backend in ("torch", "triton"):
        layers, readout = _stack(backend, grad, bias=bias, path=path)
        spikes, grads = _run(layers, readout, X)
        assert layers[0].stats["backend"] == backend
        results[backend] = (spikes, grads)
    for a, b in zip(results["torch"][0], results["triton"][0]):
        assert torch.equal(a, b)
    for a, b in zip(results["torch"][1], results["triton"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_triton_localzo_layer_matches_autograd_bptt_with_its_g():
    from ztriton.bptt import BPTTNet

    layers, readout = _stack("triton", "localzo")
    spikes, grads = _run(layers, readout, X)
    assert all(layer.stats["backend"] == "triton" for layer in layers)
    assert 0 < layers[0].stats["active_fraction"] < 0.9
    xi = X.clone().requires_grad_(True)
    ref = BPTTNet.from_layers(layers, readout).cpu()
    out, ref_spikes = ref(xi, g=[producer_of(s).dense().cpu() for s in spikes])
    (out.amax(0).pow(2).sum() + 0.1 * sum(s.sum() for s in ref_spikes)).backward()
    for a, b in zip(spikes, ref_spikes):
        assert (a.cpu() != b.detach()).float().mean() <= 1e-3
    for a, b in zip(grads, [m.weight.grad for m in ref.layers()] + [xi.grad]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grad", ["sparsegrad", "surrogate"])
def test_triton_layer_takes_sparse_events_like_dense_input(grad):
    """A sparse COO batch goes through the event-driven current; same spikes and gradients as dense."""
    results = []
    events = (torch.rand(14, 3, 24, generator=torch.Generator().manual_seed(2)) < 0.04).float()
    for x in (events.to(DEVICE), events.to_sparse().to(DEVICE)):
        layers, readout = _stack("triton", grad, bias=True, gain=3.0)
        h, spikes = x, []
        for layer in layers:
            h = layer(h)
            spikes.append(h)
        (readout(h).amax(0).pow(2).sum() + 0.1 * sum(s.sum() for s in spikes)).backward()
        results.append((spikes, [p.grad.cpu() for layer in layers for p in layer.parameters()]))
    assert 0.02 < results[0][0][0].mean() < 0.5 and 0.02 < results[0][0][1].mean() < 0.5
    for a, b in zip(results[0][0], results[1][0]):
        assert (a != b).float().mean() <= 1e-3  # the two currents differ in summation order only
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_triton_layer_is_reproducible_by_seed():
    runs = []
    for _ in range(2):
        layers, readout = _stack("triton", "localzo")
        runs.append(_run(layers, readout, X))
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


def test_triton_backend_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = SparseLIFLinear(4, 3, beta=0.9, backend="triton")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this layer: it needs Triton, a CUDA device "
                                         r"\(or TRITON_INTERPRET=1 on CPU\) and a float32/16 layer; the layer is "
                                         r"torch.float32 on cpu"):
        layer(torch.zeros(2, 1, 4))
    assert SparseLIFLinear(4, 3, beta=0.9, backend="auto").resolve_backend().name == "native"
    assert SparseLIFLinear(4, 3, beta=0.9, backend="auto").half().resolve_backend().name == "torch"
    monkeypatch.setattr("ztriton.native.AVAILABLE", False)  # without numba, auto falls back to torch
    monkeypatch.setattr("ztriton.native.UNAVAILABLE_REASON", "numba is not installed")
    monkeypatch.setattr("ztriton.layers._warned_no_native", False)
    with pytest.warns(BackendFallbackWarning, match=r"the CPU and a float32/64 layer \(numba is not installed\)"):
        assert SparseLIFLinear(4, 3, beta=0.9, backend="auto").resolve_backend().name == "torch"
