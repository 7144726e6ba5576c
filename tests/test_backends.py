"""Every backend gives the same spikes, active sets and gradients as the torch reference.

float64 for torch vs native (exact spikes and active sets, gradients to summation order); the
Triton backend (interpreter here) is float32-only and compared with a flip-rate tolerance.
"""

import pytest
import torch

from ztriton import LeakyReadout, SparseLIFLinear, native
from ztriton.distributions import FastSigmoid, Sigmoid, get_distribution
from ztriton.events import call_input, events_of, spike_batch
from ztriton.sparse import producer_of

pytestmark = [pytest.mark.skipif(not native.AVAILABLE, reason="numba is not installed"),
              pytest.mark.filterwarnings("ignore::ztriton.SilentLayerWarning")]  # the silent case is meant
LAWS = {
    "normal": lambda d: "normal", "uniform": lambda d: "uniform", "laplace": lambda d: "laplace",
    "sigmoid": lambda d: Sigmoid(delta=d), "fast_sigmoid": lambda d: FastSigmoid(delta=d),
}
CASES = [  # (sizes incl. input and readout, T, B, input density, weight gain)
    ([13, 7, 5, 3], 17, 3, 0.3, 3.0),
    ([9, 11, 6, 4], 1, 2, 0.5, 4.0),  # T = 1
    ([40, 23, 17, 5], 70, 5, 0.03, 4.0),  # sparse input: event-driven current
    ([8, 6, 5, 2], 12, 3, 0.4, 1e-4),  # silent: empty active sets
]


def build(backend, sizes, gain, grad, dist, m, path, bias, dtype):
    torch.manual_seed(0)
    layers = [SparseLIFLinear(a, b, beta=0.9, grad=grad, dist=dist, delta=0.3, m=m, path=path, bias=bias,
                              backend=backend).to(dtype) for a, b in zip(sizes[:-2], sizes[1:-1])]
    readout = LeakyReadout(sizes[-2], sizes[-1], beta=0.8, backend=backend).to(dtype)
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(gain)
            if bias:
                layer.bias.uniform_(-0.1, 0.1)
    return layers, readout


def run(layers, readout, x, sparse_input):
    torch.manual_seed(7)
    xi = x.to_sparse() if sparse_input else x.clone().requires_grad_(True)
    h, spikes = xi, []
    for layer in layers:
        h = layer(h)
        spikes.append(h)
    (readout(h).amax(0).pow(2).sum() + 0.1 * sum(s.sum() for s in spikes)).backward()
    grads = [p.grad for layer in layers + [readout] for p in layer.parameters()]
    return spikes, [producer_of(s) for s in spikes], grads + ([] if sparse_input else [xi.grad])


def compare(case, grad, dist, m, path, bias, sparse_input, backend="native"):
    sizes, steps, batch, density, gain = case
    x = (torch.rand(steps, batch, sizes[0], generator=torch.Generator().manual_seed(3)) < density).double()
    results = {}
    for name in ("torch", backend):
        layers, readout = build(name, sizes, gain, grad, dist, m, path, bias, torch.float64)
        results[name] = run(layers, readout, x, sparse_input)
        assert all(layer.stats["backend"] == name for layer in layers)
    (s_ref, a_ref, g_ref), (s, a, g) = results["torch"], results[backend]
    for one, two in zip(s_ref, s):
        assert torch.equal(one, two)
    for one, two in zip(a_ref, a):
        assert (one is None) == (two is None)
        if one is not None:
            assert torch.equal(one.index, two.index)
            torch.testing.assert_close(one.grad, two.grad, rtol=1e-12, atol=0)
    for one, two in zip(g_ref, g):
        torch.testing.assert_close(one, two, rtol=1e-9, atol=1e-12)
    return a_ref


@pytest.mark.parametrize("case", CASES, ids=["odd", "T1", "sparse-input", "silent"])
@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("grad", ["localzo", "sparsegrad", "surrogate"])
def test_native_equals_torch(case, path, grad):
    active = compare(case, grad, "normal", 2, path, False, False)
    if case is CASES[3] and path == "sparse" and grad != "surrogate":
        assert all(a.nnz == 0 for a in active)


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=["dense-events", "T1"])
def test_native_equals_torch_on_sparse_input_above_the_event_density(case):
    compare(case, "localzo", "uniform", 1, "sparse", False, True)


@pytest.mark.parametrize("name", sorted(LAWS))
@pytest.mark.parametrize("sparse_input", [False, True])
def test_native_equals_torch_for_every_law_with_bias(name, sparse_input):
    compare(CASES[2], "localzo", LAWS[name](0.3), 3, "sparse", True, sparse_input)


