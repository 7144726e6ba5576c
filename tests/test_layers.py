"""SparseLIFLinear / LeakyReadout: eq. 1 forward, sparse == dense == autograd BPTT, scheduler, errors."""

import math

import pytest
import torch

from ztriton import LeakyReadout, Scheduler, SparseLIFLinear
from ztriton.bptt import BPTTLIF, BPTTNet, Surrogate
from ztriton.functional import localzo_grad, sparsegrad_grad
from ztriton.sparse import producer_of


def make_stack(sizes, betas, path, grad="localzo", delta=0.2, gain=3.0, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    layers = [
        SparseLIFLinear(a, b, beta=beta, path=path, grad=grad, delta=delta, **kw)
        for a, b, beta in zip(sizes[:-2], sizes[1:-1], betas)
    ]
    readout = LeakyReadout(sizes[-2], sizes[-1], beta=0.8)
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(gain)
    return [m.to(dtype) for m in layers], readout.to(dtype)


def run_stack(layers, readout, x, seed=7):
    torch.manual_seed(seed)
    xi = x.clone().requires_grad_(True)
    h, spikes = xi, []
    for layer in layers:
        h = layer(h)
        spikes.append(h)
    out = readout(h)
    loss = out.max(0).values.pow(2).sum() + 0.1 * sum(s.sum() for s in spikes)  # a rate regulariser too
    loss.backward()
    grads = [m.weight.grad.clone() for m in layers + [readout]] + [xi.grad.clone()]
    return spikes, grads


def g_of(spikes, dtype):
    """The g a sparse-path layer formed for these spikes, as a dense grid (zeros where it kept none)."""
    active = producer_of(spikes)
    return active.dense().to(dtype) if active is not None else torch.zeros_like(spikes)


def reference_stack(layers, readout, x, spikes):
    """Plain autograd BPTT through the same forward, each layer using the g its LocalZO forward drew."""
    xi = x.clone().requires_grad_(True)
    ref = BPTTNet.from_layers(layers, readout)
    out, ref_spikes = ref(xi, g=[g_of(s, x.dtype) for s in spikes])
    loss = out.max(0).values.pow(2).sum() + 0.1 * sum(s.sum() for s in ref_spikes)
    loss.backward()
    return ref_spikes, [m.weight.grad for m in ref.layers()] + [xi.grad]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_step_by_step_eq1(dtype):
    torch.manual_seed(0)
    layer = SparseLIFLinear(23, 19, beta=0.9, threshold=0.7, bias=True).to(dtype)
    with torch.no_grad():
        layer.weight.mul_(3)
        layer.bias.uniform_(-0.2, 0.2)
    x = torch.rand(41, 6, 23, dtype=dtype)  # real-valued input
    with torch.no_grad():
        out = layer(x)
        ref = BPTTLIF.from_layer(layer, dtype=torch.float64)(x.double())
    assert out.dtype == dtype and out.shape == (41, 6, 19)
    assert 0.05 < ref.mean() < 0.95
    if dtype == torch.float64:
        assert torch.equal(out, ref)
    else:  # float32 rounding may flip a spike sitting exactly at threshold
        assert (out.double() != ref).double().mean() < 1e-3


SHAPES = [  # (layer sizes incl. input and readout, betas, T, B)
    ([13, 7, 5], [0.9], 17, 3),
    ([19, 11, 9, 4], [0.95, 0.8], 23, 5),
    ([9, 14, 6, 10, 3], [0.9, 0.85, 0.7], 15, 4),
    ([7, 5, 3], [1.0], 1, 2),  # T = 1, beta = 1 (no leak)
]


@pytest.mark.parametrize("sizes,betas,steps,batch", SHAPES)
@pytest.mark.parametrize("delta", [0.003, 0.05, 0.5, 3.0])
def test_sparse_equals_dense_equals_autograd_bptt(sizes, betas, steps, batch, delta):
    x = (torch.rand(steps, batch, sizes[0], generator=torch.Generator().manual_seed(3)) < 0.4).double()
    results = {}
    for path in ("dense", "sparse"):
        layers, readout = make_stack(sizes, betas, path, delta=delta)
        spikes, grads = run_stack(layers, readout, x)
        results[path] = (spikes, grads, [layer.stats["active_fraction"] for layer in layers])
    spikes, grads, fractions = results["sparse"]
    assert fractions == results["dense"][2]
    for a, b in zip(spikes, results["dense"][0]):
        assert torch.equal(a, b)
    for a, b in zip(grads, results["dense"][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    layers, readout = make_stack(sizes, betas, "sparse", delta=delta)
    spikes, grads = run_stack(layers, readout, x)
    ref_spikes, ref_grads = reference_stack(layers, readout, x, spikes)
    for a, b in zip(spikes, ref_spikes):
        assert torch.equal(a, b.detach())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_the_density_range_is_covered():
    """The parametrised deltas above span about 0.1 % to 50 % active entries."""
    x = (torch.rand(40, 8, 30, generator=torch.Generator().manual_seed(3)) < 0.4).double()
    fractions = []
    for delta in (0.003, 3.0):
        layers, readout = make_stack([30, 40, 5], [0.9], "sparse", delta=delta)
        run_stack(layers, readout, x)
        fractions.append(layers[0].stats["active_fraction"])
    assert fractions[0] < 0.005 and fractions[1] > 0.4


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_float32_paths_agree_with_float64(path):
    x = (torch.rand(50, 8, 40, generator=torch.Generator().manual_seed(3)) < 0.3).float()
    layers, readout = make_stack([40, 30, 20, 5], [0.9, 0.8], path, dtype=torch.float32, delta=0.1)
    _, grads = run_stack(layers, readout, x)
    layers64, readout64 = make_stack([40, 30, 20, 5], [0.9, 0.8], "dense", dtype=torch.float64, delta=0.1)
    _, grads64 = run_stack(layers64, readout64, x.double())
    for a, b in zip(grads, grads64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_layer_localzo_g_equals_functional_estimate():
    torch.manual_seed(0)
    layer = SparseLIFLinear(10, 12, beta=0.9, delta=0.3, m=3, dist="laplace", path="sparse")
    x = torch.rand(20, 4, 10) * 2
    gen = torch.Generator().manual_seed(9)
    layer.generator = gen
    spikes = layer(x.requires_grad_(True))
    with torch.no_grad():
        current = x @ layer.weight.t()
        vs, u, s = [], torch.zeros(4, 12), torch.zeros(4, 12)
        for t in range(20):
            u = 0.9 * u + current[t] - s
            vs.append(u - 1.0)
            s = (vs[-1] > 0).float()
        v = torch.stack(vs)
    expected = localzo_grad(v, 0.3, 3, "laplace", torch.Generator().manual_seed(9))
    got = producer_of(spikes).dense()
    assert torch.equal(got != 0, expected != 0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["sparsegrad", "surrogate"])
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_sparsegrad_and_surrogate_modes_match_autograd(mode, path):
    torch.manual_seed(0)
    layer = SparseLIFLinear(15, 9, beta=0.85, grad=mode, dist="normal", delta=0.1, path=path).double()
    with torch.no_grad():
        layer.weight.mul_(3)
    x = (torch.rand(25, 3, 15) < 0.4).double()
    grad_out = torch.randn(25, 3, 9, dtype=torch.float64)
    layer(x).backward(grad_out)
    surrogate = Surrogate.truncated("normal", 0.1) if mode == "sparsegrad" else Surrogate.dense("normal", 0.1)
    ref = BPTTLIF.from_layer(layer, surrogate)
    ref(x).backward(grad_out)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-9, atol=1e-9)
    if mode == "sparsegrad":
        assert layer.rule.bth == pytest.approx(0.1 * math.sqrt(2 / math.pi))


def test_sparsegrad_layer_g_is_exactly_the_truncated_surrogate():
    torch.manual_seed(0)
    layer = SparseLIFLinear(15, 9, beta=0.85, grad="sparsegrad", delta=0.1, path="sparse")
    with torch.no_grad():
        layer.weight.mul_(3)
    x = (torch.rand(25, 3, 15) < 0.4).float()
    spikes = layer(x.requires_grad_(True))
    with torch.no_grad():
        current, vs = x @ layer.weight.t(), []
        u, s = torch.zeros(3, 9), torch.zeros(3, 9)
        for t in range(25):
            u = 0.85 * u + current[t] - s
            vs.append(u - 1.0)
            s = (vs[-1] > 0).float()
    expected = sparsegrad_grad(torch.stack(vs), "normal", 0.1)
    torch.testing.assert_close(producer_of(spikes).dense(), expected, rtol=1e-5, atol=1e-6)


def test_scheduler_picks_sparse_at_low_and_dense_at_high_activity():
    x = (torch.rand(30, 4, 20, generator=torch.Generator().manual_seed(1)) < 0.4).float().requires_grad_(True)
    low = SparseLIFLinear(20, 16, beta=0.9, delta=0.001, scheduler=Scheduler(crossover=0.1))
    high = SparseLIFLinear(20, 16, beta=0.9, delta=5.0, scheduler=Scheduler(crossover=0.1))
    for layer in (low, high):
        with torch.no_grad():
            layer.weight.mul_(3)
        layer(x)
    assert low.stats["active_fraction"] < 0.1 and low.stats["path"] == "sparse"
    assert high.stats["active_fraction"] > 0.1 and high.stats["path"] == "dense"
    assert low.stats["crossover"] == 0.1 and low.stats["crossover_source"] == "forced"
    forced = SparseLIFLinear(20, 16, beta=0.9, delta=5.0, path="sparse", scheduler=Scheduler(crossover=0.1))
    forced(x)
    assert forced.stats["path"] == "sparse"


def test_scheduler_reads_a_calibration_file(tmp_path, monkeypatch):
    path = tmp_path / "cal.json"
    path.write_text('{"cpu/native": {"crossover": 0.42}}')
    monkeypatch.setenv("ZTRITON_CALIBRATION", str(path))
    assert Scheduler().crossover("cpu", "native") == (0.42, "calibrated")
    assert Scheduler().crossover("cpu", "torch")[1] == "default"  # each backend has its own
    monkeypatch.setenv("ZTRITON_CALIBRATION", str(tmp_path / "missing.json"))
    assert Scheduler().crossover("cpu", "native")[1] == "default"


def test_calibration_finds_a_crossover(tmp_path, monkeypatch):
    monkeypatch.setenv("ZTRITON_CALIBRATION", str(tmp_path / "cal.json"))
    from ztriton.calibration import calibrate

    entry = calibrate("cpu", backend="torch", steps=20, batch=4, n_in=30, n_out=20, fractions=(0.01, 0.5), repeats=3)
    assert 0 < entry["crossover"] <= 1.0 and entry["backend"] == "torch" and entry["repeats"] == 3
    assert len(entry["dense_s"]) == 2 and entry["fractions"][0] < entry["fractions"][1]
    assert all(spread >= 0 for spread in entry["dense_spread"] + entry["sparse_spread"])
    assert Scheduler().crossover("cpu", "torch") == (entry["crossover"], "calibrated")


def test_crossover_fit_is_monotone_and_interpolates():
    from ztriton.scheduler import crossover_density, isotonic

    assert isotonic([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert isotonic([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]
    # sparse 4x faster at 0.1 %, equal at 1 %: the crossover is 1 %, whatever the order of the points
    assert crossover_density([0.01, 0.001], [1.0, 1.0], [1.0, 0.25]) == pytest.approx(0.01)
    # a noisy dip back below 0 after the crossing is pooled away: the crossing stays at the first rise
    fractions = [0.001, 0.01, 0.1, 0.3]
    assert crossover_density(fractions, [1, 1, 1, 1], [0.5, 2.0, 0.9, 3.0]) < 0.01
    assert crossover_density([0.01], [1.0], [0.5]) == 1.0 and crossover_density([0.01], [1.0], [2.0]) == 0.01


def test_no_grad_inference_keeps_nothing():
    layer = SparseLIFLinear(10, 8, beta=0.9)
    x = torch.rand(12, 3, 10)
    torch.manual_seed(0)
    with torch.no_grad():
        out = layer(x)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))  # no LocalZO draws
    assert producer_of(out) is None and out.grad_fn is None
    assert layer.stats["path"] == "none" and layer.stats["saved_bytes"] == 0


def test_saved_memory_is_compact_for_any_m():
    torch.manual_seed(0)
    x = (torch.rand(40, 8, 30) < 0.3).float().requires_grad_(True)
    dense = SparseLIFLinear(30, 50, beta=0.9, m=5, path="dense")
    sparse = SparseLIFLinear(30, 50, beta=0.9, m=5, path="sparse")
    sparse.load_state_dict(dense.state_dict())
    dense(x), sparse(x)
    grid = 40 * 8 * 50
    assert dense.stats["saved_bytes"] == grid * 4
    nnz = round(sparse.stats["active_fraction"] * grid)
    assert sparse.stats["saved_bytes"] == nnz * (8 + 4) < grid * 4


def test_same_seed_same_spikes_and_gradients():
    def run():
        torch.manual_seed(3)
        layer = SparseLIFLinear(16, 12, beta=0.9, delta=0.2)
        x = torch.rand(20, 4, 16)
        out = layer(x)
        out.sum().backward()
        return out, layer.weight.grad

    (s1, g1), (s2, g2) = run(), run()
    assert torch.equal(s1, s2) and torch.equal(g1, g2)


def test_optimizer_state_dict_and_gradient_accumulation():
    torch.manual_seed(0)
    layer = SparseLIFLinear(16, 12, beta=0.9, delta=0.5, generator=torch.Generator().manual_seed(1))
    x = torch.rand(20, 4, 16) * 2
    out = layer(x)
    out.sum().backward(retain_graph=True)
    once = layer.weight.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(layer.weight.grad, 2 * once)
    assert once.abs().sum() > 0
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, layer.weight)
    clone = SparseLIFLinear(16, 12, beta=0.9)
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone.weight, layer.weight)
    assert set(layer.state_dict()) == {"weight", "threshold"}


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(beta=0.0), ValueError, r"beta must be in \(0, 1\], got 0.0"),
        (dict(beta=1.5), ValueError, r"beta must be in \(0, 1\], got 1.5"),
        (dict(beta=0.9, threshold=0), ValueError, "threshold must be finite and > 0, got 0.0"),
        (dict(beta=0.9, grad="ste"), ValueError, r"grad must be one of \['localzo', 'sparsegrad', 'surrogate'\], got 'ste'"),
        (dict(beta=0.9, path="fast"), ValueError, r"path must be one of \['auto', 'dense', 'sparse'\], got 'fast'"),
        (dict(beta=0.9, delta=-1), ValueError, "delta must be finite and > 0, got -1.0"),
        (dict(beta=0.9, m=0), ValueError, "m must be >= 1, got 0"),
        (dict(beta=0.9, dist="gauss"), ValueError, "dist must be one of"),
        (dict(beta=0.9, bth=0.1), ValueError, "bth applies to grad='sparsegrad' only, got grad='localzo'"),
        (dict(beta="0.9"), TypeError, "beta must be a real number, got str"),
    ],
)
def test_bad_hyper_parameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        SparseLIFLinear(4, 3, **kwargs)


