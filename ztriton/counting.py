"""Count what a piece of code asks of the device: torch ops, Triton kernel launches and host syncs.

Runs anywhere, CPU included (Triton under TRITON_INTERPRET=1), so the launch and sync budget of a
training step is checked without a GPU (tests) and feeds the cost model of `bench/gpu_report.py`.

- ops: every aten op dispatched, except views and allocations (they launch nothing on a GPU) and
  what the Triton interpreter itself does to move a kernel's arguments;
- launches: Triton kernel launches (`kernel[grid](...)`);
- syncs: ops that make the host wait for the device on CUDA: reading a value (`.item()`, `int()`,
  `bool()`, `.tolist()`), and ops whose output size depends on the data (`nonzero`, `unique`,
  `bincount`, `masked_select`, `coalesce`, boolean-mask indexing, `repeat_interleave` without an
  output size).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops (overload packet names) that synchronise the host with a CUDA device
SYNC_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "bincount", "unique", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "masked_select", "_coalesce", "coalesce", "repeat_interleave", "equal", "is_nonzero",
    "allclose",
})
#: aten ops that allocate or describe memory without launching a kernel
FREE_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
    "_indices", "_values", "indices", "values", "sparse_dim", "dense_dim", "_nnz", "is_coalesced",
    "_sparse_coo_tensor_with_dims_and_tensors", "promote_types", "result_type", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
})


@dataclass
class DeviceWork:
    """What was counted: `ops`, `launches`, `syncs` and the names behind them."""

    ops: int = 0
    launches: int = 0
    syncs: int = 0
    op_names: Counter = field(default_factory=Counter)
    kernel_names: Counter = field(default_factory=Counter)
    sync_names: Counter = field(default_factory=Counter)

    @property
    def device_ops(self) -> int:
        """torch ops plus Triton launches: the number of device kernels a GPU would run."""
        return self.ops + self.launches


def _is_sync(name: str, args) -> bool:
    if name in SYNC_OPS:
        return not (name == "repeat_interleave" and len(args) > 3 and args[3] is not None)
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    return False


class _Mode(TorchDispatchMode):
    def __init__(self, work: DeviceWork):
        super().__init__()
        self.work, self.paused = work, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = func.overloadpacket.__name__
            if _is_sync(name, args):
                self.work.syncs += 1
                self.work.sync_names[name] += 1
            elif not (func.is_view or name in FREE_OPS):
                self.work.ops += 1
                self.work.op_names[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_device_work():
    """Context manager yielding a `DeviceWork` filled with what the block dispatches."""
    import triton
    from triton.runtime import interpreter

    work = DeviceWork()
    mode = _Mode(work)
    runners = [(cls, cls.run) for cls in (triton.JITFunction, interpreter.InterpretedFunction)]
    tolist = torch.Tensor.tolist

    def counted_run(original):
        def run(self, *args, **kwargs):
            if kwargs.get("warmup"):
                return original(self, *args, **kwargs)
            work.launches += 1
            work.kernel_names[getattr(self.fn, "__name__", str(self.fn))] += 1
            mode.paused += 1  # the interpreter's own argument copies are not the program's
            try:
                return original(self, *args, **kwargs)
            finally:
                mode.paused -= 1
        return run

    def counted_tolist(self):
        if not mode.paused:
            work.syncs += 1
            work.sync_names["tolist"] += 1
        return tolist(self)

    for cls, original in runners:
        cls.run = counted_run(original)
    torch.Tensor.tolist = counted_tolist
    try:
        with mode:
            yield work
    finally:
        for cls, original in runners:
            cls.run = original
        torch.Tensor.tolist = tolist