def test_native_results_do_not_depend_on_the_thread_count():
    """Shapes that cut every native kernel of a training step into several blocks -- the forward, the
    weight and the input gradient (blocks of batch rows), the scan of a dense input's events (blocks
    of (t, b) rows), the readout's time filters (blocks of columns) -- give bitwise equal spikes,
    active sets and gradients on 1, 2 and 3 threads. The dense input's gradient is a torch GEMM
    (dx = D W), whose last bits may change with the thread count: it is compared to rounding."""
    sizes, steps, batch = [40, 48, 48, 64], 64, 32
    assert len(native.block_ranges(batch)) > 1
    assert len(native.block_ranges(steps * batch)) > 1
    assert len(native.block_ranges(batch * sizes[-1], max(native.MIN_BLOCK, native.SMALL_WORK // steps))) > 1
    x = (torch.rand(steps, batch, sizes[0], generator=torch.Generator().manual_seed(3)) < 0.03).float()
    runs, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            layers, readout = build("native", sizes, 4.0, "localzo", "normal", 1, "sparse", False, torch.float32)
            runs.append(run(layers, readout, x, False))
            assert all(layer.stats["backend"] == "native" for layer in layers)
    finally:
        torch.set_num_threads(threads)
    spikes, actives, grads = runs[0]
    assert all(active.nnz > 0 for active in actives) and all(bool(s.any()) for s in spikes)
    for other_spikes, other_actives, other_grads in runs[1:]:
        for one, two in zip(spikes + grads[:-1], other_spikes + other_grads[:-1]):
            assert torch.equal(one, two)
        torch.testing.assert_close(grads[-1], other_grads[-1], rtol=1e-5, atol=1e-5)
        for one, two in zip(actives, other_actives):
            assert torch.equal(one.index, two.index) and torch.equal(one.grad, two.grad)


def test_triton_equals_native_on_float32():
    """Both on CPU: the Triton backend through its interpreter (a CUDA machine compares it in test_kernels)."""
    from ztriton.backends.triton_backend import TritonBackend

    if not TritonBackend.available(torch.device("cpu"), torch.float32):
        pytest.skip("the Triton backend runs on CPU only under TRITON_INTERPRET=1")
    sizes, steps, batch, density, gain = CASES[0]
    x = (torch.rand(steps, batch, sizes[0], generator=torch.Generator().manual_seed(3)) < density).float()
    results = {}
    for name in ("native", "triton"):
        layers, readout = build(name, sizes, gain, "localzo", "laplace", 2, "sparse", False, torch.float32)
        results[name] = run(layers, readout, x, False)
    for one, two in zip(results["native"][0], results["triton"][0]):
        assert (one != two).float().mean() <= 1e-3
    for one, two in zip(results["native"][2], results["triton"][2]):
        torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-4)


def test_events_from_sparse_and_dense_inputs_agree():
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(9, 4, 13, generator=gen) < 0.2).double() * torch.rand(9, 4, 13, generator=gen, dtype=torch.float64)
    one, two = events_of(x), events_of(x.to_sparse())
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    assert one.row_ptr.numel() == 9 * 4 + 1 and one.nnz == int((x != 0).sum())
    assert events_of(x) is not one  # a user's tensor: scanned anew every time
    call = call_input(x)  # the alias an op reads x through for one call keeps its events
    assert events_of(call) is events_of(call) and torch.equal(events_of(call).values, one.values)
    with torch.no_grad():
        call.mul_(2)  # shares x's version counter: the call's cache no longer holds
    assert torch.equal(events_of(call).values, 2 * one.values) and call_input(x) is not call


def _nonzero_rows(flat):
    rows, cols = torch.nonzero(flat, as_tuple=True)
    row_ptr = torch.zeros(flat.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(rows, minlength=flat.shape[0]), 0, out=row_ptr[1:])
    return row_ptr, cols, flat[rows, cols]


@pytest.mark.skipif(not native.AVAILABLE, reason="needs numba")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", [
    ((0, 5), 0.1), ((7, 0), 0.1), ((1, 1), 1.0),  # empty and tiny
    ((3000, 50), 0.005), ((3000, 50), 0.03),  # one pass into the sampled-density scratch
    ((1000, 33), 0.5),  # dense: counted, then listed
    "alternate",  # the sample misjudges the density: blocks overflow their slice and are listed again
])
def test_the_native_scan_lists_every_non_zero_in_row_order(dtype, case):
    gen = torch.Generator().manual_seed(3)
    if case == "alternate":  # even rows empty, odd rows full: the rows scan_rows samples (every 16th) say 0 %
        x = torch.randn(4096, 40, generator=gen)
        x[::2] = 0
    else:
        shape, density = case
        x = (torch.rand(shape, generator=gen) < density) * torch.randn(shape, generator=gen)
    x = x.to(dtype)
    for got, expected in zip(native.scan_rows(x), _nonzero_rows(x)):
        assert torch.equal(got, expected)


def test_spike_batch_builds_a_coalesced_event_tensor():
    batch = spike_batch([2, 0, 2, 2], [1, 0, 1, 0], [3, 1, 3, 0], (4, 2, 5))
    assert batch.is_sparse and batch.is_coalesced() and batch.shape == (4, 2, 5)
    dense = torch.zeros(4, 2, 5)
    dense[2, 1, 3] = dense[0, 0, 1] = dense[2, 0, 0] = 1.0
    assert torch.equal(batch.to_dense(), dense)


@pytest.mark.parametrize(
    "x,error,message",
    [
        (torch.zeros(5, 2, 4).to_sparse(2), ValueError, r"a sparse x must have 3 sparse dimensions \(T, B, in_features\), got 2"),
        (torch.zeros(5, 2, 4).to_sparse().requires_grad_(True), ValueError, "a sparse x \\(events\\) cannot require grad"),
        (torch.full((5, 2, 4), float("nan")).to_sparse(), ValueError, "x contains NaN or inf"),
        (torch.zeros(5, 2, 3).to_sparse(), ValueError, "x has 3 features, the layer expects in_features=4"),
    ],
)
def test_bad_sparse_input(x, error, message):
    with pytest.raises(error, match=message):
        SparseLIFLinear(4, 3, beta=0.9)(x)


def test_native_needs_cpu_and_float32_or_64():
    layer = SparseLIFLinear(4, 3, beta=0.9, backend="native").half()
    with pytest.raises(ValueError, match=r"backend='native' cannot run this layer: it needs numba, the CPU and a "
                                         r"float32/64 layer; the layer is torch.float16 on cpu"):
        layer(torch.zeros(2, 1, 4, dtype=torch.float16))
    assert get_distribution("normal").name == "normal"
