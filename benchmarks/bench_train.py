"""Benchmark: ``ufm train`` against a bare PyTorch loop of the same SGD steps without any measurement.

The bare loop (``_bare_loop`` below, written out here): the same network, data, mini-batch order,
square loss, weight decay added to the gradient and SGD with momentum and the step schedule, and
nothing else: no measurement, no checkpoint, no history. The floor row is the bare loop plus, after
every epoch, the two forward passes that any measurement needs (the training set's, which gives the
outputs and the features, and the test set's), under ``no_grad`` and nothing done with them: no
``ufm train`` measuring every epoch can cost less. ``ufm.train`` runs the same steps as
``ufm train --out DIR`` does (history.csv after every measurement, a checkpoint every 10 epochs,
final.json) and measures every K epochs (``measure_every``; the SVD-based ranks every ``svd_every``
measured epochs; ``svd_layers`` the layers whose singular values are taken). Targets (issue 19):
measuring every epoch within 1.5x of the bare loop, every 10th within 1.1x.

With torch on one thread and a second core free, ``train`` measures on a copy of the network on a
second thread while the next epoch trains (docs/theory.md §18); the "in line" row measures between
the epochs, as it does with more torch threads (``ufm train`` from the shell runs torch on every
core unless ``OMP_NUM_THREADS=1``). The two write the same rows: the overlap lowers the wall time,
not the CPU time.

One warm-up round is run and discarded (first calls pay for torch's lazy initialization). Then each
round times the bare loop and every configuration once, interleaved; the table shows the best-of ratio
min(train) / min(bare) of wall times, the per-round ratios (median, min..max: the spread on a busy
machine), and the best-of ratio of the process's CPU time (all its threads: a spinning pool counts),
which waiting for a shared CPU does not inflate.
Torch runs on ``--threads`` threads (default 1: on a shared CPU more threads only add spinning).

Usage: python benchmarks/bench_train.py [--epochs 50] [--rounds 5] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from unittest import mock

import torch

from ufm import training
from ufm.datasets import load_dataset
from ufm.networks import build_network
from ufm.training import SCHEDULES, TrainConfig, train


def _bare_loop(
    config: TrainConfig, data, device: torch.device, forwards: bool = False
) -> tuple[float, float]:
    """The steps of ``train`` with nothing else (``forwards``: and the measurement's forward passes
    after every epoch); returns the wall and CPU times."""
    t0, c0 = time.perf_counter(), time.process_time()
    x = torch.from_numpy(data.x_train).to(device)
    y = torch.from_numpy(data.y_train).to(device)
    x_test = torch.from_numpy(data.x_test).to(device)
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
        if forwards:
            with torch.no_grad():
                model(x)
                model(x_test)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def _train(config: TrainConfig, data, in_line: bool = False) -> tuple[float, float]:
    """``ufm train --out DIR`` of ``config`` into a fresh directory (``in_line``: measuring between
    the epochs even where it could run beside them); returns the wall and CPU times."""
    policy = (
        mock.patch.object(training, "_overlap_possible", lambda: False)
        if in_line
        else contextlib.nullcontext()
    )
    with tempfile.TemporaryDirectory() as out, policy:
        t0, c0 = time.perf_counter(), time.process_time()
        train(config, out=out, dataset=data, progress=False)
        return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = TrainConfig(epochs=args.epochs, device=args.device)
    data = load_dataset(base.dataset, per_class=base.per_class, test_per_class=base.test_per_class)
    device = torch.device(args.device)
    runs = {  # name: (configuration, measuring in line)
        "measure every epoch": (dict(measure_every=1), False),
        "measure every epoch, in line": (dict(measure_every=1), True),
        "measure every epoch, SVD every 10th": (dict(measure_every=1, svd_every=10), False),
        "measure every epoch, SVD of W_L only": (dict(measure_every=1, svd_layers="last"), False),
        "measure every 10th epoch": (dict(measure_every=10), False),
    }
    configs = {name: (TrainConfig(**(base.as_dict() | kw)), in_line) for name, (kw, in_line) in runs.items()}
    warm = TrainConfig(**(base.as_dict() | dict(epochs=3)))
    _bare_loop(warm, data, device), _train(warm, data)
    bare: list[tuple[float, float]] = []  # (wall, CPU) per round
    floor = "floor: bare loop + forwards every epoch"
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in [floor, *runs]}
    for _ in range(args.rounds):
        bare.append(_bare_loop(base, data, device))
        times[floor].append(_bare_loop(base, data, device, forwards=True))
        for name, (config, in_line) in configs.items():
            times[name].append(_train(config, data, in_line))
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"# ufm train --out DIR vs a bare loop: {args.epochs} epochs of {base.per_class} x {data.C} "
        f"examples, batch {base.batch_size}, {base.depth} x {base.width} {base.arch}, {args.device}, "
        f"{torch.get_num_threads()} torch thread(s), {args.rounds} rounds; bare loop "
        f"{min(b[0] for b in bare):.2f}..{max(b[0] for b in bare):.2f} s; load average {load}"
    )
    print(f"{'run':<40} {'best-of':>8} {'per round: median':>18}   min..max   {'CPU time, best-of':>17}")
    for name, ts in times.items():
        per_round = sorted(t[0] / b[0] for t, b in zip(ts, bare))
        median = per_round[len(per_round) // 2]
        best = min(t[0] for t in ts) / min(b[0] for b in bare)
        cpu = min(t[1] for t in ts) / min(b[1] for b in bare)
        spread = f"{per_round[0]:.2f}..{per_round[-1]:.2f}"
        print(f"{name:<40} {best:>8.2f} {median:>18.2f}   {spread}   {cpu:>17.2f}")


if __name__ == "__main__":
    main()
