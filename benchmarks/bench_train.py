"""Benchmark: ``ufm.train`` against a bare PyTorch loop of the same SGD steps without any measurement.

The bare loop (``_bare_loop`` below, written out here): the same network, data, mini-batch order,
square loss, weight decay added to the gradient and SGD with momentum and the step schedule, and
nothing else: no measurement, no checkpoint, no history. ``ufm.train`` runs the same steps and
measures every K epochs (``measure_every``; the SVD-based ranks every ``svd_every`` measured epochs).
Targets (issue 19): measuring every epoch within 1.5x of the bare loop, every 10th within 1.1x.

Each configuration is timed ``--repeats`` times, interleaved with the bare loop; the table shows the
ratios to the bare loop of the same round (min..max over the rounds: the spread on a busy machine).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_train.py [--epochs 20] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from ufm.datasets import load_dataset
from ufm.networks import build_network
from ufm.training import SCHEDULES, TrainConfig, train


def _bare_loop(config: TrainConfig, data, device: torch.device) -> float:
    """The steps of ``train`` with nothing else; returns the wall time."""
    t0 = time.perf_counter()
    x = torch.from_numpy(data.x_train).to(device)
    y = torch.from_numpy(data.y_train).to(device)
    model = build_network(
        config.arch, data.input_shape, data.C, depth=config.depth, width=config.width, seed=config.seed
    ).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    sched = SCHEDULES[config.schedule](opt, config.epochs)
    shuffle = torch.Generator().manual_seed(config.seed)
    loss, n = config.data_loss, y.shape[0]
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=shuffle).to(device)
        for i in range(0, n - config.batch_size + 1, config.batch_size):
            idx = order[i : i + config.batch_size]
            value = loss.torch_value(model(x[idx]), y[idx], data.C)
            opt.zero_grad(set_to_none=True)
            value.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.grad.add_(p, alpha=config.wd)
            opt.step()
        sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    base = TrainConfig(epochs=args.epochs, device=args.device)
    data = load_dataset(base.dataset, per_class=base.per_class, test_per_class=base.test_per_class)
    device = torch.device(args.device)
    runs = {
        "train, measure every epoch": dict(measure_every=1),
        "train, measure every epoch, SVD every 10th": dict(measure_every=1, svd_every=10),
        "train, measure every 10th epoch": dict(measure_every=10),
    }
    ratios: dict[str, list[float]] = {name: [] for name in runs}
    bare_times = []
    for _ in range(args.repeats):
        bare = _bare_loop(base, data, device)
        bare_times.append(bare)
        for name, kw in runs.items():
            config = TrainConfig(**(base.as_dict() | kw))
            t0 = time.perf_counter()
            train(config, dataset=data, progress=False)
            ratios[name].append((time.perf_counter() - t0) / bare)
    print(f"# ufm train vs a bare loop: {args.epochs} epochs of {base.per_class} x {data.C} examples, "
          f"batch {base.batch_size}, {base.depth} x {base.width} {base.arch}, {args.device}, "
          f"{torch.get_num_threads()} torch threads; bare loop {min(bare_times):.2f}..{max(bare_times):.2f} s")  # fmt: skip
    print(f"{'run':<46} {'x bare (median)':>15}   min..max over {args.repeats} rounds")
    for name, rs in ratios.items():
        rs = sorted(rs)
        print(f"{name:<46} {rs[len(rs) // 2]:>15.2f}   {rs[0]:.2f}..{rs[-1]:.2f}")


if __name__ == "__main__":
    main()
