"""The benchmark scripts: every timed method computes the same result, and the table prints."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_kernels  # noqa: E402
import bench_layer  # noqa: E402


def test_kernel_benchmark_methods_agree():
    gen = torch.Generator().manual_seed(0)
    x, active, ds = bench_kernels.case((30, 8, 50, 20), 0.05, torch.device("cpu"), gen)
    results = {name: fn() for name, fn in bench_kernels.methods(x, active, ds, 20, torch.device("cpu")).items()}
    assert set(results) == {"dense", "torch-sparse", "engine-torch"}
    reference = results["dense"]
    assert reference.abs().sum() > 0
    for name, value in results.items():
        torch.testing.assert_close(value.to_dense() if value.is_sparse else value, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flags", [[], ["--recurrent"]], ids=["feed-forward", "recurrent"])
def test_layer_benchmark_prints_its_table(capsys, flags):
    bench_layer.main(["--steps", "20", "--batch", "4", "--inputs", "30", "--hidden", "16", "--classes", "3",
                      "--repeats", "1", "--no-memory", *flags])
    out = capsys.readouterr().out
    assert ("-16r-16r-3 " in out) == bool(flags)
    for method in bench_layer.METHODS:
        assert f"\n{method:<8}" in out
    assert "active fraction per layer" in out


@pytest.mark.parametrize("flags", [[], ["--recurrent"]], ids=["feed-forward", "recurrent"])
def test_peers_benchmark_prints_its_table(capsys, flags):
    import bench_peers

    bench_peers.main(["--steps", "12", "--batch", "3", "--inputs", "30", "--hidden", "16", "--repeats", "1", *flags])
    out = capsys.readouterr().out
    assert "\nztriton (events)" in out and "\nztriton (dense input)" in out and "\nautograd BPTT " in out
    assert ("-16r-16r LIF" in out) == bool(flags)
    for peer in ("snntorch", "spikingjelly"):  # measured where installed, else named as skipped
        assert f"\n{peer} " in out or f"{peer}: not installed, skipped" in out


def test_gpu_report_cost_model_on_a_small_shape():
    import gpu_report

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the Triton interpreter
    args = gpu_report.shape_args(steps=12, batch=4, inputs=30, hidden=16, classes=3)
    # the eager BPTT's op count is linear in T: the extrapolation from T 4 and 8 is exact at T 12
    (fwd_fixed, fwd_step), (bwd_fixed, bwd_step) = gpu_report.count_bptt(device)
    model = bench_layer.build("bptt", gpu_report._small(12)).to(device)
    x, labels = bench_layer.batch(gpu_report._small(12))
    forward, backward = gpu_report._phases(model, x.to(device), labels.to(device))
    assert (forward.device_ops, backward.device_ops) == (fwd_fixed + 12 * fwd_step, bwd_fixed + 12 * bwd_step)
    report = gpu_report.cost_model(device, gpu_report.GPUS["h200"], args)
    engine = report["rows"]["engine (sparse, Triton)"]
    assert engine["forward"]["syncs"] == 2 and engine["backward"]["syncs"] == 0  # one per layer: its active count
    assert engine["forward"]["launches"] + engine["backward"]["launches"] == 12
    for phase in ("forward", "backward"):
        r = engine[phase]
        assert r["total"] == r["launch"] + r["memory"] + r["compute"] + r["latency"] > 0
    assert "| eager BPTT backward |" in gpu_report.model_markdown(report, args)
