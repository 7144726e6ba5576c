"""The benchmark scripts: every timed method computes the same result, and the table prints."""

import json
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


# ---------------------------------------------------------------- bench_scaling.py

def test_scaling_grid_orders_points_and_rejects_unknown_names():
    import bench_scaling

    points = bench_scaling.grid(bench_scaling.QUICK, ["T"], ["ztriton", "bptt"])
    assert [(p["steps"], p["framework"]) for p in points] == [(8, "ztriton"), (8, "bptt"), (16, "ztriton"), (16, "bptt")]
    assert all(p["hidden"] == bench_scaling.QUICK["base"]["hidden"] and p["axis"] == "T" for p in points)
    only = bench_scaling.grid(bench_scaling.QUICK, ["width", "T"], ["bptt"], [32])
    assert [(p["axis"], p["hidden"], p["steps"]) for p in only] == [("width", 32, 12)]  # T has no value 32
    delta = bench_scaling.grid(bench_scaling.QUICK, ["delta"])
    assert {p["framework"] for p in delta} == {"ztriton", "ztriton-recurrent"}  # no peer's cost depends on delta
    with pytest.raises(ValueError, match="axes must be among width, T, input density, delta, got 'depth'"):
        bench_scaling.grid(bench_scaling.QUICK, ["depth"])
    with pytest.raises(ValueError, match="frameworks must be among .*, got 'norse'"):
        bench_scaling.grid(bench_scaling.QUICK, None, ["norse"])


def test_scaling_fit_recovers_a_power_law():
    import bench_scaling

    xs = [100, 300, 1000, 2000]
    assert bench_scaling.fit_slope(xs, [3.0 * x**1.5 for x in xs]) == pytest.approx(1.5, abs=1e-12)
    assert bench_scaling.fit_slope(xs, [7.0] * 4) == pytest.approx(0.0, abs=1e-12)
    assert bench_scaling.fit_slope([300, 300], [1.0, 2.0]) is None  # one distinct x: no slope
    assert bench_scaling.fit_slope([300, 1000], [1.0, 0.0]) is None  # a non-positive time is left out


def _row(bench_scaling, **fields):
    row = {field: "" for field in bench_scaling.FIELDS}
    row.update(fields)
    return row


def test_scaling_sweep_records_capped_points_and_measures_a_shape_once(monkeypatch):
    import bench_scaling

    calls = []

    def fake_run(point, **options):
        calls.append((point["framework"], point["steps"], point["hidden"]))
        slow = point["framework"] == "bptt" and point["hidden"] >= 32
        status = "time cap" if slow else "ok"
        return _row(bench_scaling, axis=point["axis"], framework=point["framework"], steps=point["steps"],
                    hidden=point["hidden"], status=status, step_ms="" if slow else float(point["steps"]),
                    peak_mib="" if slow else 1.0, wall_s=1.0, load_1min=0.5)

    monkeypatch.setattr(bench_scaling, "run_point", fake_run)
    spec = {**bench_scaling.QUICK, "width": ((16, 32, 64), ("ztriton", "bptt"))}
    points = bench_scaling.grid(spec, ["T", "width"], ["ztriton", "bptt"])
    rows = bench_scaling.sweep(points, log=lambda line: None, time_cap=1, memory_cap_mib=1, repeats=1,
                               point_budget=1, threads=1)
    assert len(rows) == len(points) == 10  # every point has its row, capped or not
    # T 12 (the base) is not on the T axis of QUICK; width 16 is the base width: measured once, on the T axis
    assert calls.count(("ztriton", 12, 16)) == 1 and calls.count(("bptt", 12, 16)) == 1
    assert ("bptt", 12, 64) not in calls  # width 32 hit the cap: 64 is recorded, not run
    last = [r for r in rows if r["framework"] == "bptt" and r["hidden"] == 64][0]
    assert last["status"] == "time cap" and last["note"].startswith("not run")
    base_on_width = [r for r in rows if r["axis"] == "width" and r["framework"] == "ztriton" and r["hidden"] == 16][0]
    assert base_on_width["status"] == "ok" and base_on_width["step_ms"] == 12.0


