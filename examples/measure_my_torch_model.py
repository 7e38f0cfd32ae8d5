"""Measure neural collapse in a torch model of your own, at any layer.

    python examples/measure_my_torch_model.py [--quick]

A small MLP with a bias-carrying classifier, trained with cross-entropy and weight decay on Gaussian
clusters; then ``ufm.model_nc_metrics`` measures it through a forward hook, without changing the
model: at the penultimate features (the classifier's input, so NC3 and the W measures exist too) and
at the first hidden layer, whose width differs from the classifier's, so the W-dependent measures are
None there (NC4 then compares the model's own decisions with the nearest class mean). Any ``nn.Module`` and any loader of
``(inputs, labels)`` batches work the same way; ``layer=`` takes the names of
``model.named_modules()``. ``--quick`` (the test suite's mode) trains for fewer epochs.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ufm

C, D, PER_CLASS = 4, 10, 50


def clusters(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(C, D, generator=g)
    y = torch.arange(C).repeat_interleave(PER_CLASS)
    return TensorDataset(centres[y] + torch.randn(C * PER_CLASS, D, generator=g), y)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 epochs instead of 300, as in the test suite")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, C))
    data = clusters()
    train = DataLoader(data, batch_size=25, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    for _ in range(10 if args.quick else 300):
        for x, y in train:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    measure = DataLoader(data, batch_size=100, shuffle=False)  # the same examples in both passes
    penultimate = ufm.model_nc_metrics(model, measure)  # the input of the last nn.Linear, with its W, b
    hidden = ufm.model_nc_metrics(model, measure, layer="1", capture="output")  # after the first ReLU
    print(f"{'measure':<16} {'penultimate (16)':>17} {'first hidden (32)':>18}")
    # eps (1 - the mean correct-class output) is a square-loss quantity; logits of cross-entropy have no such scale.
    for key in ("nc1", "nc2_equinorm", "nc2_maxangle", "nc3", "nc4"):
        a, b = getattr(penultimate, key), getattr(hidden, key)
        show = lambda v: "-" if v is None else f"{v:.4g}"
        print(f"{key:<16} {show(a):>17} {show(b):>18}")


if __name__ == "__main__":
    main()
