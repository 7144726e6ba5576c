"""Training application: the paper's fully connected SNNs (its section 5, Table 3).

input -> hidden LIF layers (SparseLIFLinear) -> LeakyReadout; logits = max or sum over time of the
readout; loss = NLL of log-softmax + a spike-count regulariser on the hidden layers. Every
`--compare-every` steps the sparse path, the dense path and a standard autograd BPTT of the same
network are timed on the SAME weights and batch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ._checks import positive_int
from .bptt import BPTTNet
from .data import DataError, EventDataset, SpikeTimeDataset, load_fmnist, load_mnist5k, load_nmnist, load_shd
from .functional import spike_count
from .layers import RESETS, LeakyReadout, SparseLIFLinear

PRESETS = {
    # T, beta, readout beta, readout over time, lr, batch, LocalZO delta, init law and its gain on the
    # hidden layers. fmnist, nmnist and shd are the paper's presets (its fully connected experiments); mnist5k
    # (4,000 training digits) takes batch 32, lr 2e-3, delta 0.1 and a 5x hidden init so that the
    # small set trains in a minute: with the 1x init the hidden layers stay silent, with batch 256
    # an epoch is only 16 steps, and with delta 0.05 one seed in three stalled near 80 % for 20 epochs.
    "mnist5k": dict(steps=100, beta=math.exp(-0.1), readout_beta=math.exp(-0.1), readout="max", lr=2e-3,
                    batch_size=32, delta=0.1, init="normal", init_gain=5.0),
    "fmnist": dict(steps=100, beta=math.exp(-0.1), readout_beta=math.exp(-0.1), readout="max", lr=2e-4,
                   batch_size=256, delta=0.05, init="normal", init_gain=1.0),
    "nmnist": dict(steps=300, dt_ms=1.0, beta=math.exp(-0.1), readout_beta=math.exp(-0.1), readout="max",
                   lr=2e-4, batch_size=256, delta=0.05, init="uniform", init_gain=1.0),
    "shd": dict(steps=500, dt_ms=2.0, beta=math.exp(-0.2), readout_beta=math.exp(-0.1), readout="sum",
                lr=1e-3, batch_size=256, delta=0.05, init="uniform", init_gain=1.0, f_up=10.0),
}
# SHD with one recurrent hidden layer of 200 LIF neurons: the network of the SHD tutorial of the SHD
# authors' group (SpyTorch tutorial 4, 700-200r-20); time grid, leaks, readout, optimizer and
# regulariser are the shd preset's. Its extra keys: the data set it reads and the defaults of
# --hidden and --recurrent.
PRESETS["shd-recurrent"] = dict(PRESETS["shd"], data="shd", hidden=[200], recurrent=True)

#: hidden layer sizes where neither --hidden nor the preset gives them
DEFAULT_HIDDEN = [200, 200]


#: learning-rate schedules over the whole run: constant, or cosine decay to 0 (per step)
SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, total_steps: int):
    """The learning-rate factor per optimizer step: 1, or a cosine decay from 1 to 0 over the run."""
    if schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


@dataclass
class Config:
    dataset: str = "mnist5k"
    data_dir: str = "data"
    download: bool = False
    grad: str = "localzo"
    dist: str = "normal"
    delta: float | None = None
    m: int = 1
    bth: float | None = None
    path: str = "auto"
    epochs: int = 20
    batch_size: int | None = None
    lr: float | None = None
    schedule: str | None = None
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    init: str = "auto"
    init_gains: list | None = None
    hidden: list | None = None
    recurrent: bool | None = None
    reset: str | None = None
    learn_beta: bool = False
    learn_threshold: bool = False
    steps: int | None = None
    compare_every: int = 200
    lambda_up: float = 0.06
    f_up: float | None = None
    lambda_low: float = 100.0
    f_low: float = 1e-3

    def resolved(self) -> "Config":
        """A copy with the dataset preset filled in where no value was given."""
        if self.dataset not in PRESETS:
            raise ValueError(f"dataset must be one of {sorted(PRESETS)}, got {self.dataset!r}")
        preset = PRESETS[self.dataset]
        out = copy.deepcopy(self)
        out.lr = preset["lr"] if self.lr is None else self.lr
        out.steps = preset["steps"] if self.steps is None else self.steps
        out.batch_size = preset["batch_size"] if self.batch_size is None else self.batch_size
        out.delta = preset["delta"] if self.delta is None else self.delta
        out.schedule = preset.get("schedule", "constant") if self.schedule is None else self.schedule
        if out.init not in ("auto", "paper"):
            raise ValueError(f"init must be 'auto' or 'paper', got {out.init!r}")
        if out.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {out.schedule!r}")
        out.f_up = preset.get("f_up", 1.0) if self.f_up is None else self.f_up
        hidden = preset.get("hidden", DEFAULT_HIDDEN) if self.hidden is None else self.hidden
        if not isinstance(hidden, (list, tuple)):
            raise TypeError(f"hidden must be a list of layer sizes, got {hidden!r}")
        out.hidden = list(hidden)
        out.recurrent = preset.get("recurrent", False) if self.recurrent is None else self.recurrent
        out.reset = preset.get("reset", "subtract") if self.reset is None else self.reset
        for name in ("recurrent", "learn_beta", "learn_threshold"):
            if not isinstance(getattr(out, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(out, name)!r}")
        if out.reset not in RESETS:
            raise ValueError(f"reset must be one of {list(RESETS)}, got {out.reset!r}")
        for name in ("epochs", "batch_size", "steps"):
            positive_int(name, getattr(out, name))
        if isinstance(out.seed, bool) or not isinstance(out.seed, int) or out.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {out.seed!r}")
        if isinstance(out.compare_every, bool) or not isinstance(out.compare_every, int) or out.compare_every < 0:
            raise ValueError(f"compare_every must be an int >= 0, got {out.compare_every!r}")
        if not out.hidden:
            raise ValueError("hidden must list at least one layer size")
        for size in out.hidden:
            positive_int("hidden", size)
        for name in ("lr", "lambda_up", "f_up", "lambda_low", "f_low"):
            value = getattr(out, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0) or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        return out


class SNN(nn.Module):
    """Hidden SparseLIFLinear layers and a LeakyReadout; returns logits (B, classes) and hidden spikes.

    The hidden layers take the configuration's recurrence, reset and learnable leak and threshold,
    the readout its learnable leak. The preset's init law draws the feed-forward weights; a
    recurrent weight keeps the layer's own init (uniform +-1/sqrt(out), as nn.Linear).
    """

    def __init__(self, inputs: int, classes: int, cfg: Config):
        super().__init__()
        preset = PRESETS[cfg.dataset]
        sizes = [inputs] + list(cfg.hidden)
        self.hidden = nn.ModuleList(
            SparseLIFLinear(
                a, b, beta=preset["beta"], recurrent=cfg.recurrent, reset=cfg.reset, learn_beta=cfg.learn_beta,
                learn_threshold=cfg.learn_threshold, grad=cfg.grad, dist=cfg.dist, delta=cfg.delta, m=cfg.m,
                bth=cfg.bth, path=cfg.path, backend=cfg.backend,
            )
            for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.readout = LeakyReadout(sizes[-1], classes, beta=preset["readout_beta"], learn_beta=cfg.learn_beta,
                                    backend=cfg.backend)
        self.reduce = preset["readout"]
        for layer in list(self.hidden) + [self.readout]:
            fan_in = layer.weight.shape[1]
            gain = preset["init_gain"] if layer is not self.readout and cfg.init == "paper" else 1.0
            with torch.no_grad():
                if preset["init"] == "normal":  # N(0, 10 (1 - beta) / sqrt(fan_in))
                    layer.weight.normal_(0.0, gain * 10.0 * (1.0 - preset["beta"]) / math.sqrt(fan_in))
                else:
                    layer.weight.uniform_(-gain / math.sqrt(fan_in), gain / math.sqrt(fan_in))

    def forward(self, x):
        spikes = []
        h = x
        for layer in self.hidden:
            h = layer(h)
            spikes.append(h)
        out = self.readout(h)
        logits = out.amax(0) if self.reduce == "max" else out.sum(0)
        return logits, spikes


def load_model(run_dir) -> SNN:
    """The network of a run folder (its config.json and checkpoint.pt) on the CPU, in eval mode; its
    sizes are read from the checkpoint, so no data set is loaded."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.pt").exists() or not (run_dir / "config.json").exists():
        raise DataError(f"{run_dir}: no checkpoint.pt and config.json there")
    cfg = Config(**json.loads((run_dir / "config.json").read_text())).resolved()
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False, map_location="cpu")["model"]
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten by the checkpoint
        model = SNN(state["hidden.0.weight"].shape[1], state["readout.weight"].shape[0], cfg)
    model.load_state_dict(state)
    return model.eval()


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; its gradient is the sum of the processes' gradients (as every process's
    loss uses the sum)."""

    @staticmethod
    def forward(ctx, values):
        out = values.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _batch_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the whole batch, across processes when running under torch.distributed."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values.mean(0)
    count = torch.tensor([values.shape[0]], dtype=values.dtype, device=values.device)
    dist.all_reduce(count)
    return _AllReduceSum.apply(values.sum(0)) / count


def rng_states(device: torch.device) -> dict:
    """This process's generator states: CPU, and the device's CUDA generator (LocalZO's draws there)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["cpu"].cpu())
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


def equal_shard(index: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Process `rank`'s equal share of a batch; the remainder (< world samples) is dropped by every process."""
    usable = index.numel() - index.numel() % world
    return index[:usable].view(world, -1)[rank]


def spike_regulariser(spikes, cfg: Config) -> torch.Tensor:
    """lambda_up mean_b relu(mean_n count - f_up)^2 + lambda_low mean_n relu(f_low - mean_b count)^2.

    `count` is each neuron's spike count over the sample; applied to every hidden layer. The
    batch mean of the lower bound is taken over the whole (multi-process) batch.
    """
    total = spikes[0].new_zeros(())
    for s in spikes:
        count = spike_count(s)  # (B, N), with a sparse backward on the layers' outputs
        total = total + cfg.lambda_up * torch.relu(count.mean(1) - cfg.f_up).pow(2).mean()
        total = total + cfg.lambda_low * torch.relu(cfg.f_low - _batch_mean(count)).pow(2).mean()
    return total


def load_data(cfg: Config):
    """(train, test) datasets of the configured preset (its "data" key, else its name)."""
    preset = PRESETS[cfg.dataset]
    data = preset.get("data", cfg.dataset)
    if data == "mnist5k":
        return load_mnist5k(cfg.steps)
    if data == "fmnist":
        return load_fmnist(Path(cfg.data_dir), cfg.steps)
    if data == "shd":
        return load_shd(Path(cfg.data_dir), cfg.steps, preset["dt_ms"], download=cfg.download)
    return load_nmnist(Path(cfg.data_dir), cfg.steps, preset["dt_ms"], download=cfg.download)


def _timed_step(model, x, y, cfg):
    """Forward + backward of one batch; returns (loss, logits, forward s, backward s)."""
    model.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    logits, spikes = model(x)
    loss = nn.functional.cross_entropy(logits, y) + spike_regulariser(spikes, cfg)
    sync()
    middle = time.perf_counter()
    loss.backward()
    sync()
    return loss, logits, middle - start, time.perf_counter() - middle


def compare_paths(model, x, y, cfg, states: dict) -> dict:
    """The step timed three ways on the same weights, batch and loss: the model's sparse path, its
    dense path (both on copies, with the same LocalZO draws) and a standard autograd BPTT of the same
    network (`ztriton.bptt.BPTTNet.from_snn`: dense surrogate, dense input). Returns the sparse path's
    backward and overall speedup over the dense path and over the BPTT.

    Single-process runs only: under torchrun the copies' steps would need a process group of their own.
    """
    timings = {}
    for path in ("sparse", "dense"):
        clone = copy.deepcopy(model)
        for layer in clone.hidden:
            layer.path = path
        timings[path] = _second_run(clone, x, y, cfg, states)
    dense_x = x.to_dense() if x.is_sparse else x
    timings["bptt"] = _second_run(BPTTNet.from_snn(model), dense_x, y, cfg, states)
    set_rng_states(states, x.device)  # the training step then draws the same z as the timed copies
    (fs, bs), (fd, bd), (fb, bb) = timings["sparse"], timings["dense"], timings["bptt"]
    return {"backward_speedup": bd / bs, "overall_speedup": (fd + bd) / (fs + bs),
            "bptt_backward_speedup": bb / bs, "bptt_overall_speedup": (fb + bb) / (fs + bs)}


def _second_run(model, x, y, cfg, states: dict) -> tuple[float, float]:
    """(forward s, backward s) of the second of two steps (the first warms buffers), each from `states`."""
    for _ in range(2):
        set_rng_states(states, x.device)
        _, _, fwd, bwd = _timed_step(model, x, y, cfg)
    return fwd, bwd


def snn_reference(inputs: int, classes: int, cfg: Config, surrogate=None, dtype: torch.dtype | None = None) -> BPTTNet:
    """The autograd BPTT of a fresh `SNN(inputs, classes, cfg)`: its sizes, leaks, thresholds, law and
    delta, reduction over time, and the initial weights SNN draws (from the global generator);
    `surrogate` and `dtype` as in `BPTTNet.from_snn`."""
    return BPTTNet.from_snn(SNN(inputs, classes, cfg), surrogate, dtype)


def evaluate(model, data, cfg, device) -> tuple[float, float]:
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), cfg.batch_size):
            index = torch.arange(start, min(len(data), start + cfg.batch_size))
            x, y = to_device(*data.batch(index), device)
            logits, _ = model(x)
            total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    model.train()
    return total_loss / len(data), correct / len(data)


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on `device`; to a GPU through pinned memory without blocking the host."""
    if device.type != "cuda":
        return x.to(device), y.to(device)
    return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def plot_run(run_dir: Path, steps: list[dict], epochs: list[dict]) -> None:
    """PNG plots like the paper's figure 2: loss, accuracy, speedup and active % per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    x = [s["step"] for s in steps]
    axes[0, 0].plot(x, [s["loss"] for s in steps])
    axes[0, 0].set(title="training loss", xlabel="step")
    axes[0, 1].plot([e["epoch"] for e in epochs], [100 * e["train_accuracy"] for e in epochs], label="train")
    axes[0, 1].plot([e["epoch"] for e in epochs], [100 * e["test_accuracy"] for e in epochs], label="test")
    axes[0, 1].set(title="accuracy %", xlabel="epoch")
    axes[0, 1].legend()
    for key, label in zip(SPEEDUPS, ("backward x dense", "overall x dense", "backward x BPTT", "overall x BPTT")):
        compared = [s for s in steps if key in s]
        axes[1, 0].plot([s["step"] for s in compared], [s[key] for s in compared], label=label)
    axes[1, 0].set(title="speedup of the sparse step (same batch)", xlabel="step", yscale="log")
    axes[1, 0].legend()
    for i in range(len(steps[0]["active_fraction"]) if steps else 0):
        axes[1, 1].plot(x, [100 * s["active_fraction"][i] for s in steps], label=f"layer {i + 1}")
    axes[1, 1].set(title="active entries %", xlabel="step")
    axes[1, 1].legend()
    fig.tight_layout()
    fig.savefig(run_dir / "training.png", dpi=100)
    plt.close(fig)


