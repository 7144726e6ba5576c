"""The op registry: one implementation per (op, backend), the torch one the reference of every op.

An op's module holds its torch implementation and registers it; another backend registers its
own for the same op name with one `@register(op, backend)` line. `dispatch` runs the layer's
backend's implementation, or the torch one where that backend has none or declines the call
(`accepts`), and names the one that ran (the layers' `stats["ops"]`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple


class Implementation(NamedTuple):
    """A backend's function for an op; `accepts(*args)` False sends that call to the torch one."""

    backend: str
    run: Callable
    accepts: Callable[..., bool] | None


#: (op, backend) -> Implementation
OPS: dict[tuple[str, str], Implementation] = {}


def register(op: str, backend: str, accepts: Callable[..., bool] | None = None) -> Callable:
    """Decorator: the function implements `op` on `backend` (for the calls `accepts` takes, default all)."""
    def add(function: Callable) -> Callable:
        if (op, backend) in OPS:
            raise ValueError(f"op {op!r} already has a {backend!r} implementation")
        OPS[op, backend] = Implementation(backend, function, accepts)
        return function
    return add


def dispatch(op: str, backend: str, *args):
    """(result, name of the implementation that ran) of `op` on `backend`, else on torch."""
    implementation = OPS.get((op, backend))
    if implementation is None or (implementation.accepts is not None and not implementation.accepts(*args)):
        implementation = OPS[op, "torch"]
    return implementation.run(*args), implementation.backend