@pytest.mark.parametrize(
    "x,error,message",
    [
        (torch.zeros(5, 4), ValueError, r"x must have shape \(T, B, in_features\), got 2 dimensions \(5, 4\)"),
        (torch.zeros(5, 2, 3), ValueError, "x has 3 features, the layer expects in_features=4"),
        (torch.zeros(5, 2, 4, dtype=torch.int32), TypeError, "x must be a floating-point tensor, got dtype torch.int32"),
        (torch.full((5, 2, 4), float("nan")), ValueError, "x contains NaN or inf"),
        ([[0.0]], TypeError, "x must be a torch.Tensor, got list"),
    ],
)
@pytest.mark.parametrize("module", ["lif", "readout"])
def test_bad_input(module, x, error, message):
    layer = SparseLIFLinear(4, 3, beta=0.9) if module == "lif" else LeakyReadout(4, 3, beta=0.9)
    with pytest.raises(error, match=message):
        layer(x)


def test_value_checks_switch():
    """On by default on CPU; `set_value_checks(False)` (the CUDA default) skips the NaN/inf check."""
    import ztriton
    from ztriton._checks import value_checks

    nan = torch.full((5, 2, 4), float("nan"))
    assert value_checks(torch.device("cpu")) and not value_checks(torch.device("cuda"))
    ztriton.set_value_checks(False)
    try:
        assert not value_checks(torch.device("cpu"))
        assert torch.isnan(LeakyReadout(4, 3, beta=0.9)(nan)).all()  # NaN in, NaN out: unchecked
        ztriton.set_value_checks(True)
        assert value_checks(torch.device("cuda"))
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            SparseLIFLinear(4, 3, beta=0.9)(nan)
        with pytest.raises(TypeError, match="enabled must be True, False or None, got 'yes'"):
            ztriton.set_value_checks("yes")
    finally:
        ztriton.set_value_checks(None)


