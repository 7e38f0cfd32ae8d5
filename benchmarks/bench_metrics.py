"""Benchmark: ufm.nc_metrics against the textbook p x p computation, and against one pass over the data.

For each (n, p, C) it times, in one process on the same features:

* one pass   ``features @ A`` with A (p, C), in NumPy and in torch: the floor for anything that reads
             the features (the issue's baseline);
* one wide   ``features @ A2`` with A2 (p, r + C) = (p, 2C - 1), the width of the product the metrics
  product    make (the basis of span(M) and W), in torch the faster of the layouts X A2 and
             (A2^T X^T)^T. At p = 2048, C = 100 the product is compute-bound and costs about 2 passes of
             width C, which the ratio to one pass counts against the library;
* library    ``ufm.nc_metrics(features, labels, W, b)`` on the NumPy array and on the torch tensor:
             all of NC1-NC4, NC2 of W, SQI, ranks;
* peer       the peer library's method for NC1 alone (Wu and Papyan's [WP24], docs/theory.md §17.7; written
             out in ``_peer_nc1``): accumulate the class means, then the p x p within-class scatter
             batch by batch, and pseudo-invert the p x p Sigma_B, in torch in the features' dtype.

One table per dtype, ratios to the one pass of the same library (NumPy or torch); the float32 table
adds the largest relative difference of any measure from float64 on the same values. Targets (issue
19): float32 within 3x of a float32 pass, float64 within 2.5x of a float64 pass; every float32 measure
within 1e-5 of float64. Each table is printed ``--rounds`` times (spread on a busy machine). It also
prints the streaming accumulator's peak memory for two n, which should not grow with n.

Usage: python benchmarks/bench_metrics.py [--device cpu|cuda] [--quick] [--dtype float32|float64]
                                          [--threads N] [--pools]
``--pools`` times nc_metrics right after a NumPy matmul, a torch matmul or a pause instead (run it
with the default threads: it measures whether one library's spinning pool slows the other).
With the default threads it measures what users get: the one passes on the libraries' own pools, the
metrics in row parts on torch's thread count (docs/theory.md §17.10), the NumPy features' metrics
timed after torch's work rather than right after NumPy's products (``--pools`` has that case).
``--threads 1`` puts everything on one thread, whose ratios are steadier on a busy shared machine.
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

from ufm import NCAccumulator, _layouts, nc_metrics  # noqa: E402

FULL_SIZES = [(50_000, 512, 10), (50_000, 2048, 100), (200_000, 512, 10)]
QUICK_SIZES = [(10_000, 256, 10), (10_000, 1024, 50)]
PEER_BATCH = 4096
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


def _peer_nc1(H: torch.Tensor, y: torch.Tensor, C: int) -> float:
    """The peer library's NC1, in H's dtype: pass 1 accumulates class sums, pass 2 the p x p
    within-class scatter sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T batch by batch; then
    Tr(Sigma_W pinv(Sigma_B)) / C with torch's default pseudo-inverse cutoff."""
    n, p = H.shape
    sums = torch.zeros(C, p, dtype=H.dtype, device=H.device)
    for i in range(0, n, PEER_BATCH):
        sums.index_add_(0, y[i : i + PEER_BATCH], H[i : i + PEER_BATCH])
    mu = sums / torch.bincount(y, minlength=C).to(H.dtype)[:, None]
    scatter = torch.zeros(p, p, dtype=H.dtype, device=H.device)
    for i in range(0, n, PEER_BATCH):
        D = H[i : i + PEER_BATCH] - mu[y[i : i + PEER_BATCH]]
        scatter += D.T @ D
    M = mu - sums.sum(0) / n
    Sigma_B = M.T @ M / C
    return float(torch.trace(scatter / n @ torch.linalg.pinv(Sigma_B)) / C)


def _max_rel_diff(a, b) -> float:
    """Largest relative difference of any scalar measure of two NCMetrics."""
    worst = 0.0
    for key, x in a.as_dict().items():
        z = b.as_dict()[key]
        if isinstance(x, float) and isinstance(z, float) and z != 0:
            worst = max(worst, abs(x / z - 1))
    return worst


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
    Ht, yt, Wt, bt = _problem(n, p, C, dtype, device)
    At = torch.randn(p, C, device=device, dtype=Ht.dtype)
    t = {}
    # The product the metrics make: width r + C = 2C - 1 (the classes here have full-rank means), in
    # torch's faster layout for skinny products, (A'^T X^T)^T (the one ufm uses), or X A'.
    At2 = torch.randn(p, 2 * C - 1, device=device, dtype=Ht.dtype)
    At2_t = At2.T.contiguous()
    if device == "cpu":
        H, y, W, b, A, A2 = (x.numpy() for x in (Ht, yt, Wt, bt, At, At2))  # the NumPy path users call on CPU
        t["pass numpy"], _ = _best_time(lambda: H @ A, device, repeats)
        t["wide numpy"], _ = _best_time(lambda: H @ A2, device, repeats)
    t["pass torch"], _ = _best_time(lambda: Ht @ At, device, repeats)
    t["wide torch"] = min(
        _best_time(lambda: Ht @ At2, device, repeats)[0],
        _best_time(lambda: (At2_t @ Ht.T).T, device, repeats)[0],
    )
    t["lib torch"], m_torch = _best_time(lambda: nc_metrics(Ht, yt, Wt, bt), device, repeats)
    t["peer"], nc1_peer = _best_time(lambda: _peer_nc1(Ht, yt, C), device, 1)
    if device == "cpu":
        # Not right after NumPy's products: their BLAS threads spin for ~0.1 s after each call and take
        # a core from the metrics' row parts. That case, slower than before the parts, is --pools'.
        t["lib numpy"], _ = _best_time(lambda: nc_metrics(H, y, W, b), device, repeats)
    else:
        t["pass numpy"] = t["wide numpy"] = t["lib numpy"] = float("nan")
    diff = ""
    if dtype == "float32":
        ref = nc_metrics(Ht.double(), yt, Wt, bt)
        diff = f" {_max_rel_diff(m_torch, ref):>9.1e}"
    print(
        f"{n:>7} {p:>5} {C:>4} | {t['pass numpy']:>8.4f} {t['pass torch']:>8.4f} |"
        f" {t['lib numpy'] / t['pass numpy']:>8.2f} {t['lib torch'] / t['pass torch']:>8.2f}"
        f" {t['peer'] / t['pass torch']:>8.2f} {t['peer'] / t['lib torch']:>8.1f} |"
        f" {t['lib numpy'] / t['wide numpy']:>8.2f} {t['lib torch'] / t['wide torch']:>8.2f} |"
        f" {m_torch.nc1:>10.6g} {nc1_peer:>10.4g}{diff}",
        flush=True,
    )


