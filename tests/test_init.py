"""The data-driven start: silent layers are scaled to fire; --init paper keeps the paper's weights."""

import math

import numpy as np
import pytest
import torch

from ztriton import SilentLayerWarning, SparseLIFLinear
from ztriton.data import EventDataset
from ztriton.init import BAND, scale_to_activity
from ztriton.train import PRESETS, SNN, Config, train


def blobs(samples: int, seed: int, steps: int = 60, inputs: int = 120, classes: int = 4) -> EventDataset:
    """Sparse events: each class a blob of ~40 events in its own quarter of the inputs (like N-MNIST digits)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, samples)
    bins, units, offsets = [], [], [0]
    width = inputs // classes
    for label in labels:
        pairs = np.unique(rng.integers(0, steps, 40) * 1000 + label * width + rng.integers(0, width, 40))
        bins.append((pairs // 1000).astype(np.int16))
        units.append((pairs % 1000).astype(np.int16))
        offsets.append(offsets[-1] + pairs.size)
    return EventDataset(np.concatenate(bins), np.concatenate(units), np.asarray(offsets), labels, steps, inputs, classes)


def stack(seed=0):
    torch.manual_seed(seed)
    layers = [SparseLIFLinear(120, 40, beta=math.exp(-0.1)), SparseLIFLinear(40, 30, beta=math.exp(-0.1))]
    with torch.no_grad():
        for layer in layers:  # the paper's N-MNIST / SHD init
            bound = 1 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound)
    return layers


def run(layers, x):
    rates, h = [], x
    for layer in layers:
        h = layer(h)
        rates.append(float(h.mean()))
    return rates


def test_scaled_layers_fire_inside_the_band_where_the_paper_init_is_silent():
    x, _ = blobs(64, 0).batch(torch.arange(64))
    layers = stack()
    with torch.no_grad():
        assert run(layers, x) == [0.0, 0.0]  # silent: no gradient could ever wake them
    shapes = [layer.weight.clone() for layer in layers]
    gains = scale_to_activity(layers, x)
    with torch.no_grad():
        rates = run(layers, x)
    assert all(BAND[0] <= rate <= BAND[1] for rate in rates) and all(g > 1 for g in gains)
    for layer, before, gain in zip(layers, shapes, gains):
        torch.testing.assert_close(layer.weight, before * gain)  # only the gain changed
    layers[0](x.to_dense().requires_grad_(True))  # and LocalZO now finds active entries
    assert layers[0].stats["active_fraction"] > 0
    again = stack()
    assert scale_to_activity(again, x) == gains  # deterministic for a given batch


def test_auto_init_learns_where_the_paper_init_stays_at_chance(tmp_path, monkeypatch):
    data = (blobs(320, 1), blobs(160, 2))
    monkeypatch.setattr("ztriton.train.load_data", lambda cfg: data)
    results = {}
    for init in ("paper", "auto"):
        cfg = Config(dataset="nmnist", steps=60, hidden=[40], epochs=2, batch_size=32, lr=5e-3, init=init,
                     compare_every=0)
        if init == "paper":
            with pytest.warns(SilentLayerWarning):  # and the user is told
                results[init] = train(cfg, tmp_path / init, progress=False)
        else:
            results[init] = train(cfg, tmp_path / init, progress=False)
    assert results["paper"]["active_fraction"] == [0.0]  # the paper's init never wakes up here
    assert results["auto"]["test_accuracy"] >= 0.5 and results["auto"]["active_fraction"][0] > 0
    saved = (tmp_path / "auto" / "config.json").read_text()
    assert '"init": "auto"' in saved and '"init_gains": [' in saved


@pytest.mark.parametrize("dataset", ["fmnist", "nmnist", "shd", "shd-recurrent", "mnist5k"])
def test_paper_init_is_the_presets_formula(dataset):
    cfg = Config(dataset=dataset, hidden=[64, 48], init="paper").resolved()
    preset = PRESETS[dataset]
    torch.manual_seed(0)
    model = SNN(700, 10, cfg)
    torch.manual_seed(0)
    again = SNN(700, 10, cfg)
    for layer, twin in zip(model.hidden, again.hidden):
        assert torch.equal(layer.weight, twin.weight)
        fan_in, gain = layer.in_features, preset["init_gain"]
        if preset["init"] == "uniform":
            assert float(layer.weight.detach().abs().max()) <= gain / math.sqrt(fan_in)
        else:
            std = gain * 10 * (1 - preset["beta"]) / math.sqrt(fan_in)
            assert abs(float(layer.weight.detach().std()) / std - 1) < 0.05


def recurrent_layer(seed=0):
    torch.manual_seed(seed)
    layer = SparseLIFLinear(120, 40, beta=math.exp(-0.1), recurrent=True)
    with torch.no_grad():  # the paper's init of W (silent on the blobs); V keeps the layer's own
        layer.weight.uniform_(-1 / math.sqrt(120), 1 / math.sqrt(120))
    return layer


@pytest.mark.parametrize("start", ["silent", "saturated by W", "saturated by V"])
def test_recurrent_layers_are_brought_into_the_band(start):
    """W takes the gain g, V takes min(g, 1): a silent layer is scaled up with V at its init, a
    saturated one is scaled down, V with it."""
    x, _ = blobs(64, 0, steps=30).batch(torch.arange(64))
    layer = recurrent_layer()
    with torch.no_grad():
        if start == "saturated by W":
            layer.weight.mul_(30)
        if start == "saturated by V":  # every spike excites every neuron: the loop keeps itself firing
            layer.weight.mul_(8)
            layer.recurrent_weight.abs_().mul_(10)
        rate = float(layer(x).mean())
    assert rate == 0.0 if start == "silent" else rate > 5 * BAND[1]
    weight, recurrent = layer.weight.clone(), layer.recurrent_weight.clone()
    (gain,) = scale_to_activity([layer], x)
    with torch.no_grad():
        assert BAND[0] <= float(layer(x).mean()) <= BAND[1]
    assert (gain > 1) == (start == "silent")
    torch.testing.assert_close(layer.weight, weight * gain)
    torch.testing.assert_close(layer.recurrent_weight, recurrent * min(gain, 1.0))


@pytest.mark.parametrize(
    "args,error,message",
    [
        (dict(x=torch.zeros(0, 4, 120)), ValueError, r"x must be a non-empty \(T, B, in_features\) batch"),
        (dict(x=torch.zeros(10, 4, 120)), ValueError, "x has no non-zero entry: no weight gain can make the first layer fire"),
        (dict(x=torch.ones(10, 4, 120), band=(0.1, 0.05)), ValueError, "band must satisfy 0 < low < high < 1"),
        (dict(x=torch.ones(10, 4, 120), layers=[torch.nn.Linear(3, 3)]), TypeError, "layers must be a non-empty sequence"),
        (dict(x=torch.ones(10, 4, 120), band=(0.9999, 0.99999)), ValueError, r"layer 1 \(SparseLIFLinear\(120, 40"),
    ],
)
def test_scale_to_activity_errors(args, error, message):
    layers = args.pop("layers", None) or stack()
    with pytest.raises(error, match=message):
        scale_to_activity(layers, **args)
