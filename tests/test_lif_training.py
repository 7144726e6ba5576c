"""The training application with the LIF family: --recurrent, --reset, --learn-beta, --learn-threshold
reach the layers, are kept in config.json, rebuild the same model on --resume and reach every run of
`ztriton compare`; the shd-recurrent preset."""

import json
import math
from dataclasses import asdict

import pytest
import torch

from test_training import _small, _tiny_data, _write_shd
from ztriton.cli import main
from ztriton.train import PRESETS, SNN, Config, load_data, train

LIF_FLAGS = ["--recurrent", "--reset", "zero", "--learn-beta", "--learn-threshold"]
# --init paper: the tiny data fire these small layers already (init auto on recurrent layers: test_init
# and the resume test below)
TINY = ["--steps", "20", "--batch-size", "120", "--init", "paper", "--compare-every", "0", "--no-progress",
        "--lr", "0.005"]


def test_the_lif_family_resolves_from_options_and_presets():
    plain = Config().resolved()
    assert (plain.hidden, plain.recurrent, plain.reset, plain.learn_beta, plain.learn_threshold) == (
        [200, 200], False, "subtract", False, False)
    recurrent = Config(dataset="shd-recurrent").resolved()
    assert recurrent.hidden == [200] and recurrent.recurrent and recurrent.reset == "subtract"
    assert PRESETS["shd-recurrent"]["data"] == "shd" and recurrent.steps == PRESETS["shd"]["steps"]
    assert Config(dataset="shd-recurrent", recurrent=False, hidden=[64, 32]).resolved().recurrent is False
    chosen = Config(recurrent=True, reset="zero", learn_beta=True, learn_threshold=True, hidden=[8]).resolved()
    assert Config(**json.loads(json.dumps(asdict(chosen)))).resolved() == chosen  # config.json round trip


def test_the_shd_recurrent_preset_reads_shd(tmp_path):
    samples = [([0.0005, 0.0031], [3, 699], 7), ([0.019], [0], 19)]
    _write_shd(tmp_path, "train", samples)
    _write_shd(tmp_path, "test", samples[:1])
    train_set, test_set = load_data(Config(dataset="shd-recurrent", data_dir=str(tmp_path), steps=10).resolved())
    assert (len(train_set), len(test_set), train_set.inputs) == (2, 1, 700)
    x, y = train_set.batch(torch.tensor([0, 1]))
    assert y.tolist() == [7, 19] and torch.nonzero(x.to_dense()).tolist() == [[0, 0, 3], [1, 0, 699], [9, 1, 0]]


@pytest.mark.parametrize(
    "options,error,message",
    [
        (dict(reset="hard"), ValueError, r"reset must be one of \['subtract', 'zero'\], got 'hard'"),
        (dict(recurrent="yes"), TypeError, "recurrent must be a bool, got 'yes'"),
        (dict(learn_beta=1), TypeError, "learn_beta must be a bool, got 1"),
    ],
)
def test_bad_lif_family_options_are_named(options, error, message):
    with pytest.raises(error, match=message):
        Config(**options).resolved()


def test_the_snn_builds_what_the_configuration_says():
    cfg = Config(dataset="shd-recurrent", reset="zero", learn_beta=True, learn_threshold=True).resolved()
    torch.manual_seed(0)
    model = SNN(700, 20, cfg)
    (layer,) = model.hidden
    assert layer.recurrent and layer.reset == "zero" and layer.learn_beta and layer.learn_threshold
    assert layer.recurrent_weight.shape == (200, 200) and float(layer.recurrent_weight.detach().abs().max()) <= 1 / math.sqrt(200)
    assert layer.beta == pytest.approx(PRESETS["shd"]["beta"]) and model.readout.learn_beta
    assert model.readout.beta == pytest.approx(PRESETS["shd"]["readout_beta"])
    names = dict(model.named_parameters())
    assert {"hidden.0.recurrent_weight", "hidden.0.beta_logit", "hidden.0.threshold", "readout.beta_logit"} <= set(names)
    fixed = SNN(700, 20, Config(dataset="shd").resolved())
    assert all(not layer.recurrent and layer.beta_logit is None and layer.recurrent_weight is None
               for layer in fixed.hidden)
    assert fixed.readout.beta_logit is None and "hidden.0.threshold" not in dict(fixed.named_parameters())


