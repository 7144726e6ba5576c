"""No silent fallback: `stats` names the implementation of every op, backend="auto" warns when it
takes the torch backend where a faster one was expected, and a custom law runs where it can be
evaluated or is refused with the backend and the fix named."""

import warnings

import pytest
import torch

from ztriton import BackendFallbackWarning, Distribution, LeakyReadout, SparseLIFLinear
from ztriton import backends
from ztriton.backends import TritonBackend
from ztriton.distributions import KERNEL_LAWS, Normal, Uniform, get_distribution, kernel_law

TRITON = TritonBackend.available(torch.device("cpu"), torch.float32)


class Triangular(Distribution):
    """A law only its own torch code can draw: |z| = sqrt6 (1 - sqrt(1 - u1)) (unit variance)."""

    name = "triangular"

    def abs_z_from_uniforms(self, u1, u2):
        return 6.0 ** 0.5 * (1.0 - torch.sqrt(1.0 - u1))

    def expected_grad(self, v, delta):
        a = 6.0 ** 0.5 * delta
        return torch.clamp(1.0 - v.abs() / a, min=0.0) / a

    def _expected_max_abs(self, m):
        return 6.0 ** 0.5 / 3.0 if m == 1 else NotImplemented


class ShiftedNormal(Normal):
    """Overrides the draw: the kernels' normal expression would be wrong for it."""

    def abs_z_from_uniforms(self, u1, u2):
        return super().abs_z_from_uniforms(u1, u2) + 0.1


class RenamedUniform(Uniform):
    """Inherits the draw: the kernels evaluate it as the uniform law."""

    name = "renamed_uniform"


def _net(backend, dist="normal", grad="localzo", dtype=torch.float32):
    torch.manual_seed(0)
    layers = [SparseLIFLinear(30, 20, beta=0.9, delta=0.3, dist=dist, grad=grad, backend=backend),
              SparseLIFLinear(20, 16, beta=0.9, delta=0.3, dist=dist, grad=grad, backend=backend)]
    for layer in layers:
        layer.weight.data.mul_(5)
    return [layer.to(dtype) for layer in layers]


def _run(layers, seed=1):
    x = (torch.rand(25, 4, 30, generator=torch.Generator().manual_seed(seed)) < 0.1).float()
    x = x.to(layers[0].weight.dtype).requires_grad_()
    h = x
    for layer in layers:
        h = layer(h)
    h.sum().backward()
    return h


def test_kernel_law_names_the_kernels_expression():
    assert [kernel_law(get_distribution(n)) for n in ("normal", "uniform", "laplace", "fast_sigmoid", "sigmoid")] == \
        ["normal", "uniform", "laplace", "fast_sigmoid", "table"]
    assert kernel_law(Triangular()) is None and kernel_law(ShiftedNormal()) is None
    assert kernel_law(RenamedUniform()) == "uniform"


@pytest.mark.skipif(not TRITON, reason="needs Triton (a GPU or the interpreter)")
def test_kernel_law_codes_are_the_triton_kernels_codes():
    from ztriton.kernels import lif_forward as kernel

    assert [KERNEL_LAWS.index(n) for n in KERNEL_LAWS] == [kernel.NORMAL, kernel.UNIFORM, kernel.LAPLACE,
                                                          kernel.FAST_SIGMOID, kernel.TABLE]


@pytest.mark.parametrize("backend", ["native"] + (["triton"] if TRITON else []))
@pytest.mark.parametrize("law", [Triangular(), ShiftedNormal()], ids=["custom", "overridden"])
def test_a_named_backend_refuses_a_law_it_cannot_draw(backend, law):
    with pytest.raises(ValueError, match=rf"backend='{backend}' cannot run this layer: the {backend} kernels cannot "
                                         r"draw z for .*distribution_from_surrogate .* or use backend='torch'"):
        SparseLIFLinear(30, 20, beta=0.9, delta=0.3, dist=law, backend=backend)


