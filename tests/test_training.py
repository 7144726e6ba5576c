"""Training application: latency code, idx reader, a few training steps, resume, error paths."""

import gc
import gzip
import io
import json
import math
import statistics
import struct
import sys
import time

import numpy as np
import pytest
import torch

import ztriton.train
from ztriton.cli import main
from ztriton.data import DataError, SpikeTimeDataset, latency_times, load_fmnist, read_idx, stratified_split
from ztriton.bptt import BPTTNet
from ztriton.train import SPEEDUPS, Config, load_data, train


def test_latency_code_matches_hand_computed_times():
    pixels = torch.tensor([[0.0, 0.2, 0.21, 0.5, 1.0]])
    # 20 ln(x / (x - 0.2)): 0.21 -> 60.9 -> 60; 0.5 -> 10.2 -> 10; 1.0 -> 4.46 -> 4
    assert latency_times(pixels, 100).tolist() == [[-1, -1, 60, 10, 4]]
    assert latency_times(pixels, 50).tolist() == [[-1, -1, -1, 10, 4]]  # times >= T are dropped
    with pytest.raises(ValueError, match=r"pixels must lie in \[0, 1\]"):
        latency_times(torch.tensor([1.5]), 10)


def test_batches_put_one_spike_at_each_time():
    data = SpikeTimeDataset(torch.tensor([[2, -1, 0], [1, 1, -1]]), torch.tensor([3, 4]), steps=4, classes=5)
    x, y = data.batch(torch.tensor([1, 0]))
    assert x.shape == (4, 2, 3) and y.tolist() == [4, 3]
    assert x.is_sparse and x.is_coalesced()
    assert torch.nonzero(x.to_dense()).tolist() == [[0, 1, 2], [1, 0, 0], [1, 0, 1], [2, 1, 0]]


def test_stratified_split_keeps_class_balance():
    labels = np.repeat(np.arange(10), 50)
    train_idx, test_idx = stratified_split(labels, 0.2, seed=0)
    assert len(set(train_idx) | set(test_idx)) == 500 and not set(train_idx) & set(test_idx)
    assert np.bincount(labels[test_idx]).tolist() == [10] * 10


def test_mnist5k_held_out_set_does_not_depend_on_the_training_seed():
    _, test_a = load_data(Config(seed=0).resolved())
    _, test_b = load_data(Config(seed=3).resolved())
    assert len(test_a) == 1000 and torch.equal(test_a.times, test_b.times)
    assert torch.equal(test_a.labels, test_b.labels)


def _write_idx(path, array, magic, compress=False):
    header = struct.pack(">II", magic, array.shape[0]) + b"".join(struct.pack(">I", d) for d in array.shape[1:])
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def test_fmnist_idx_files_are_read_and_coded(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28))
    labels = np.arange(6) % 10
    _write_idx(tmp_path / "train-images-idx3-ubyte", images, 2051)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, 2049)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:2], 2051, compress=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:2], 2049, compress=True)
    train_set, test_set = load_fmnist(tmp_path, steps=100)
    assert len(train_set) == 6 and len(test_set) == 2 and train_set.inputs == 784
    expected = latency_times(torch.from_numpy(images.reshape(6, -1) / 255.0), 100)
    assert torch.equal(train_set.times, expected)
    assert np.array_equal(read_idx(tmp_path / "train-labels-idx1-ubyte"), labels)


def test_corrupt_and_missing_idx_files(tmp_path):
    (tmp_path / "bad").write_bytes(struct.pack(">II", 1234, 1) + b"\0")
    with pytest.raises(DataError, match="bad idx magic 1234"):
        read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", np.zeros((4, 2, 2)), 2051)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(DataError, match="expected 16 bytes of data, found 13"):
        read_idx(tmp_path / "short")
    with pytest.raises(DataError, match="Fashion-MNIST file train-images-idx3-ubyte"):
        load_fmnist(tmp_path / "nowhere", 100)


def _small(**kw):
    return Config(epochs=2, hidden=[40], steps=30, batch_size=128, compare_every=3, **kw)