def test_cli_flags_reach_the_layers_and_config_json(tmp_path, monkeypatch):
    monkeypatch.setattr("ztriton.train.load_data", _tiny_data)
    run = tmp_path / "run"
    assert main(["train", "--hidden", "12", "10", "--epochs", "1", "--out", str(run)] + TINY + LIF_FLAGS) == 0
    saved = json.loads((run / "config.json").read_text())
    assert (saved["recurrent"], saved["reset"], saved["learn_beta"], saved["learn_threshold"]) == (True, "zero", True, True)
    trained = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    for number, width in enumerate([12, 10]):
        assert trained[f"hidden.{number}.recurrent_weight"].shape == (width, width)
        assert trained[f"hidden.{number}.threshold"].shape == (width,)
    # the learnable leaks and thresholds trained: their gradients reached Adam
    initial_logit = math.log(PRESETS["mnist5k"]["beta"] / (1 - PRESETS["mnist5k"]["beta"]))
    assert float(trained["hidden.0.beta_logit"]) != pytest.approx(initial_logit, abs=1e-6)
    assert float(trained["readout.beta_logit"]) != pytest.approx(
        math.log(PRESETS["mnist5k"]["readout_beta"] / (1 - PRESETS["mnist5k"]["readout_beta"])), abs=1e-6)
    assert bool((trained["hidden.0.threshold"] != 1.0).any())


def test_resume_rebuilds_the_recurrent_learnable_model(tmp_path, monkeypatch, capsys):
    """Resuming restores recurrent_weight, beta_logit and threshold and goes on exactly as an
    uninterrupted run; a resumed run refuses another LIF-family option."""
    monkeypatch.setattr("ztriton.train.load_data", _tiny_data)
    cfg = _small(lr=5e-3, schedule="constant", recurrent=True, reset="zero", learn_beta=True, learn_threshold=True)
    cfg.compare_every, cfg.hidden, cfg.steps = 0, [16], 20
    train(cfg, tmp_path / "full", progress=False)
    cfg.epochs = 1
    train(cfg, tmp_path / "part", progress=False)
    assert main(["train", "--resume", str(tmp_path / "part"), "--epochs", "2", "--no-progress"]) == 0
    full, part = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["model"] for d in ("full", "part"))
    assert {"hidden.0.recurrent_weight", "hidden.0.beta_logit", "hidden.0.threshold", "readout.beta_logit"} <= set(part)
    assert full.keys() == part.keys() and all(torch.equal(full[name], part[name]) for name in full)
    assert json.loads((tmp_path / "part" / "config.json").read_text())["init_gains"]  # init auto ran
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "part"), "--epochs", "3", "--no-recurrent"]) == 2
    assert "--no-recurrent False conflicts with the resumed run's recurrent=True" in capsys.readouterr().err


def test_a_run_from_before_the_lif_family_resumes(tmp_path, monkeypatch):
    """config.json and checkpoint.pt without the new options resume as the feed-forward network they were."""
    monkeypatch.setattr("ztriton.train.load_data", _tiny_data)
    run = tmp_path / "run"
    assert main(["train", "--hidden", "12", "--epochs", "1", "--out", str(run)] + TINY) == 0
    new = ("recurrent", "reset", "learn_beta", "learn_threshold")
    saved = {k: v for k, v in json.loads((run / "config.json").read_text()).items() if k not in new}
    (run / "config.json").write_text(json.dumps(saved))
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"] = {k: v for k, v in state["config"].items() if k not in new}
    torch.save(state, run / "checkpoint.pt")
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_compare_trains_every_method_with_the_lif_family(tmp_path, monkeypatch, capsys):
    runs = []

    def fake_train(cfg, run_dir, progress=False):
        runs.append(cfg)
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"forward_s": 1.0, "backward_s": 1.0}) + "\n")
        return {"test_accuracy": 0.5, "active_fraction": [0.01], "backward_speedup": 2.0, "overall_speedup": 1.5}

    monkeypatch.setattr("ztriton.compare.train", fake_train)
    monkeypatch.setattr("ztriton.compare.load_data", _tiny_data)
    monkeypatch.setattr("ztriton.compare.bptt_step_seconds", lambda cfg, data: 1.0)
    out = tmp_path / "table"
    assert main(["compare", "--seeds", "2", "--epochs", "1", "--out", str(out)] + LIF_FLAGS) == 0
    assert [cfg.grad for cfg in runs] == ["surrogate"] * 2 + ["sparsegrad"] * 2 + ["localzo"] * 2
    assert all((cfg.recurrent, cfg.reset, cfg.learn_beta, cfg.learn_threshold) == (True, "zero", True, True)
               for cfg in runs)
    assert "mnist5k, hidden 200r-200r, reset zero, learned leak, learned threshold, 1 epochs" in capsys.readouterr().out
    assert json.loads((out / "table.json").read_text())["network"] == {
        "hidden": [200, 200], "recurrent": True, "reset": "zero", "learn_beta": True, "learn_threshold": True}
