"""Benchmark: ufm.nc_metrics against the textbook p x p computation, and against one pass over the data.

For each (n, p, C) it times, in one process on the same features:

* one pass   ``features @ A`` with A (p, C): the floor for anything that reads the features;
* library    ``ufm.nc_metrics(features, labels, W, b)``: all of NC1-NC4, NC2 of W, SQI, ranks;
* naive      the textbook NC1 alone: class means, Sigma_W and Sigma_B as p x p matrices, ``pinv``
             (NumPy on CPU, torch on a GPU) with its default cutoff, in the features' dtype.

Targets (issue 3): library >= 10x faster than naive, library <= 3x one pass. It also prints both NC1
values (the naive one shows the pseudo-inverse trap of docs/theory.md §17.2 on float32 features) and the peak
memory of the streaming accumulator for two n, which should not grow with n.

Usage: python benchmarks/bench_metrics.py [--device cpu|cuda] [--quick] [--dtype float32|float64]
                                          [--threads N]
On a shared machine use --threads 1: oversubscribed BLAS and OpenMP threads slow the small SVDs and
the matmuls by unpredictable factors, which makes the ratios meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# Thread counts must be fixed before NumPy's and torch's BLAS start their pools.
if "--threads" in sys.argv:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = sys.argv[sys.argv.index("--threads") + 1]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ufm import NCAccumulator, nc_metrics  # noqa: E402

FULL_SIZES = [(50_000, 512, 10), (50_000, 2048, 100)]
QUICK_SIZES = [(10_000, 256, 10), (10_000, 1024, 50)]
STREAM_BATCH = 4096


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, device: str, repeats: int) -> tuple[float, object]:
    best, out = np.inf, None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def _problem(n: int, p: int, C: int, dtype: str, device: str, seed: int = 0):
    """Weakly separated Gaussian classes with an offset (post-ReLU-like), a random classifier."""
    g = torch.Generator(device=device).manual_seed(seed)
    tdt = getattr(torch, dtype)
    y = torch.arange(n, device=device) % C
    means = 0.1 * torch.randn(C, p, generator=g, device=device, dtype=tdt)
    H = torch.randn(n, p, generator=g, device=device, dtype=tdt) + means[y] + 1.0  # (n, p)
    W = torch.randn(C, p, generator=g, device=device, dtype=torch.float64)
    b = torch.randn(C, generator=g, device=device, dtype=torch.float64)
    return H, y, W, b


def _naive_nc1(H, y, C: int):
    """Textbook NC1 in the features' dtype: p x p Sigma_W and Sigma_B, default pseudo-inverse."""
    if isinstance(H, np.ndarray):
        Y = np.eye(C, dtype=H.dtype)[y]  # (n, C) one-hot
        mu = (Y.T @ H) / Y.sum(axis=0)[:, None]
        D = H - mu[y]
        Sigma_W = D.T @ D / len(y)
        M = mu - H.mean(axis=0)
        Sigma_B = M.T @ M / C
        return float(np.trace(Sigma_W @ np.linalg.pinv(Sigma_B)) / C)
    Y = torch.nn.functional.one_hot(y, C).to(H.dtype)
    mu = (Y.T @ H) / Y.sum(dim=0)[:, None]
    D = H - mu[y]
    Sigma_W = D.T @ D / len(y)
    M = mu - H.mean(dim=0)
    Sigma_B = M.T @ M / C
    return float(torch.trace(Sigma_W @ torch.linalg.pinv(Sigma_B)) / C)


def _stream_peak(n: int, p: int, C: int, dtype: str, device: str) -> str:
    """Peak memory of streaming n examples in batches generated on the fly, as text."""
    if device == "cpu":
        # Torch allocations bypass tracemalloc: measure the peak RSS of a fresh child process instead.
        cmd = [sys.executable, __file__, "--_stream-child", json.dumps([n, p, C, dtype])]
        total, growth = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-2:]
        return f"peak RSS {float(total):.0f} MiB (+{float(growth):.1f} MiB over the RSS before streaming)"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _stream(n, p, C, dtype, device)
    return f"peak CUDA allocation {(torch.cuda.max_memory_allocated() - base) / 2**20:.1f} MiB"


def _stream(n: int, p: int, C: int, dtype: str, device: str) -> None:
    acc = NCAccumulator(C, W=torch.randn(C, p, dtype=torch.float64))
    for _ in range(2):
        for start in range(0, n, STREAM_BATCH):
            # Regenerated each pass from the same seed, so both passes see the same examples.
            H, y, _, _ = _problem(min(STREAM_BATCH, n - start), p, C, dtype, device, seed=start)
            acc.update(H, y)
        if acc.pass_number == 1:
            acc.end_first_pass()
    acc.result()


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(row for row in f if row.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def _stream_child(spec: str) -> None:
    n, p, C, dtype = json.loads(spec)
    _stream(STREAM_BATCH, p, C, dtype, "cpu")  # warm up allocator and BLAS buffers
    # Reset the peak-RSS mark (Linux clear_refs "5"); ru_maxrss would also carry the parent's peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mib("VmRSS")
    _stream(n, p, C, dtype, "cpu")
    peak = _status_mib("VmHWM")
    print(peak, peak - before)


def _row(n: int, p: int, C: int, dtype: str, device: str, repeats: int) -> None:
    H, y, W, b = _problem(n, p, C, dtype, device)
    A = torch.randn(p, C, device=device, dtype=H.dtype)
    if device == "cpu":
        H, y, W, b, A = (t.numpy() for t in (H, y, W, b, A))  # the NumPy path users call on CPU
    t_pass, _ = _best_time(lambda: H @ A, device, repeats)
    t_lib, m = _best_time(lambda: nc_metrics(H, y, W, b), device, repeats)
    t_naive, nc1_naive = _best_time(lambda: _naive_nc1(H, y, C), device, 1)
    print(
        f"{n:>7} {p:>5} {C:>4} | {t_pass:>10.4f} {t_lib:>9.4f} {t_naive:>8.3f} |"
        f" {t_lib / t_pass:>8.2f} {t_naive / t_lib:>9.1f} | {m.nc1:>12.6g} {nc1_naive:>12.4g}"
    )


def run(device: str, sizes, dtype: str, repeats: int) -> None:
    print(f"# ufm.nc_metrics benchmark on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}),"
          f" features {dtype}, torch {torch.__version__}, {torch.get_num_threads()} torch threads")  # fmt: skip
    header = (
        f"{'n':>7} {'p':>5} {'C':>4} | {'one pass s':>10} {'library s':>9} {'naive s':>8} |"
        f" {'lib/pass':>8} {'naive/lib':>9} | {'NC1 library':>12} {'NC1 naive':>12}"
    )
    print(header)
    print("-" * len(header))
    for n, p, C in sizes:
        _row(n, p, C, dtype, device, repeats)
    n0, p0, C0 = sizes[-1]
    peaks = [(n, _stream_peak(n, p0, C0, dtype, device)) for n in (n0, 4 * n0)]
    text = "; ".join(f"n = {n}: {peak}" for n, peak in peaks)
    print(f"streaming peak memory (p = {p0}, C = {C0}, batches of {STREAM_BATCH}): {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes for a fast check")
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"),
                        help="feature dtype (networks emit float32; the library computes in float64)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (naive: one run)")
    parser.add_argument("--threads", type=int, help="BLAS/OpenMP threads (default: the libraries' own)")
    parser.add_argument("--_stream-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._stream_child:
        _stream_child(args._stream_child)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    run(args.device, QUICK_SIZES if args.quick else FULL_SIZES, args.dtype, args.repeats)


if __name__ == "__main__":
    main()