def test_training_lowers_the_loss_and_reports_speed(tmp_path, monkeypatch):
    monkeypatch.setattr("ztriton.train.load_data", _tiny_data)
    timed = []  # (model, forward s, backward s) of every timed step: the speed comparison's and the training's
    timed_step = ztriton.train._timed_step

    def recorded(model, x, y, cfg):
        loss, logits, fwd, bwd = timed_step(model, x, y, cfg)
        timed.append((model, fwd, bwd))
        return loss, logits, fwd, bwd

    monkeypatch.setattr("ztriton.train._timed_step", recorded)
    summary = train(_small(lr=5e-3), tmp_path / "run", progress=False)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 2 and epochs[1]["train_loss"] < epochs[0]["train_loss"]
    assert all(e["data_s"] > 0 for e in epochs)  # batch building and moving is timed
    assert 0 <= summary["active_fraction"][0] <= 1 and 0 <= summary["test_accuracy"] <= 1
    assert (tmp_path / "run" / "training.png").stat().st_size > 0

    # 240 samples in batches of 128: 2 steps an epoch; --compare-every 3 compares before steps 1 and 4,
    # each time two runs of a sparse-path copy, two of a dense-path copy and two of the autograd BPTT
    # of the same network (the second of each timed)
    steps = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["steps"]
    assert [s["step"] for s in steps if "backward_speedup" in s] == [1, 4]
    trained = timed[-1][0]
    copies = [t for t in timed if t[0] is not trained]
    assert len(copies) == 12 and len(timed) == 12 + 4  # 4 training steps
    for number, step in enumerate(s for s in steps if "backward_speedup" in s):
        (sparse_copy, fs, bs), (dense_copy, fd, bd), (reference, fb, bb) = copies[6 * number + 1: 6 * number + 6: 2]
        assert [layer.path for layer in sparse_copy.hidden] == ["sparse"]
        assert [layer.path for layer in dense_copy.hidden] == ["dense"]
        assert isinstance(reference, BPTTNet) and reference.hidden[0].surrogate.bth is None  # dense surrogate
        assert torch.equal(reference.hidden[0].weight, sparse_copy.hidden[0].weight)  # the same weights
        assert step["backward_speedup"] == bd / bs and step["overall_speedup"] == (fd + bd) / (fs + bs)
        assert step["bptt_backward_speedup"] == bb / bs and step["bptt_overall_speedup"] == (fb + bb) / (fs + bs)
        assert all(math.isfinite(step[key]) and step[key] > 0 for key in SPEEDUPS)
    # the training steps' own timings are what metrics.jsonl sums per epoch
    own = [(f, b) for model, f, b in timed if model is trained]
    for epoch, entry in enumerate(epochs):
        assert entry["forward_s"] == sum(f for f, _ in own[2 * epoch : 2 * epoch + 2])
        assert entry["backward_s"] == sum(b for _, b in own[2 * epoch : 2 * epoch + 2])
        assert entry["compare_s"] < entry["wall_s"]
    # an epoch's speedup is the median of its compared steps', the run's the median of its epochs'
    assert [e["backward_speedup"] for e in epochs] == [s["backward_speedup"] for s in steps if "backward_speedup" in s]
    assert [e["overall_speedup"] for e in epochs] == [s["overall_speedup"] for s in steps if "overall_speedup" in s]
    for key in SPEEDUPS:
        assert [e[key] for e in epochs] == [s[key] for s in steps if key in s]
        assert summary[key] == statistics.median(e[key] for e in epochs)
    assert summary["wall_s"] == sum(e["wall_s"] for e in epochs)
    assert summary["compare_share"] == sum(e["compare_s"] for e in epochs) / summary["wall_s"]
    assert 0 < summary["compare_share"] < 1


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream,redraws", [(io.StringIO, False), (_Terminal, True)])
def test_progress_bar_draws_only_on_a_terminal(tmp_path, monkeypatch, stream, redraws):
    """stderr redirected to a file gets no bar (no carriage-return redraws); a terminal gets one."""
    monkeypatch.setattr("ztriton.train.load_data", _tiny_data)
    monkeypatch.setattr("sys.stderr", stream())
    train(Config(epochs=1, hidden=[40], steps=30, batch_size=128, compare_every=0), tmp_path / "run")
    assert ("\r" in sys.stderr.getvalue()) == redraws
    assert ("epoch 1/1" in sys.stderr.getvalue()) == redraws


def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    """Extending --epochs on resume equals the longer run when the learning rate does not depend on
    the horizon (a cosine schedule stretches from the resumed step instead)."""
    monkeypatch.setattr("ztriton.train.load_data", _tiny_data)
    cfg = _small(lr=5e-3, schedule="constant")
    full = train(cfg, tmp_path / "full", progress=False)
    cfg.epochs = 1
    train(cfg, tmp_path / "part", progress=False)
    cfg.epochs = 2
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed["test_accuracy"] == full["test_accuracy"]
    lines = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("full", "part")]
    strip = lambda line: {k: v for k, v in json.loads(line).items() if not k.endswith(("_s", "speedup"))}  # noqa: E731
    assert [strip(line) for line in lines[0]] == [strip(line) for line in lines[1]]
    cfg.lr = 1.0
    with pytest.raises(ValueError, match="was written with another configuration"):
        train(cfg, tmp_path / "part", resume=True, progress=False)


