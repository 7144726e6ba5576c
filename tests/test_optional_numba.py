"""numba is optional: missing or broken, `import ztriton` works and every entry point runs on torch.

Each case runs in a fresh interpreter: (a) `sys.modules['numba'] = None` (absent), (b) a `numba`
package first on PYTHONPATH whose import raises (broken).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import json, sys, warnings
    if {absent}:
        sys.modules["numba"] = None
    import numpy as np
    import torch
    import ztriton
    from ztriton import native

    warnings.simplefilter("ignore")
    report = dict(available=native.AVAILABLE, reason=native.UNAVAILABLE_REASON)


    def check(name, run):
        try:
            run()
            report[name] = "ok"
        except Exception as error:
            report[name] = f"{{type(error).__name__}}: {{error}}"


    def warm_up():
        try:
            native.warm_up()
        except RuntimeError as error:
            report["warm_up_error"] = str(error)
            return
        raise AssertionError("warm_up ran without numba")


    def layer_step(backend, sparse_input):
        torch.manual_seed(0)
        layer = ztriton.SparseLIFLinear(6, 5, beta=0.9, delta=0.5, path="sparse", backend=backend)
        readout = ztriton.LeakyReadout(5, 3, beta=0.8, backend=backend)
        layer.weight.data.mul_(4.0)
        x = (torch.rand(7, 3, 6) < 0.4).float()
        x = x.to_sparse() if sparse_input else x.requires_grad_(True)
        readout(layer(x)).sum().backward()
        assert layer.weight.grad is not None and layer.stats["backend"] == "torch"
        with torch.no_grad():
            layer(x.detach())


    def native_refused():
        try:
            ztriton.SparseLIFLinear(4, 3, beta=0.9, backend="native")(torch.zeros(2, 1, 4))
        except ValueError as error:
            assert "numba" in str(error), str(error)
            return
        raise AssertionError("backend='native' ran without numba")


    def event_data():
        from ztriton.data import EventDataset
        data = EventDataset(np.array([0, 2, 1], np.int16), np.array([1, 0, 3], np.int16), np.array([0, 2, 3]),
                            np.array([0, 1]), 4, 5, 2)
        spikes, labels = data.batch(torch.tensor([1, 0]))
        expected = torch.zeros(4, 2, 5)
        expected[0, 1, 1] = expected[2, 1, 0] = expected[1, 0, 3] = 1.0
        assert torch.equal(spikes.to_dense(), expected) and labels.tolist() == [1, 0]


    def spike_time_data():
        from ztriton.data import SpikeTimeDataset
        data = SpikeTimeDataset(torch.tensor([[0, 3, -1], [1, 1, 2]]), torch.tensor([0, 1]), 4, 2)
        spikes, labels = data.batch(torch.tensor([0, 1]))
        assert spikes.shape == (4, 2, 3) and int(spikes.to_dense().sum()) == 5 and labels.tolist() == [0, 1]


    def rng_contract():
        from ztriton import rng
        key, index = rng.PhiloxKey(12345, 7), torch.arange(100)
        got, expected = rng.uniforms(key, index, 1), rng.uniforms_reference(key, index, 1)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        ztriton.localzo_spike(torch.randn(3, 2, 4, requires_grad=True), delta=0.5).sum().backward()


    def events():
        from ztriton.events import events_of
        x = torch.tensor([[[0.0, 2.0], [1.0, 0.0]]])
        row_ptr, cols, values = events_of(x)
        assert row_ptr.tolist() == [0, 1, 2] and cols.tolist() == [1, 0] and values.tolist() == [2.0, 1.0]


    def init_and_calibrate():
        from ztriton.init import scale_to_activity
        torch.manual_seed(0)
        layers = [ztriton.SparseLIFLinear(20, 10, beta=0.9), ztriton.SparseLIFLinear(10, 8, beta=0.9)]
        scale_to_activity(layers, (torch.rand(30, 4, 20) < 0.3).float())
        entry = ztriton.calibrate("cpu", steps=8, batch=4, n_in=10, n_out=8, fractions=(0.1, 0.3), repeats=1,
                                  save=False)
        assert entry["backend"] == "torch", entry


    def one_warning():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layers = [ztriton.SparseLIFLinear(6, 5, beta=0.9), ztriton.SparseLIFLinear(5, 4, beta=0.9)]
            for _ in range(2):
                layers[1](layers[0](torch.ones(3, 2, 6)))
        fallbacks = [str(w.message) for w in caught if w.category is ztriton.BackendFallbackWarning]
        report["fallback_warnings"] = fallbacks
        assert all(layer.stats["backend"] == "torch" for layer in layers)


    check("one_warning", one_warning)  # first: the warning is given once per process
    check("warm_up", warm_up)
    check("torch_layer", lambda: layer_step("torch", False))
    check("auto_layer_dense_input", lambda: layer_step("auto", False))
    check("auto_layer_sparse_input", lambda: layer_step("auto", True))
    check("native_refused", native_refused)
    check("event_data", event_data)
    check("spike_time_data", spike_time_data)
    check("rng", rng_contract)
    check("events", events)
    check("init_and_calibrate", init_and_calibrate)
    print(json.dumps(report))
""")
ENTRY_POINTS = ("one_warning", "warm_up", "torch_layer", "auto_layer_dense_input", "auto_layer_sparse_input", "native_refused",
                "event_data", "spike_time_data", "rng", "events", "init_and_calibrate")


def _child(absent: bool, pythonpath: str | None = None) -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", CHILD.format(absent=absent)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def broken_numba(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    (root / "numba").mkdir()
    (root / "numba" / "__init__.py").write_text('raise RuntimeError("broken numba")\n')
    return str(root)


@pytest.mark.parametrize("case", ["absent", "broken"])
def test_ztriton_imports_and_runs_on_torch_without_a_working_numba(case, broken_numba):
    report = _child(case == "absent", None if case == "absent" else broken_numba)
    reason = "numba is not installed" if case == "absent" else "numba failed to import: RuntimeError: broken numba"
    assert report["available"] is False and report["reason"] == reason
    assert report["warm_up_error"] == f"the native kernels need numba: {reason}"
    assert report["fallback_warnings"] == [
        "ztriton's layers run on the torch backend, several times slower on CPU than the native kernels: "
        f"native: it needs numba, the CPU and a float32/64 layer ({reason}). Install numba for them."]
    assert {name: report[name] for name in ENTRY_POINTS} == {name: "ok" for name in ENTRY_POINTS}
