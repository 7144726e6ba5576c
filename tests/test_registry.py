"""The op registry: every op has its torch reference, a backend's own implementation runs where it
has one and accepts the call, torch runs (and is named) where it has none or declines."""

import pytest

from ztriton import backends  # noqa: F401 (registers every backend's ops)
from ztriton.backends import registry


def test_every_op_has_a_torch_implementation():
    ops = {op for op, _ in registry.OPS}
    assert ops == {"lif_forward", "weight_grad", "input_grad", "input_grad_at", "filtered_grad", "time_filter",
                   "lif_family_forward", "lif_adjoint", "lif_adjoint_grid"}
    assert all((op, "torch") in registry.OPS for op in ops)


def test_dispatch_runs_the_backends_implementation_else_torch_and_names_it(monkeypatch):
    monkeypatch.setattr(registry, "OPS", {})
    registry.register("scale", "torch")(lambda x, k: ("torch", x * k))
    assert registry.dispatch("scale", "native", 2, 3) == (("torch", 6), "torch")  # torch only: torch runs
    registry.register("scale", "native", accepts=lambda x, k: k > 0)(lambda x, k: ("native", x * k))
    assert registry.dispatch("scale", "native", 2, 3) == (("native", 6), "native")
    assert registry.dispatch("scale", "native", 2, -1) == (("torch", -2), "torch")  # declined
    assert registry.dispatch("scale", "triton", 2, 3) == (("torch", 6), "torch")


def test_an_op_registers_once_per_backend(monkeypatch):
    monkeypatch.setattr(registry, "OPS", {})
    registry.register("scale", "torch")(lambda x: x)
    with pytest.raises(ValueError, match="op 'scale' already has a 'torch' implementation"):
        registry.register("scale", "torch")(lambda x: x)