def test_scaling_csv_round_trip_and_tables(tmp_path):
    import bench_scaling

    rows = [_row(bench_scaling, axis="T", framework="ztriton", steps=t, batch=4, inputs=30, hidden=16, layers=2,
                 input_rate=0.1, delta=0.05, status="ok", step_ms=2.0 * t, peak_mib=0.5 * t, timed_steps=3)
            for t in (10, 20, 40)]
    rows.append(_row(bench_scaling, axis="T", framework="bptt", steps=10, batch=4, inputs=30, hidden=16, layers=2,
                     input_rate=0.1, delta=0.05, status="memory cap", peak_mib=9.0, note="RSS grew 9 MiB"))
    path = tmp_path / "s.csv"
    bench_scaling.write_csv(rows, path)
    assert path.read_text().splitlines()[0] == ",".join(bench_scaling.FIELDS)
    back = bench_scaling.read_csv(path)
    assert [r["steps"] for r in back] == [10.0, 20.0, 40.0, 10.0] and back[3]["status"] == "memory cap"
    assert back[0]["active_pct"] is None  # empty fields read back as None
    fit = bench_scaling.fits(back)[("T", "ztriton")]
    assert fit["time"] == pytest.approx(1.0) and fit["memory"] == pytest.approx(1.0) and fit["points"] == 3
    text = bench_scaling.tables(back)
    assert "| ztriton | 20 / 5 | 40 / 10 | 80 / 20 | 1.00 | 1.00 |" in text
    assert "| bptt | mem cap |  |  | - | - |" in text


def test_scaling_goal_compares_with_the_fastest_peer():
    import bench_scaling

    def at(framework, ms, mib):
        return _row(bench_scaling, axis="width", framework=framework, status="ok", step_ms=ms, peak_mib=mib,
                    **bench_scaling.GOAL)

    rows = [at("ztriton", 200.0, 100.0), at("snntorch", 2000.0, 500.0), at("spikingjelly", 3000.0, 400.0)]
    text = bench_scaling.goal(rows)
    assert "10.00x its time" in text and "20 % of its peak memory" in text and "25 % of the smallest" in text
    assert bench_scaling.goal(rows[:1]) is None  # no peer measured there


def test_scaling_point_caps_in_a_child_process():
    import bench_scaling

    point = bench_scaling.grid(bench_scaling.QUICK, ["T"], ["ztriton"])[0]
    ok = bench_scaling.run_point(point, time_cap=300, memory_cap_mib=2048, repeats=2, point_budget=5, threads=1)
    assert ok["status"] == "ok", ok["note"]
    assert ok["timed_steps"] == 2 and ok["step_ms_min"] <= ok["step_ms"] <= ok["step_ms_max"]
    assert ok["peak_mib"] >= 0 and 0 <= ok["active_pct"] <= 100 and 0 <= ok["spike_rate"] <= 1
    big = {**point, "framework": "bptt", "steps": 200, "batch": 64, "inputs": 200, "hidden": 256}
    memory = bench_scaling.run_point(big, time_cap=300, memory_cap_mib=1, repeats=1, point_budget=5, threads=1)
    assert memory["status"] == "memory cap" and memory["peak_mib"] > 1 and memory["step_ms"] == ""
    timed_out = bench_scaling.run_point(point, time_cap=0.2, memory_cap_mib=2048, repeats=1, point_budget=5, threads=1)
    assert timed_out["status"] == "time cap" and timed_out["note"] == "killed after 0.2 s"