def _tiny_data(cfg):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    times = torch.full((300, 20), -1, dtype=torch.int64)
    for cls in range(3):  # each class fires its own inputs early
        rows = labels == cls
        times[rows, cls * 6 : cls * 6 + 6] = torch.randint(0, 10, (int(rows.sum()), 6), generator=gen)
    noise = torch.rand(300, 20, generator=gen) < 0.1
    times[noise] = torch.randint(0, cfg.steps, (int(noise.sum()),), generator=gen)
    return SpikeTimeDataset(times[:240], labels[:240], cfg.steps, 3), SpikeTimeDataset(times[240:], labels[240:], cfg.steps, 3)


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--dataset", "fmnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "Fashion-MNIST file train-images-idx3-ubyte" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    (tmp_path / "taken").mkdir()
    assert main(["train", "--out", str(tmp_path / "taken")]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "none")]) == 2
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "cifar"])


def _write_shd(root, split, samples):
    import h5py

    folder = root / "SHD"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"shd_{split}.h5.zip").write_bytes(b"")
    with h5py.File(folder / f"shd_{split}.h5", "w") as f:
        times = f.create_dataset("spikes/times", (len(samples),), dtype=h5py.vlen_dtype(np.float16))
        units = f.create_dataset("spikes/units", (len(samples),), dtype=h5py.vlen_dtype(np.uint16))
        for i, (t, u, _) in enumerate(samples):
            times[i] = np.asarray(t, dtype=np.float16)
            units[i] = np.asarray(u, dtype=np.uint16)
        f["labels"] = np.asarray([label for _, _, label in samples], dtype=np.uint16)
        f["extra/keys"] = np.asarray([b"zero", b"one"])
        f["extra/speaker"] = np.zeros(len(samples), dtype=np.uint16)


def test_shd_events_are_binned_on_a_fixed_grid(tmp_path):
    from ztriton.data import load_shd

    # times in seconds; dt = 2 ms: 0.0005 -> bin 0, 0.0031 -> bin 1, 0.0032 (same unit) -> bin 1 again
    # (clamped to one spike), 0.5 -> bin 250 >= T = 10 (dropped)
    samples = [([0.0005, 0.0031, 0.0032, 0.5], [3, 699, 699, 5], 7), ([0.019], [0], 19)]
    _write_shd(tmp_path, "train", samples)
    _write_shd(tmp_path, "test", samples[:1])
    train_set, test_set = load_shd(tmp_path, steps=10, dt_ms=2.0)
    assert len(train_set) == 2 and len(test_set) == 1 and train_set.inputs == 700
    x, y = train_set.batch(torch.tensor([0, 1]))
    assert y.tolist() == [7, 19] and x.shape == (10, 2, 700)
    # float16 rounds 0.019 s to 0.01900 -> bin 9
    assert x.is_sparse and torch.nonzero(x.to_dense()).tolist() == [[0, 0, 3], [1, 0, 699], [9, 1, 0]]
    assert (tmp_path / "ztriton-cache").is_dir()
    again, _ = load_shd(tmp_path, steps=10, dt_ms=2.0)  # from the decoded cache
    assert torch.equal(again.batch(torch.tensor([0, 1]))[0].to_dense(), x.to_dense())