def test_generator_on_another_device_is_refused():
    layer = SparseLIFLinear(4, 3, beta=0.9, generator=torch.Generator()).to("meta")
    with pytest.raises(ValueError, match="generator is on cpu but the layer's weights are on meta"):
        layer(torch.zeros(2, 1, 4, device="meta"))


def test_plain_tensor_input_gets_a_dense_input_gradient():
    torch.manual_seed(0)
    layer = SparseLIFLinear(6, 5, beta=0.9, delta=1.0, path="sparse").double()
    x = torch.rand(10, 2, 6, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == x.shape and x.grad.is_contiguous() and (x.grad != 0).any()


@pytest.mark.parametrize("paths", [("dense", "sparse"), ("sparse", "dense")])
@pytest.mark.parametrize("grad", ["localzo", "surrogate"])
def test_mixed_paths_between_layers(paths, grad):
    """auto may choose differently per layer: the link protocol must give the same gradients."""
    x = (torch.rand(20, 4, 12, generator=torch.Generator().manual_seed(3)) < 0.4).double()
    results = []
    for chosen in (paths, ("dense", "dense")):
        layers, readout = make_stack([12, 10, 8, 3], [0.9, 0.8], "dense", grad=grad, delta=0.3)
        for layer, path in zip(layers, chosen):
            layer.path = path
        results.append(run_stack(layers, readout, x)[1])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_time_chunks_of_the_forward_join_seamlessly():
    """T = 150 runs as pieces of FORWARD_CHUNK = 64 steps: spikes and gradients stay exact."""
    from ztriton.backends.lif_forward import FORWARD_CHUNK

    steps = 2 * FORWARD_CHUNK + 22
    x = (torch.rand(steps, 3, 11, generator=torch.Generator().manual_seed(5)) < 0.3).double()
    layers, readout = make_stack([11, 9, 7, 3], [0.95, 0.9], "sparse", delta=0.2)
    spikes, grads = run_stack(layers, readout, x)
    ref_spikes, ref_grads = reference_stack(layers, readout, x, spikes)
    for a, b in zip(spikes, ref_spikes):
        assert torch.equal(a, b.detach())
    assert spikes[0][FORWARD_CHUNK:].sum() > 0
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    dense_layers, dense_readout = make_stack([11, 9, 7, 3], [0.95, 0.9], "dense", grad="surrogate", delta=0.2)
    sparse_layers, sparse_readout = make_stack([11, 9, 7, 3], [0.95, 0.9], "sparse", grad="surrogate", delta=0.2)
    for a, b in zip(run_stack(dense_layers, dense_readout, x)[1], run_stack(sparse_layers, sparse_readout, x)[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("binary", [True, False])
def test_sparse_inputs_take_the_event_driven_current(binary):
    """Inputs below EVENT_DENSITY are summed over their events: same spikes and gradients as eq. 1."""
    from ztriton.backends.lif_forward import EVENT_DENSITY

    gen = torch.Generator().manual_seed(8)
    mask = torch.rand(90, 6, 40, generator=gen) < 0.02
    x = mask.double() * (1.0 if binary else torch.rand(90, 6, 40, generator=gen, dtype=torch.float64) * 3)
    assert 0 < (x != 0).double().mean() < EVENT_DENSITY
    layers, readout = make_stack([40, 13, 9, 3], [0.95, 0.9], "sparse", delta=0.3, gain=4.0)
    spikes, grads = run_stack(layers, readout, x)
    ref_spikes, ref_grads = reference_stack(layers, readout, x, spikes)
    assert 0 < spikes[0].mean() < EVENT_DENSITY  # the second layer's input is sparse too
    for a, b in zip(spikes, ref_spikes):
        assert torch.equal(a, b.detach())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_event_current_equals_the_gemm_and_declines_dense_input():
    from ztriton.backends.lif_forward import event_current, input_events

    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(7, 30, generator=gen, dtype=torch.float64)
    x = (torch.rand(5, 4, 30, generator=gen) < 0.03).double() * torch.rand(5, 4, 30, generator=gen, dtype=torch.float64)
    events = input_events(x)
    assert events is not None and events[0].numel() == int((x != 0).sum())
    out = event_current(events, 20, weight.t().contiguous()).view(5, 4, 7)
    torch.testing.assert_close(out, x @ weight.t(), rtol=1e-12, atol=1e-12)
    assert input_events(torch.rand(5, 4, 30, generator=gen, dtype=torch.float64)) is None
