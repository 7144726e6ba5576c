"""Interrupted training: the last good checkpoint stands, resuming is exact, the CLI says one line."""

import json
import os
import signal

import pytest
import torch

from test_training import _small, _tiny_data
from ztriton.cli import main
from ztriton.train import Interrupted, train

TIMING = ("_s", "speedup", "compare_share")


def _interrupt_at(monkeypatch, call: int, raiser):
    """Make the `call`-th training step (1-based) raise through `raiser()`."""
    from ztriton import train as train_module

    original, calls = train_module._timed_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raiser()
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "_timed_step", step)


def _strip(line):
    return {k: v for k, v in json.loads(line).items() if not k.endswith(TIMING)}


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


def _send_sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("raiser,code", [(_raise_keyboard_interrupt, 130), (_send_sigterm, 143)])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch, raiser, code):
    monkeypatch.setattr("ztriton.train.load_data", _tiny_data)
    cfg = _small(lr=5e-3)
    cfg.epochs, cfg.compare_every = 3, 0  # every _timed_step call is then a training step
    train(cfg, tmp_path / "full", progress=False)
    with monkeypatch.context() as patch:  # 240 samples, batch 128: 2 steps per epoch; stop in epoch 2
        _interrupt_at(patch, 4, raiser)
        with pytest.raises(Interrupted) as stop:
            train(cfg, tmp_path / "part", progress=False)
    assert stop.value.code == code
    assert str(stop.value) == (f"interrupted in epoch 2: the checkpoint of epoch 1 stands in "
                               f"{tmp_path / 'part' / 'checkpoint.pt'}; continue with: ztriton train --resume "
                               f"{tmp_path / 'part'}")
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:  # as if stopped between metrics and checkpoint
        f.write('{"epoch": 2, "stale": true}\n')
    train(cfg, tmp_path / "part", resume=True, progress=False)
    full, part = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("full", "part"))
    for name, value in full["model"].items():
        assert torch.equal(value, part["model"][name]), name
    lines = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("full", "part")]
    assert [_strip(line) for line in lines[0]] == [_strip(line) for line in lines[1]]
    assert signal.getsignal(signal.SIGTERM) is not None  # the handler was put back


def test_interrupt_before_any_epoch_and_on_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ztriton.train.load_data", _tiny_data)
    _interrupt_at(monkeypatch, 1, _raise_keyboard_interrupt)
    run = tmp_path / "run"
    code = main(["train", "--hidden", "40", "--steps", "30", "--no-progress", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 130
    assert err == f"interrupted in epoch 1, before any epoch finished: nothing to resume in {run}\n"
    assert not (run / "checkpoint.pt").exists()


def test_resume_refuses_a_conflicting_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ztriton.train.load_data", _tiny_data)
    run = tmp_path / "run"
    base = ["train", "--hidden", "40", "--steps", "30", "--compare-every", "0", "--no-progress", "--lr", "0.005"]
    assert main(base + ["--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--lr", "0.5"]) == 2
    assert capsys.readouterr().err == ("ztriton: error: --lr 0.5 conflicts with the resumed run's lr=0.005; "
                                       "only --epochs may change when resuming\n")
    assert main(["train", "--resume", str(run), "--dataset=mnist5k", "--epochs", "2", "--lr", "0.005"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} after epoch 1" in out and "wall_s" in out
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(e["wall_s"] >= e["forward_s"] + e["backward_s"] + e["data_s"] for e in epochs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_any_work(tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    assert "ztriton: error: --device cuda: this torch build sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_options_are_named_in_errors_and_documented(capsys):
    assert main(["train", "--seed", "-1"]) == 2
    assert capsys.readouterr().err == "ztriton: error: --seed: seed must be an int >= 0, got -1\n"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("--compare-every COMPARE_EVERY time the sparse against the dense path every K steps "
                     "(0: never) (default: 200)", "--seed SEED seed of initialisation, shuffling and z (default: 0)"):
        assert fragment in text


def test_compare_writes_table_3(tmp_path, monkeypatch):
    from ztriton.compare import compare

    monkeypatch.setattr("ztriton.train.load_data", _tiny_data)
    monkeypatch.setattr("ztriton.compare.load_data", _tiny_data)
    out = tmp_path / "table"
    cfg = _small(lr=5e-3)
    cfg.epochs, cfg.compare_every = 1, 1
    compare(cfg, 2, out)
    table = json.loads((out / "table.json").read_text())
    rows = {row["method"]: row for row in table["rows"]}
    assert list(rows) == ["surrogate", "sparsegrad", "localzo"] and table["seeds"] == 2
    assert rows["surrogate"]["backward_speedup"] == 1.0 and rows["surrogate"]["active_fraction"] > 0.5
    for row in rows.values():
        assert 0 <= row["test_accuracy_mean"] <= 1 and row["test_accuracy_std"] >= 0 and row["speedup_vs_bptt"] > 0
    for method in ("sparsegrad", "localzo"):
        assert rows[method]["active_fraction"] < 0.1 and rows[method]["backward_speedup"] > 0
    run = json.loads((out / "sparsegrad-seed1" / "config.json").read_text())
    assert run["grad"] == "sparsegrad" and run["seed"] == 1
    assert run["bth"] == pytest.approx(0.1 * (2 / 3.141592653589793) ** 0.5)  # B_th of LocalZO's law and delta
    assert "| localzo |" in (out / "table.md").read_text()


def test_compare_on_the_command_line(tmp_path, monkeypatch, capsys):
    def fake_compare(cfg, seeds, out, progress):
        out.mkdir()
        (out / "table.md").write_text(f"{cfg.dataset} {seeds} seeds {cfg.epochs} epochs\n")

    monkeypatch.setattr("ztriton.compare.compare", fake_compare)
    assert main(["compare", "--seeds", "3", "--epochs", "2", "--out", str(tmp_path / "t")]) == 0
    assert capsys.readouterr().out.startswith("mnist5k 3 seeds 2 epochs\nwritten to ")
    assert main(["compare", "--out", str(tmp_path / "t")]) == 2  # exists already
