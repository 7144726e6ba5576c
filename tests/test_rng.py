"""The RNG contract: every backend draws the same z for the same (seed, offset, index, k)."""

import pytest
import torch

from ztriton import SparseLIFLinear, get_distribution, native, rng
from ztriton.backends.lif_forward import FORWARD_CHUNK
from ztriton.distributions import FastSigmoid, Sigmoid
from ztriton.functional import localzo_grad
from ztriton.sparse import producer_of

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.language.random import philox as triton_philox  # noqa: E402

from ztriton.backends.triton_backend import sampler_args  # noqa: E402
from ztriton.kernels.lif_forward import sample_abs_z  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAWS = {
    "normal": get_distribution("normal"),
    "uniform": get_distribution("uniform"),
    "laplace": get_distribution("laplace"),
    "sigmoid": Sigmoid(delta=0.05),
    "fast_sigmoid": FastSigmoid(delta=0.05),
}
# |z| through log / cos may differ in the last bits between math libraries (torch, numpy, CUDA):
# allowed relative difference per law; the others are plain IEEE arithmetic and must agree exactly
ULPS = {"normal": 4 * 2**-23, "laplace": 4 * 2**-23}


@triton.jit
def _philox_kernel(out_ptr, seed, offset, k, n, start, BLOCK: tl.constexpr):
    pos = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    index = pos.to(tl.int64) + start
    c0 = (index & 0xFFFFFFFF).to(tl.uint32)
    c1 = (index >> 32).to(tl.uint32)
    c2 = (tl.zeros_like(index) + offset).to(tl.uint32)
    c3 = (tl.zeros_like(index) + k).to(tl.uint32)
    r0, r1, r2, r3 = triton_philox(seed, c0, c1, c2, c3)
    mask = pos < n
    tl.store(out_ptr + pos * 4 + 0, r0.to(tl.int64), mask=mask)
    tl.store(out_ptr + pos * 4 + 1, r1.to(tl.int64), mask=mask)
    tl.store(out_ptr + pos * 4 + 2, r2.to(tl.int64), mask=mask)
    tl.store(out_ptr + pos * 4 + 3, r3.to(tl.int64), mask=mask)


@pytest.mark.parametrize("seed,offset,k,start", [(0, 0, 0, 0), (2**62 - 17, 12, 3, 2**32 - 100), (987654321, 2**31 + 8, 1, 5)])
def test_philox_is_bit_identical_to_triton(seed, offset, k, start):
    n = 300
    out = torch.zeros(n * 4, dtype=torch.int64, device=DEVICE)
    _philox_kernel[(triton.cdiv(n, 128),)](out, seed, offset & rng.MASK32, k, n, start, BLOCK=128)
    index = torch.arange(n, dtype=torch.int64) + start
    ref = rng.philox(seed, index & rng.MASK32, index >> 32, offset & rng.MASK32, k)
    assert torch.equal(out.cpu().view(n, 4), torch.stack(ref, 1))


@pytest.mark.skipif(not native.AVAILABLE, reason="numba is not installed")
def test_the_native_integer_stage_is_bit_identical_to_the_torch_reference():
    key = rng.PhiloxKey(2**62 - 17, 2**31 + 12)
    index = torch.cat([torch.arange(1000), torch.arange(2**32 - 500, 2**32 + 500),
                       torch.randint(0, 2**45, (20_000,), generator=torch.Generator().manual_seed(0))])
    for k in (0, 4):
        got = native.philox_uniforms(index, key.seed, key.offset & rng.MASK32, k)
        expected = rng.uniforms_reference(key, index, k)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert native.philox_uniforms(index[:0], 1, 0, 0)[0].numel() == 0


def test_uniforms_follow_tl_rand():
    """With counter (offset, 0, 0, 0), the contract's u1 is exactly Triton's tl.rand(seed, offset)."""

    @triton.jit
    def rand_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        pos = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + pos, tl.rand(seed, pos), mask=pos < n)

    n = 4096
    out = torch.empty(n, device=DEVICE)
    rand_kernel[(triton.cdiv(n, 1024),)](out, 1234, n, BLOCK=1024)
    u1, _ = rng.uniforms(rng.PhiloxKey(1234, 0), torch.arange(n), 0)
    assert torch.equal(out.cpu(), u1)
    assert 0.0 <= float(u1.min()) and float(u1.max()) <= rng.UNIFORM_MAX < 1.0