class Processes:
    """The torchrun process group (gloo on CPU, nccl on GPU), or a single process.

    torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; each process takes an equal slice of every
    global batch and DistributedDataParallel averages the gradients, which then equal those of
    one process on the whole batch (the LocalZO draws are per process).
    """

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", local)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # every process's kernels on its own GPU
        self.owns_group = self.world > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        return equal_shard(index, self.world, self.rank)

    def gather(self, obj) -> list:
        """`obj` of every process, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def wrap(self, model: nn.Module) -> nn.Module:
        return DistributedDataParallel(model) if self.world > 1 else model

    def close(self) -> None:
        """Wait for every process (none may tear the group down while another still uses it), then
        destroy the group if this object made it.

        Call it after the DistributedDataParallel model is gone: in torch 2.13 a DDP reducer that
        holds the last reference to a gloo group frees it with the GIL held, while a gloo thread
        waits for the GIL to free the backward's thread-local Python context (a deadlock, seen in
        about one run in five). Freed here instead, the group releases the GIL first.
        """
        if self.world > 1:
            dist.barrier()
        if self.owns_group:
            dist.destroy_process_group()
            self.owns_group = False

    def sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()


def backward_synops(model: SNN) -> tuple[int, int]:
    """(dense, sparse) multiply-adds of the last backward's weight and input gradients.

    Dense: every (t, b, i) entry times fan-in for dW and, above the first layer, times fan-out for
    dx. Sparse: the active entries times fan-in, and the upstream active entries times fan-out. A
    recurrent layer adds, per entry (dense) or per active entry (sparse), its width twice: the
    recurrent term V^T delta of its own error and the gradient of V.
    """
    dense = sparse = 0
    previous_nnz = None
    for layer in model.hidden:
        grid = layer.stats.get("grid", 0)
        nnz = round((layer.stats["active_fraction"] or 0.0) * grid)
        dense += grid * layer.in_features * (1 if previous_nnz is None else 2)
        sparse += nnz * layer.in_features + (0 if previous_nnz is None else previous_nnz * layer.out_features)
        if layer.recurrent:
            dense += 2 * grid * layer.out_features
            sparse += 2 * nnz * layer.out_features
        previous_nnz = nnz
    return dense, sparse


#: the speedups a compared step records: the sparse path's backward and overall (forward + backward)
#: over the engine's dense path and over the autograd BPTT of the same network, same weights and batch
SPEEDUPS = ("backward_speedup", "overall_speedup", "bptt_backward_speedup", "bptt_overall_speedup")


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Interrupted(Exception):
    """Training stopped by Ctrl-C (exit code 130) or SIGTERM (143); the last checkpoint stands."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is (handled like Ctrl-C)."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def _trim_metrics(path: Path, epochs: int) -> None:
    """Keep the first `epochs` lines of metrics.jsonl (a line may have been written after the checkpoint)."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        if len(lines) > epochs:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(lines[:epochs]))
            os.replace(tmp, path)


@dataclass
class _Run:
    """One training run's state: what `_build` makes, `_start` or `_restore` sets, and the epochs add to."""

    cfg: Config  # resolved; init_gains from the data-driven init or the checkpoint
    run_dir: Path
    procs: Processes
    train_data: SpikeTimeDataset | EventDataset
    test_data: SpikeTimeDataset | EventDataset
    model: SNN
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    shuffle: torch.Generator  # the batch order of every epoch, one permutation each
    steps: list[dict] = field(default_factory=list)  # every step's record, the checkpoint's "steps"
    epochs: list[dict] = field(default_factory=list)  # every finished epoch's metrics.jsonl entry
    saved_epoch: int = 0  # epochs finished and in checkpoint.pt
    epoch: int = 0  # the epoch in progress, 0-based

    @property
    def device(self) -> torch.device:
        return self.procs.device

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"