@pytest.mark.parametrize("grad", ["sparsegrad", "surrogate"])
def test_a_custom_law_without_draws_runs_on_the_kernels(grad):
    """SparseGrad and the surrogate use the law's expected_grad only (torch code): no refusal."""
    native = _run(_net("native", Triangular(), grad))
    torch_ = _run(_net("torch", Triangular(), grad))
    assert torch.equal(native, torch_)


def test_auto_takes_the_torch_backend_for_a_custom_law_and_warns_once_per_layer():
    layers = _net("auto", Triangular())
    with pytest.warns(BackendFallbackWarning) as record:
        spikes = _run(layers)
        _run(layers, seed=2)
    messages = [str(w.message) for w in record if w.category is BackendFallbackWarning]
    assert len(messages) == 2  # one per layer, not one per call
    assert all("runs on the torch backend: native: the native kernels cannot draw z for Triangular" in m
               for m in messages)
    assert all(layer.stats["backend"] == "torch" and layer.stats["fallback"].startswith("native: ")
               for layer in layers)
    assert torch.equal(spikes, _run(_net("torch", Triangular())))


def test_auto_runs_an_inherited_law_on_the_native_kernels_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        layers = _net("auto", RenamedUniform())
        native = _run(layers)
    assert layers[0].stats["backend"] == "native" and layers[0].stats["fallback"] is None
    torch.testing.assert_close(native, _run(_net("torch", RenamedUniform())), rtol=0, atol=0)


def test_stats_name_the_implementation_of_every_op():
    layers = _net("native")
    for layer in layers:
        layer.path = "sparse"
    _run(layers)
    assert layers[0].stats["ops"] == {"forward": "native", "weight_grad": "native", "time_filter": "torch",
                                      "input_grad": "torch"}  # dense input requiring grad: a GEMM of D
    assert layers[1].stats["ops"] == {"forward": "native", "weight_grad": "native", "input_grad": "native"}
    surrogate = _net("native", grad="surrogate")
    _run(surrogate)
    assert surrogate[1].stats["path"] == "dense"
    assert surrogate[1].stats["ops"] == {"forward": "torch", "time_filter": "native", "weight_grad": "torch",
                                         "input_grad": "torch"}
    with torch.no_grad():
        surrogate[0](torch.zeros(3, 2, 30))
    assert surrogate[0].stats["ops"] == {"forward": "native"}  # inference: the native kernel
    readout = LeakyReadout(16, 3, beta=0.9)
    readout(torch.zeros(3, 2, 16))
    assert readout.stats == {"backend": "native", "fallback": None, "ops": {"current": "torch", "time_filter": "native"}}


def test_auto_notes_why_a_gpu_layer_takes_the_torch_backend():
    cuda = torch.device("cuda")
    backend, note = backends.select("auto", cuda, torch.float64)
    assert backend.name == "torch" and note.startswith("triton: it needs Triton, a CUDA device")
    assert "torch.float64 on cuda" in note
    backend, note = backends.select("auto", torch.device("cpu"), torch.float16)
    assert backend.name == "torch" and note is None  # documented: half precision on CPU takes torch


def test_half_precision_bias_is_added_in_the_membrane_precision():
    """1 + 2^-11 is 1.0 in float16 but not in float32: with the bias added in float32 (as the Triton
    kernel adds it) the neuron crosses a threshold of 1 + 2^-12; added in float16 it would not."""
    for backend in ["torch"] + (["triton"] if TRITON else []):
        layer = SparseLIFLinear(1, 1, beta=0.5, threshold=1 + 2 ** -12, bias=True, backend=backend).half()
        with torch.no_grad():
            layer.weight.fill_(1.0)
            layer.bias.fill_(2 ** -11)
            assert layer(torch.ones(1, 1, 1, dtype=torch.float16)).item() == 1.0, backend