@pytest.mark.parametrize("name", sorted(LAWS))
@pytest.mark.parametrize("offset,k", [(0, 0), (44, 2)])
def test_the_torch_reference_and_the_triton_kernel_draw_the_same_z(name, offset, k):
    law, n = LAWS[name], 50_000
    key = rng.PhiloxKey(77_000_000_001, offset)
    ref = rng.abs_z(law, key, torch.arange(n), k)
    out = sample_abs_z(n, key.seed, key.offset, k, DEVICE, **sampler_args(law, torch.device(DEVICE))).cpu()
    if name in ULPS and DEVICE == "cpu":
        torch.testing.assert_close(out, ref, rtol=ULPS[name], atol=0)
    elif DEVICE == "cpu":
        assert torch.equal(out, ref)
    else:  # GPU math differs by a few ulps (and fuses multiply-adds)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)


def test_draws_depend_on_every_part_of_the_key():
    law = LAWS["normal"]
    index = torch.arange(1000)
    base = rng.abs_z(law, rng.PhiloxKey(5, 0), index, 0)
    for key, k in [((6, 0), 0), ((5, 4), 0), ((5, 0), 1)]:
        other = rng.abs_z(law, rng.PhiloxKey(*key), index, k)
        assert (other != base).double().mean() > 0.99
    assert torch.equal(base[500:], rng.abs_z(law, rng.PhiloxKey(5, 0), index[500:], 0))  # a function of the index


def test_keys_come_from_the_generator():
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    first, second = rng.next_key(gen, torch.device("cpu")), rng.next_key(gen, torch.device("cpu"))
    assert first != second and first.offset == second.offset == 0
    gen.set_state(state)
    assert rng.next_key(gen, torch.device("cpu")) == first
    torch.manual_seed(9)
    a = rng.next_key(None, torch.device("cpu"))
    torch.manual_seed(9)
    assert rng.next_key(None, torch.device("cpu")) == a


def _layer_g(layer, x, generator_seed):
    layer.generator = torch.Generator(device=x.device).manual_seed(generator_seed)
    return producer_of(layer(x)).dense().cpu()


@pytest.mark.parametrize("name", sorted(LAWS))
def test_layer_draws_equal_the_functional_estimate_across_forward_chunks(name):
    """The layer forms g in FORWARD_CHUNK pieces; the contract's index makes it the whole-grid draw."""
    law = LAWS[name]
    steps = FORWARD_CHUNK + 37
    torch.manual_seed(0)
    layer = SparseLIFLinear(10, 12, beta=0.9, delta=0.05, m=2, dist=law, path="sparse")
    with torch.no_grad():
        layer.weight.mul_(2)
    x = torch.rand(steps, 4, 10, requires_grad=True)
    got = _layer_g(layer, x, 9)
    with torch.no_grad():
        current, vs = x @ layer.weight.t(), []
        u, s = torch.zeros(4, 12), torch.zeros(4, 12)
        for t in range(steps):
            u = 0.9 * u + current[t] - s
            vs.append(u - 1.0)
            s = (vs[-1] > 0).float()
    expected = localzo_grad(torch.stack(vs), 0.05, 2, law, torch.Generator().manual_seed(9))
    assert got[FORWARD_CHUNK:].count_nonzero() > 0
    agree = (got != 0) == (expected != 0)
    assert agree.double().mean() > 1 - 1e-3  # float32 membranes summed in another order may flip a boundary
    torch.testing.assert_close(got[agree], expected[agree], rtol=1e-6, atol=0)


def test_gradients_do_not_depend_on_the_thread_count():
    torch.manual_seed(0)
    layer = SparseLIFLinear(30, 20, beta=0.9, delta=0.2, path="sparse")
    x = (torch.rand(40, 8, 30) < 0.3).float()
    runs = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            layer.weight.grad = None
            g = _layer_g(layer, x, 4)
            layer.generator = torch.Generator().manual_seed(4)
            layer(x).sum().backward()
            runs.append((g, layer.weight.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][0].count_nonzero() > 0
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-6, atol=1e-6)


def test_torch_and_triton_backends_draw_the_same_z_in_a_layer():
    torch.manual_seed(0)
    layers = {b: SparseLIFLinear(24, 19, beta=0.9, delta=0.3, m=3, path="sparse", backend=b).to(DEVICE)
              for b in ("torch", "triton")}
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.mul_(3)
    x = (torch.rand(30, 3, 24, generator=torch.Generator().manual_seed(2)) < 0.4).float().to(DEVICE)
    g = {b: _layer_g(layer, x, 21) for b, layer in layers.items()}
    assert layers["triton"].stats["backend"] == "triton"
    agree = (g["torch"] != 0) == (g["triton"] != 0)
    assert agree.double().mean() > 1 - 1e-3 and g["torch"].count_nonzero() > 20
    torch.testing.assert_close(g["torch"][agree], g["triton"][agree], rtol=1e-6, atol=0)