def test_shd_missing_and_corrupt_files(tmp_path):
    from ztriton.data import load_shd

    with pytest.raises(DataError, match=r"SHD .*shd_train.h5: missing; place .*\(or pass --download"):
        load_shd(tmp_path, 10, 2.0)
    _write_shd(tmp_path, "train", [([0.001], [1], 0)])
    _write_shd(tmp_path, "test", [([0.001], [1], 0)])
    data = (tmp_path / "SHD" / "shd_train.h5").read_bytes()
    (tmp_path / "SHD" / "shd_train.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="shd_train.h5: unreadable files"):
        load_shd(tmp_path, 10, 2.0)


def _nmnist_bin(events):
    out = bytearray()
    for x, y, p, ts in events:
        out += bytes([x, y, (p << 7) | ((ts >> 16) & 127), (ts >> 8) & 255, ts & 255])
    return bytes(out)


def test_nmnist_polarities_merge_into_1156_inputs(tmp_path):
    from ztriton.data import load_nmnist

    for folder, zip_name in (("Train", "train.zip"), ("Test", "test.zip")):
        base = tmp_path / "NMNIST"
        (base / folder / "3").mkdir(parents=True)
        (base / zip_name).write_bytes(b"")
        # (x, y, polarity, microseconds): both polarities of pixel (2, 1) in bin 0 -> one input spike
        events = [(2, 1, 0, 100), (2, 1, 1, 900), (33, 33, 1, 2500), (0, 0, 0, 400_000)]
        (base / folder / "3" / "00001.bin").write_bytes(_nmnist_bin(events))
    train_set, test_set = load_nmnist(tmp_path, steps=5, dt_ms=1.0, min_files=1)
    x, y = train_set.batch(torch.tensor([0]))
    assert y.tolist() == [3] and x.shape == (5, 1, 1156)
    assert torch.nonzero(x.to_dense()).tolist() == [[0, 0, 2 + 34 * 1], [2, 0, 33 + 34 * 33]]


def test_nmnist_missing_files(tmp_path):
    from ztriton.data import load_nmnist

    with pytest.raises(DataError, match="N-MNIST .*: files missing; place train.zip"):
        load_nmnist(tmp_path, 5, 1.0)


def test_cli_resume_continues_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ztriton.train.load_data", _tiny_data)
    run = tmp_path / "run"
    base = ["train", "--hidden", "40", "--steps", "30", "--compare-every", "0", "--no-progress", "--lr", "0.005"]
    assert main(base + ["--epochs", "1", "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


def _ddp_worker(rank, world, store, x, y, out_dir):
    import torch.distributed as dist

    from ztriton.train import SNN, spike_regulariser

    import warnings

    from ztriton.train import equal_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = Config(grad="sparsegrad", delta=0.2, hidden=[30, 20]).resolved()  # sparsegrad: no random draws
    model = torch.nn.parallel.DistributedDataParallel(SNN(20, 3, cfg))
    shard = equal_shard(torch.arange(x.shape[1]), world, rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits, spikes = model(x[:, shard])
        loss = torch.nn.functional.cross_entropy(logits, y[shard]) + spike_regulariser(spikes, cfg)
        loss.backward()
    if rank == 0:
        torch.save([p.grad for p in model.module.parameters()], out_dir / "ddp.pt")
        (out_dir / "warnings.txt").write_text("\n".join(str(w.message) for w in caught))
    # torch 2.13: the DDP reducer must not hold the last reference to the gloo group (it frees it
    # with the GIL held, while a gloo thread waits for the GIL: a deadlock); see Processes.close
    del model, logits, spikes, loss
    gc.collect()
    dist.barrier()  # no process may tear the group down while the other still uses it
    dist.destroy_process_group()


def test_ddp_gradients_match_single_process(tmp_path):
    from ztriton.train import SNN, spike_regulariser

    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(30, 8, 20, generator=gen) < 0.3).float()
    y = torch.randint(0, 3, (8,), generator=gen)
    workers = torch.multiprocessing.spawn(_ddp_worker, args=(2, tmp_path / "store", x, y, tmp_path), nprocs=2,
                                          join=False)
    deadline = time.monotonic() + 180  # a deadlocked worker fails the test instead of hanging the run
    while not workers.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in workers.processes:
                process.kill()
                process.join()
            pytest.fail("the DDP workers did not finish within 180 s")
    torch.manual_seed(0)
    cfg = Config(grad="sparsegrad", delta=0.2, hidden=[30, 20]).resolved()
    model = SNN(20, 3, cfg)
    logits, spikes = model(x)
    (torch.nn.functional.cross_entropy(logits, y) + spike_regulariser(spikes, cfg)).backward()
    for a, b in zip(torch.load(tmp_path / "ddp.pt"), [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "warnings.txt").read_text() == ""  # no deprecation notes from the regulariser
    assert any(float(p.grad.abs().sum()) > 0 for p in model.hidden.parameters())


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--delta", "-1"], "delta must be finite and > 0, got -1.0"),
        (["--epochs", "0"], "epochs must be >= 1, got 0"),
        (["--lr", "0"], "lr must be a finite number > 0, got 0.0"),
        (["--hidden", "0"], "hidden must be >= 1, got 0"),
    ],
)
def test_cli_bad_values_write_nothing(tmp_path, capsys, flags, message):
    assert main(["train", "--out", str(tmp_path / "run")] + flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    import tonic

    from ztriton.data import load_shd

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tonic.datasets, "SHD", offline)
    with pytest.raises(DataError, match="missing; place .* the download failed \\(no network\\)"):
        load_shd(tmp_path, 10, 2.0, download=True)


def test_equal_shards_drop_the_same_remainder_everywhere():
    from ztriton.train import equal_shard

    index = torch.arange(11)
    shards = [equal_shard(index, 3, rank) for rank in range(3)]
    assert [s.tolist() for s in shards] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert equal_shard(index, 1, 0).tolist() == index.tolist()
    assert equal_shard(torch.arange(2), 3, 1).numel() == 0  # fewer samples than processes: the loop skips


def test_checkpoint_holds_every_process_rng_state(tmp_path, monkeypatch):
    monkeypatch.setattr("ztriton.train.load_data", _tiny_data)
    cfg = _small(lr=5e-3)
    cfg.epochs = 1
    train(cfg, tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert isinstance(state["rng"], list) and len(state["rng"]) == 1 and set(state["rng"][0]) == {"cpu"}
