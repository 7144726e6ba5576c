"""Share of an epoch spent building and moving batches, at SHD's event density (no SHD file needed).

A synthetic EventDataset like SHD (700 units, T 500 bins, about 8,000 (bin, unit) events per
sample, 20 classes) feeds the training application's SHD network (700-200-200-20, LocalZO, batch
128); batch building (`data_s`, as in metrics.jsonl) and forward + backward + optimizer step are
timed separately over one epoch, after one untimed warm-up batch and step. `--gain` scales the hidden weights so the layers fire as in a
trained network (at the paper's init they are silent, which makes compute unrealistically cheap).

    python bench/bench_data.py              # 768 samples, 6 batches (about 10 s on 2 cores)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from ztriton.data import EventDataset
from ztriton.train import SNN, Config, spike_regulariser, to_device


def synthetic_shd(samples: int, events: int, seed: int) -> EventDataset:
    rng = np.random.default_rng(seed)
    bins, units, offsets = [], [], [0]
    for _ in range(samples):
        pairs = np.unique(rng.integers(0, 500, events) * 1000 + rng.integers(0, 700, events))
        bins.append((pairs // 1000).astype(np.int16))
        units.append((pairs % 1000).astype(np.int16))
        offsets.append(offsets[-1] + pairs.size)
    return EventDataset(np.concatenate(bins), np.concatenate(units), np.asarray(offsets),
                        rng.integers(0, 20, samples), 500, 700, 20)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=768)
    parser.add_argument("--events", type=int, default=8000, help="events drawn per sample (before de-duplication)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--gain", type=float, default=4.0, help="scale of the hidden weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = synthetic_shd(args.samples, args.events, args.seed)
    cfg = Config(dataset="shd", batch_size=args.batch_size).resolved()
    torch.manual_seed(args.seed)
    model = SNN(data.inputs, data.classes, cfg)
    with torch.no_grad():
        for layer in model.hidden:
            layer.weight.mul_(args.gain)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    warm_x, warm_y = data.batch(torch.arange(args.batch_size))  # one-time costs (allocation, compilation)
    spike_regulariser(model(warm_x)[1], cfg).backward()
    data_s = compute_s = 0.0
    batches = batch_events = 0
    for index in torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)).split(args.batch_size):
        start = time.perf_counter()
        x, y = to_device(*data.batch(index), torch.device("cpu"))
        middle = time.perf_counter()
        optimizer.zero_grad()
        logits, spikes = model(x)
        (nn.functional.cross_entropy(logits, y) + spike_regulariser(spikes, cfg)).backward()
        optimizer.step()
        data_s += middle - start
        compute_s += time.perf_counter() - middle
        batches, batch_events = batches + 1, batch_events + x._nnz()
    events = data.offsets[-1] / len(data)
    print(f"{len(data)} samples, {events:.0f} events per sample ({100 * events / (500 * 700):.2f} % of the grid), "
          f"batch {args.batch_size}, active "
          + ", ".join(f"{100 * layer.stats['active_fraction']:.2f} %" for layer in model.hidden))
    print(f"data_s {data_s:.2f} s, compute {compute_s:.2f} s, data share {100 * data_s / (data_s + compute_s):.1f} %; "
          f"{1000 * data_s / batches:.1f} ms per batch of {batch_events / batches / 1e6:.2f} M events on average")


if __name__ == "__main__":
    main()