def test_scaling_tiny_sweep_writes_its_csv_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import bench_scaling

    rows = bench_scaling.main(["--quick", "--axes", "delta", "--frameworks", "ztriton", "--threads", "1",
                               "--repeats", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert "reproduce: python bench/bench_scaling.py --quick --time-cap 60" in out and "--axes 'delta'" in out
    assert "| ztriton | " in out and "time ~ x^k" in out
    back = bench_scaling.read_csv(tmp_path / "scaling_quick.csv")
    assert [r["delta"] for r in back] == [0.05, 0.2] and all(r["step_ms"] > 0 for r in back)
    assert (tmp_path / "scaling_quick.png").stat().st_size > 10_000


# ---------------------------------------------------------------- gpu_report.py: the strongest peers

def test_compiled_bptt_agrees_with_the_eager_bptt():
    import bench_peers
    import gpu_report

    args = gpu_report.peer_shape_args(12, 4, 30, 16)
    weights, x, projection = gpu_report._peer_inputs(args, torch.device("cpu"))
    beta = gpu_report.math.exp(-0.2)
    eager = bench_peers.bptt_net(weights, beta)
    forward, module = gpu_report.compiled_bptt_net(weights, beta, backend="aot_eager")
    spikes = {}
    for name, (fn, params) in {"eager": (eager, list(eager.parameters())),
                               "compiled": (forward, list(module.parameters()))}.items():
        spikes[name] = bench_peers.timed_step(fn, params, x, projection)[2]
        spikes[name + " grads"] = [p.grad.clone() for p in params]
    assert spikes["eager"].sum() > 0 and torch.equal(spikes["compiled"], spikes["eager"])
    for got, want in zip(spikes["compiled grads"], spikes["eager grads"]):  # the same dense normal surrogate
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="feed-forward layers only"):
        gpu_report.compiled_bptt_net([(weights[0][0], torch.zeros(16, 16))], beta)


def test_gpu_report_installs_peers_from_carried_wheels_or_skips_them(tmp_path, monkeypatch):
    import gpu_report

    monkeypatch.setattr(gpu_report, "PEER_PACKAGES", ("torch", "no_such_peer_a", "no_such_peer_b"))
    (tmp_path / "no_such_peer_b-1.0-py3-none-any.whl").write_bytes(b"")
    lines = gpu_report.ensure_peers(tmp_path, dry_run=True)
    assert lines[0] == "torch: installed"
    assert lines[1].startswith(f"no_such_peer_a: not installed and no wheel in {tmp_path}/, skipped (prepare: pip download")
    assert lines[2].startswith("no_such_peer_b: would run ") and f"--no-index --no-deps --find-links {tmp_path} no_such_peer_b" in lines[2]


def test_gpu_report_parts_keep_to_the_budget(tmp_path):
    import gpu_report

    commands = {"a": [sys.executable, "-c", "print('part a')"], "b": [sys.executable, "-c", "print('part b')"]}
    parts = gpu_report.run_parts(commands, tmp_path, budget=60, limits=(("a", 30), ("b", 30)))
    assert parts["a"]["returncode"] == 0 and parts["a"]["tail"] == "part a" and (tmp_path / "a.log").exists()
    spent = gpu_report.run_parts(commands, tmp_path, budget=5, limits=(("a", 30), ("b", 30)))
    assert [p["returncode"] for p in spent.values()] == ["not run (budget spent)"] * 2


def test_gpu_report_dry_run_on_cpu(tmp_path):
    import gpu_report

    gpu_report.main(["--dry-run", "--compile-backend", "aot_eager", "--out", str(tmp_path)])
    report = (tmp_path / "gpu_report.md").read_text()
    assert "DRY RUN (tiny shapes)" in report and "| compiled BPTT backward |" in report
    assert "## Measured: the strongest peers (cpu)" in report and "### strongest: exit 0" in report
    measured = json.loads((tmp_path / "strongest.json").read_text())
    assert {"ztriton (events)", "compiled BPTT", "eager BPTT"} <= set(measured["rows"])
    assert measured["rows"]["compiled BPTT"]["spikes_equal_eager_bptt"] == 1.0
    costs = json.loads((tmp_path / "cost_model.json").read_text())["peers"]
    args = gpu_report._tiny_shapes()[1]
    compiled, jelly = costs["rows"]["compiled BPTT"], costs["rows"]["spikingjelly"]
    assert compiled["forward"]["compiled_calls"] == compiled["backward"]["compiled_calls"] == 2 * args.steps
    assert jelly["forward"]["loop_steps"] == jelly["backward"]["loop_steps"] == 2 * args.steps
    for row in costs["rows"].values():  # each predicted step is the sum of its terms
        for phase in ("forward", "backward"):
            r = row[phase]
            assert r["total"] == pytest.approx(r["launch"] + r["memory"] + r["compute"] + r["latency"]) and r["total"] > 0


def test_gpu_report_part_that_times_out_keeps_its_output(tmp_path):
    import gpu_report

    part = gpu_report.run([sys.executable, "-c", "import time; print('begun', flush=True); time.sleep(30)"],
                          tmp_path, "slow", timeout=3)
    assert part["returncode"] == "timeout" and "begun" in (tmp_path / "slow.log").read_text()