def train(cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train, writing metrics.jsonl, summary.json, config.json, checkpoint.pt and training.png to `run_dir`.

    Under torchrun, every process trains on its slice of each batch and process 0 writes the files.
    Ctrl-C or SIGTERM mid-epoch leaves the checkpoint of the last finished epoch untouched and raises
    `Interrupted`; resuming from it repeats the interrupted epoch exactly as an uninterrupted run.
    """
    run = _build(cfg, run_dir)
    if resume:
        _restore(run)
    else:
        _start(run)
    trained = run.procs.wrap(run.model)  # after both: DDP starts every process from process 0's weights
    with _interruptible(run):
        for epoch in range(run.saved_epoch, run.cfg.epochs):
            run.epoch = epoch
            entry = _train_epoch(run, trained, progress)
            run.epochs.append(entry)
            _log_epoch(run, entry)
            _save_checkpoint(run)
    summary = _summary(run)
    _write_summary(run, summary)
    del trained  # DDP's reducer must not outlive the process group: see Processes.close
    run.procs.close()
    return summary


def _build(cfg: Config, run_dir: Path) -> _Run:
    """The run's parts: resolved config, process group and device, data, seeded model, Adam, schedule."""
    cfg = cfg.resolved()
    procs = Processes(cfg.device)
    train_data, test_data = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = SNN(train_data.inputs, train_data.classes, cfg).to(procs.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    total_steps = cfg.epochs * math.ceil(len(train_data) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.schedule, total_steps))
    return _Run(cfg, run_dir, procs, train_data, test_data, model, optimizer, scheduler,
                shuffle=torch.Generator().manual_seed(cfg.seed))


def _start(run: _Run) -> None:
    """A new run: the data-driven init (--init auto), the run folder with config.json, and under
    torchrun every process's own LocalZO stream."""
    cfg, procs = run.cfg, run.procs
    if cfg.init == "auto":  # gains measured on one batch (inference only: no RNG use)
        from .init import scale_to_activity

        first = torch.randperm(len(run.train_data), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.batch_size]
        cfg.init_gains = scale_to_activity(run.model.hidden, to_device(*run.train_data.batch(first), run.device)[0])
        if procs.main:
            print("init auto: hidden-layer gains " + ", ".join(f"{g:.3g}" for g in cfg.init_gains))
    if procs.main:
        run.run_dir.mkdir(parents=True, exist_ok=False)
        _write_json(asdict(cfg), run.run_dir / "config.json")
    if procs.world > 1:
        torch.manual_seed(cfg.seed + procs.rank)  # independent LocalZO draws in every process


def _restore(run: _Run) -> None:
    """Resume from checkpoint.pt: model, optimizer, schedule, logs and every process's RNG stream, the
    shuffles done replayed; metrics.jsonl cut back to the checkpoint. Refuses another configuration
    (but --epochs) or another number of processes."""
    cfg, procs, path = run.cfg, run.procs, run.checkpoint_path
    state = torch.load(path, weights_only=False, map_location=run.device)
    ignore = {"epochs", "init_gains"}  # a resumed run may go on longer; its gains are the checkpoint's
    # resolved again: a checkpoint from before an option existed holds that option's default
    saved = asdict(Config(**state["config"]).resolved())
    if {k: v for k, v in saved.items() if k not in ignore} != {k: v for k, v in asdict(cfg).items() if k not in ignore}:
        raise ValueError(f"{path} was written with another configuration; refusing to resume")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    cfg.init_gains = state["config"].get("init_gains")
    if len(state["rng"]) != procs.world:
        raise ValueError(f"{path} holds the RNG states of {len(state['rng'])} processes, "
                         f"this run has {procs.world}; resume with as many processes")
    set_rng_states(state["rng"][procs.rank], run.device)  # each process its own stream
    run.saved_epoch = run.epoch = state["epoch"]
    run.steps, run.epochs = state["steps"], state["epochs"]
    for _ in range(run.saved_epoch):
        torch.randperm(len(run.train_data), generator=run.shuffle)  # replay the shuffles already done
    if procs.main:
        _trim_metrics(run.run_dir / "metrics.jsonl", run.saved_epoch)
        print(f"resuming {run.run_dir} after epoch {run.saved_epoch}")


@dataclass
class _EpochTally:
    """One epoch's sums on this process: the steps' timings, and the loss and correct count of its samples."""

    started: float = field(default_factory=time.perf_counter)
    forward_s: list[float] = field(default_factory=list)
    backward_s: list[float] = field(default_factory=list)
    data_s: float = 0.0
    compare_s: float = 0.0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0


def _train_epoch(run: _Run, trained: nn.Module, progress: bool) -> dict:
    """Epoch `run.epoch`: a step per batch of its shuffle (process 0 draws the bar), then its metrics entry."""
    from tqdm import tqdm

    cfg, procs = run.cfg, run.procs
    tally = _EpochTally()
    batches = torch.randperm(len(run.train_data), generator=run.shuffle).split(cfg.batch_size)
    # disable=None: tqdm draws the bar only where stderr is a terminal (not into a log file)
    bar = tqdm(batches, desc=f"epoch {run.epoch + 1}/{cfg.epochs}", disable=None if progress and procs.main else True,
               leave=False)
    for index in bar:
        if index.numel() < procs.world:
            continue  # too few samples to give every process one
        record = _train_step(run, trained, index, tally)
        bar.set_postfix(loss=f"{record['loss']:.3f}", active=f"{100 * record['active_fraction'][-1]:.2f}%")
    return _epoch_entry(run, tally)


def _train_step(run: _Run, trained: nn.Module, index: torch.Tensor, tally: _EpochTally) -> dict:
    """One optimizer step on this process's share of the samples `index`, every --compare-every steps
    after timing the sparse against the dense path on its batch; returns its record, appended to run.steps."""
    cfg, procs, model = run.cfg, run.procs, run.model
    started = time.perf_counter()
    x, y = to_device(*run.train_data.batch(procs.shard(index)), run.device)
    tally.data_s += time.perf_counter() - started
    record = {"step": len(run.steps) + 1, "epoch": run.epoch + 1}
    if cfg.compare_every and len(run.steps) % cfg.compare_every == 0 and procs.world == 1:
        started = time.perf_counter()
        record.update(compare_paths(model, x, y, cfg, rng_states(run.device)))
        tally.compare_s += time.perf_counter() - started
    loss, logits, fwd, bwd = _timed_step(trained, x, y, cfg)
    run.optimizer.step()
    run.scheduler.step()
    tally.forward_s.append(fwd)
    tally.backward_s.append(bwd)
    loss_value = float(loss.detach())  # with the correct count, the step's two host reads
    tally.loss_sum += loss_value * len(y)
    tally.correct += int((logits.argmax(1) == y).sum())
    tally.seen += len(y)
    stats = [layer.stats for layer in model.hidden]
    dense_ops, sparse_ops = backward_synops(model)
    record.update(
        loss=loss_value,
        active_fraction=[s["active_fraction"] for s in stats],
        paths=[s["path"] for s in stats],
        forward_s=fwd,
        backward_s=bwd,
        backward_synops_saved=1.0 - sparse_ops / max(1, dense_ops),
    )
    run.steps.append(record)
    return record


def _epoch_entry(run: _Run, tally: _EpochTally) -> dict:
    """The epoch's metrics.jsonl entry: train loss and accuracy over every process's samples, the test
    set's, the mean activity, the summed timings and the median speedups of its compared steps."""
    loss_sum, correct, seen = run.procs.sum(tally.loss_sum, tally.correct, tally.seen)
    test_loss, test_acc = evaluate(run.model, run.test_data, run.cfg, run.device)
    epoch_steps = [s for s in run.steps if s["epoch"] == run.epoch + 1]
    return {
        "epoch": run.epoch + 1,
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "active_fraction": [statistics.mean(s["active_fraction"][i] for s in epoch_steps)
                            for i in range(len(run.cfg.hidden))],
        "forward_s": sum(tally.forward_s),
        "backward_s": sum(tally.backward_s),
        "data_s": tally.data_s,
        "compare_s": tally.compare_s,
        "wall_s": time.perf_counter() - tally.started,
        **{key: _median(s.get(key) for s in epoch_steps) for key in SPEEDUPS},
        "backward_synops_saved": statistics.mean(s["backward_synops_saved"] for s in epoch_steps),
    }


def _log_epoch(run: _Run, entry: dict) -> None:
    """Process 0 appends the epoch's entry to metrics.jsonl and prints its line."""
    if not run.procs.main:
        return
    with open(run.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    speed = "" if entry["backward_speedup"] is None else (
        f"  bwd x{entry['backward_speedup']:.1f}  all x{entry['overall_speedup']:.2f} (dense path)")
    if entry.get("bptt_backward_speedup") is not None:
        speed += f"  bwd x{entry['bptt_backward_speedup']:.1f}  all x{entry['bptt_overall_speedup']:.2f} (BPTT)"
    print(
        f"epoch {entry['epoch']:3d}  train {100 * entry['train_accuracy']:5.1f}%  "
        f"test {100 * entry['test_accuracy']:5.2f}%  loss {entry['train_loss']:.3f}  "
        f"active {' '.join(f'{100 * a:.2f}%' for a in entry['active_fraction'])}{speed}"
    )


def _save_checkpoint(run: _Run) -> None:
    """checkpoint.pt after epoch `run.epoch`: config, model, optimizer, schedule, logs and every
    process's RNG states (gathered in rank order), written by process 0 atomically."""
    states = run.procs.gather(rng_states(run.device))
    if run.procs.main:
        _atomic_save(
            {"config": asdict(run.cfg), "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(),
             "rng": states, "epoch": run.epoch + 1, "steps": run.steps, "epochs": run.epochs},
            run.checkpoint_path,
        )
    run.saved_epoch = run.epoch + 1


@contextlib.contextmanager
def _interruptible(run: _Run):
    """Ctrl-C, or SIGTERM raised like it in the main thread, becomes `Interrupted` (exit code 130 or
    143) naming the checkpoint that stands; the previous SIGTERM handler is put back."""
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except KeyboardInterrupt as err:
        code = 143 if isinstance(err, _Terminated) else 130
        if run.saved_epoch:
            message = (f"interrupted in epoch {run.epoch + 1}: the checkpoint of epoch {run.saved_epoch} stands in "
                       f"{run.checkpoint_path}; continue with: ztriton train --resume {run.run_dir}")
        else:
            message = f"interrupted in epoch {run.epoch + 1}, before any epoch finished: nothing to resume in {run.run_dir}"
        raise Interrupted(code, message) from None
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _summary(run: _Run) -> dict:
    """summary.json: the last and best test accuracy, the median speedups of the epochs, the last
    epoch's activity and savings, the run's wall time and the share of it the comparisons took."""
    epoch_log = run.epochs
    return {
        "dataset": run.cfg.dataset,
        "grad": run.cfg.grad,
        "epochs": len(epoch_log),
        "test_accuracy": epoch_log[-1]["test_accuracy"] if epoch_log else None,
        "best_test_accuracy": max(e["test_accuracy"] for e in epoch_log) if epoch_log else None,
        **{key: _median(e.get(key) for e in epoch_log) for key in SPEEDUPS},
        "active_fraction": epoch_log[-1]["active_fraction"] if epoch_log else None,
        "backward_synops_saved": epoch_log[-1]["backward_synops_saved"] if epoch_log else None,
        "wall_s": sum(e.get("wall_s", 0.0) for e in epoch_log),
        "compare_share": (sum(e.get("compare_s", 0.0) for e in epoch_log)
                          / max(1e-9, sum(e.get("wall_s", 0.0) for e in epoch_log))),
    }


def _write_summary(run: _Run, summary: dict) -> None:
    """Process 0 writes summary.json and, where any step ran, training.png."""
    if run.procs.main:
        _write_json(summary, run.run_dir / "summary.json")
        if run.steps:
            plot_run(run.run_dir, run.steps, run.epochs)


__all__ = ["Config", "Interrupted", "SNN", "train", "load_model", "DataError", "PRESETS"]