def run(device: str, sizes, dtype: str, repeats: int) -> None:
    print(f"# ufm.nc_metrics benchmark on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}),"
          f" features {dtype}, torch {torch.__version__}, {torch.get_num_threads()} torch threads")  # fmt: skip
    header = (
        f"{'n':>7} {'p':>5} {'C':>4} | {'pass np s':>8} {'pass t s':>8} |"
        f" {'lib np':>8} {'lib t':>8} {'peer':>8} {'peer/lib':>8} | {'lib np2':>8} {'lib t2':>8} |"
        f" {'NC1 lib':>10} {'NC1 peer':>10}" + (f" {'max rel':>9}" if dtype == "float32" else "")
    )
    print(
        "# lib np, lib t, peer: x one pass X @ A, A (p, C), of the same library (NumPy, torch; peer: torch)"
    )
    print("# lib np2, lib t2: x one product of the width the metrics need, X @ A2 with A2 (p, r + C) = (p, 2C - 1)"
          " (torch: the faster of X A2 and (A2^T X^T)^T)")  # fmt: skip
    if dtype == "float32":
        print("# max rel: largest relative difference of any measure from float64 on the same values")
    print(header)
    print("-" * len(header))
    for n, p, C in sizes:
        _row(n, p, C, dtype, device, repeats)
    chosen = ", ".join(f"{dt} p={p} k={k}: {name}" for (dt, p, k, _), name in _layouts.chosen().items())
    print(f"# pass 2's product layouts this process chose (ufm._layouts): {chosen or 'none timed'}")


def stream_memory(device: str, sizes, dtype: str) -> None:
    n0, p0, C0 = sizes[-1]
    peaks = [(n, _stream_peak(n, p0, C0, dtype, device)) for n in (n0, 4 * n0)]
    text = "; ".join(f"n = {n}: {peak}" for n, peak in peaks)
    print(f"streaming peak memory (p = {p0}, C = {C0}, batches of {STREAM_BATCH}): {text}")


def pools(dtype: str, rounds: int) -> None:
    """nc_metrics at (50k, 512, 10) right after a NumPy matmul, a torch matmul, or a pause: whether one
    library's thread pool, still spinning, slows the other's work (issue 19: 141 ms against 83 ms)."""
    n, p, C = FULL_SIZES[0]
    Ht, yt, Wt, bt = _problem(n, p, C, dtype, "cpu")
    inputs = {"NumPy": (Ht.numpy(), yt.numpy()), "torch": (Ht, yt)}
    B = torch.randn(2048, 2048, dtype=torch.float64)
    Bn = B.numpy()
    before = {
        "NumPy matmul": lambda: Bn @ Bn,
        "torch matmul": lambda: B @ B,
        "0.5 s pause": lambda: time.sleep(0.5),
    }
    times: dict[tuple[str, str], list[float]] = {(k, i): [] for i in inputs for k in before}
    for _ in range(rounds):  # interleaved, so a change in load hits every case alike
        for (k, i), seen in times.items():
            before[k]()
            t0 = time.perf_counter()
            nc_metrics(*inputs[i], Wt, bt)
            seen.append(time.perf_counter() - t0)
    print(f"# nc_metrics on {dtype} features ({n}, {p}, {C}) right after ..., {torch.get_num_threads()} torch threads,"
          f" {rounds} rounds, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for (k, i), seen in times.items():
        ms = 1e3 * np.array(seen)
        print(f"{i:>6} features after a {k:<13}: best {ms.min():7.1f} ms, median {np.median(ms):7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes for a fast check")
    parser.add_argument("--dtype", choices=("float32", "float64"),
                        help="feature dtype (default: both tables; networks emit float32)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="print each table this many times")
    parser.add_argument("--memory", action="store_true", help="also the streaming peak memory")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (naive: one run)")
    parser.add_argument("--threads", type=int, help="BLAS/OpenMP threads (default: the libraries' own)")
    parser.add_argument(
        "--pools", action="store_true", help="only the thread-pool interplay (default threads)"
    )
    parser.add_argument("--_stream-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._stream_child:
        _stream_child(args._stream_child)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.pools:
        for dtype in [args.dtype] if args.dtype else ["float64", "float32"]:
            pools(dtype, 3 * args.rounds)
        return
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    for dtype in [args.dtype] if args.dtype else ["float64", "float32"]:
        for _ in range(args.rounds):
            run(args.device, sizes, dtype, args.repeats)
        if args.memory:
            stream_memory(args.device, sizes, dtype)


if __name__ == "__main__":
    main()
