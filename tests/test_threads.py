"""Row parts side by side (ufm._threads): the split covers the rows in whole blocks, the parts' results
come back in order with their exceptions, each part runs on one torch thread, a forked child gets a
pool of its own, and nc_metrics gives the same answer on one thread as in parts. And the flows' axpy
(ufm._blocks.add_scaled) never wakes SciPy's BLAS pool beside NumPy's, and L-BFGS-B runs SciPy's BLAS
on one thread (ufm._threads.scipy_blas_on_one_thread)."""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from ufm import NCAccumulator, UFMProblem, _blocks, _threads, nc_metrics, optimize


@pytest.mark.parametrize(
    ("n", "block", "parts"), [(0, 4, 2), (3, 4, 2), (8, 4, 2), (9, 4, 2), (100, 7, 3), (5, 1, 8)]
)
def test_row_parts_cover_the_rows_in_whole_blocks(n, block, parts):
    """The slices are contiguous, cover [0, n) once, start on block boundaries, number
    min(parts, blocks) (one at least), and differ by at most one block in length."""
    got = _threads.row_parts(n, block, parts)
    blocks = -(-n // block)
    assert len(got) == max(1, min(parts, blocks))
    assert got[0].start == 0 and got[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(got, got[1:]))
    assert all(s.start % block == 0 for s in got)
    lengths = [-(-(s.stop - s.start) // block) for s in got]  # in blocks
    assert max(lengths) - min(lengths) <= 1


def test_side_by_side_returns_in_order_and_runs_the_parts_on_other_threads():
    parts = _threads.row_parts(40, 10, 4)
    seen = {}

    def work(part, i):
        seen[i] = (threading.get_ident(), torch.get_num_threads())
        return part.start

    with _threads.one_torch_thread():
        assert _threads.side_by_side(work, parts) == [0, 10, 20, 30]
    assert seen[0][0] == threading.get_ident()  # the first part on the calling thread
    assert all(seen[i][1] == 1 for i in seen)  # every part on one torch thread


def test_side_by_side_raises_a_parts_exception():
    def work(part, i):
        if i == 1:
            raise ValueError(f"part {i} failed")
        return i

    with pytest.raises(ValueError, match="part 1 failed"):
        _threads.side_by_side(work, _threads.row_parts(20, 10, 2))


def _child_metrics(queue):
    rng = np.random.default_rng(0)
    H = rng.standard_normal((40_000, 64)) + rng.standard_normal((4, 64))[np.arange(40_000) % 4]
    queue.put(nc_metrics(H, np.arange(40_000) % 4).nc1)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_measures_with_a_pool_of_its_own():
    """After the parent has used its pool, a forked child (which has none of the parent's threads)
    still measures, with the parent's answer, instead of waiting for threads that do not exist."""
    _threads.side_by_side(lambda part, i: i, _threads.row_parts(20, 10, 2))  # the parent's pool exists
    rng = np.random.default_rng(0)
    H = rng.standard_normal((40_000, 64)) + rng.standard_normal((4, 64))[np.arange(40_000) % 4]
    expected = nc_metrics(H, np.arange(40_000) % 4).nc1
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_metrics, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child's nc_metrics did not finish in 60 s")
    assert queue.get(timeout=5) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("stats_in_parts", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_nc_metrics_in_parts_equals_one_thread(monkeypatch, dtype, stats_in_parts):
    """nc_metrics with the batch rows split over 3 parts and on one thread: every measure agrees to
    float64 summation order (1e-12 relative), float32 products too since each product entry is one
    block's own dot product whichever part computes it (the C-th singular value of the centred means,
    rounding noise, within 1e-12 of the largest); NC4 and the ranks exactly; NC1 also against the
    p x p formula in NumPy float64. Pass 2's statistics (with the outputs' moments) summed in the
    parts and merged, or summed over the whole batch after the product."""
    rng = np.random.default_rng(5)
    n, p, C = 3 * 2**18 // 64 + 101, 64, 5
    y = np.arange(n) % C
    H = (rng.standard_normal((n, p)) + 2 * rng.standard_normal((C, p))[y] + 4).astype(dtype)
    W, b = rng.standard_normal((C, p)), rng.standard_normal(C)
    outputs = H @ W.T + b + 0.1 * rng.standard_normal((n, C))  # (n, C): for eps and the SQI spread
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = nc_metrics(H, y, W, b, outputs=outputs).as_dict()
        torch.set_num_threads(3)
        calls = []
        side_by_side = _threads.side_by_side
        monkeypatch.setattr(
            "ufm.metrics.side_by_side",
            lambda work, parts: calls.append(len(parts)) or side_by_side(work, parts),
        )
        monkeypatch.setattr("ufm.metrics._PART_STATS_ELEMENTS", 0 if stats_in_parts else 2**62)
        columns = []
        part_stats = NCAccumulator._part_stats
        monkeypatch.setattr(
            NCAccumulator,
            "_part_stats",
            lambda self, G_t, *rest: columns.append(G_t.shape[1]) or part_stats(self, G_t, *rest),
        )
        split = nc_metrics(H, y, W, b, outputs=outputs).as_dict()
    finally:
        torch.set_num_threads(threads)
    assert max(calls) == 3  # the batches were really split
    assert (max(columns) < n) == stats_in_parts  # and so were pass 2's statistics, or not
    # And both against NC1 = Tr(Sigma_W Sigma_B^+)/C typed out in NumPy float64 on the same values.
    H64 = H.astype(np.float64)
    mu = np.stack([H64[y == c].mean(axis=0) for c in range(C)])
    D, M = H64 - mu[y], mu - H64.mean(axis=0)
    nc1 = np.trace(D.T @ D / n @ np.linalg.pinv(M.T @ M / C, rcond=1e-8, hermitian=True)) / C
    assert split["nc1"] == pytest.approx(nc1, rel=1e-9 if dtype == np.float64 else 1e-5)
    # The outputs' moments and NC4, merged over the parts, against NumPy on the whole batch.
    correct = outputs[np.arange(n), y]
    wrong = np.where(np.arange(C) == y[:, None], np.nan, outputs)  # (n, C), the correct slots blanked
    eps = 1.0 - correct.mean()
    assert split["eps"] == pytest.approx(eps, rel=1e-12)
    assert split["sqi_correct_std"] == pytest.approx(correct.std(), rel=1e-10)
    assert split["sqi_spread"] == pytest.approx(np.sqrt(np.nanmean((wrong - eps / (C - 1)) ** 2)), rel=1e-10)
    nearest = np.argmin(((H64[:, None, :] - mu[None]) ** 2).sum(axis=2), axis=1)
    nc4 = np.mean(np.argmax(H64 @ W.T + b, axis=1) != nearest)
    assert abs(split["nc4"] - nc4) <= (0.0 if dtype == np.float64 else 2.0 / n)  # float32: near-ties
    for key, value in one.items():
        if value is None or isinstance(value, int):
            assert split[key] == value, key
        else:
            # atol for the rounding-noise C-th singular value of the centred means (rank C - 1)
            atol = 1e-12 * np.max(np.abs(value))
            np.testing.assert_allclose(split[key], value, rtol=1e-12, atol=atol, err_msg=key)


# OpenBLAS runs an axpy of at most this many entries on the calling thread (interface/axpy.c:
# "if (n <= 10000) nthreads = 1"); SciPy's wheels bring their own OpenBLAS, with a pool of its own.
OPENBLAS_AXPY_SINGLE_THREAD = 10_000


@pytest.mark.parametrize("contiguous", [True, False])
def test_add_scaled_in_single_threaded_blas_calls(monkeypatch, contiguous):
    """add_scaled(y, a, x) on NumPy float64 gives y + a x (to the last bit a fused multiply-add may move:
    within 2 eps (|y| + |a x|) an entry), in SciPy daxpy calls that together cover every entry once, none
    longer than OpenBLAS's single-thread limit, so SciPy's pool is never woken beside NumPy's (with the
    default threads on 2 cores one ETD2 evaluation took 276-282 ms instead of 10-12, docs/theory.md §13.3).
    A strided y goes through f2py's copy and is written back."""
    sizes = []
    daxpy = _blocks._daxpy()
    monkeypatch.setattr(_blocks, "_daxpy", lambda: lambda x, y, a: sizes.append(x.size) or daxpy(x, y, a=a))
    rng = np.random.default_rng(3)
    n, a = 3 * OPENBLAS_AXPY_SINGLE_THREAD + 7, -0.37
    x = rng.standard_normal(n)
    y = rng.standard_normal(n) if contiguous else rng.standard_normal((n, 2))[:, 1]
    expected, bound = y + a * x, 2 * np.finfo(float).eps * (np.abs(y) + np.abs(a * x))
    _blocks.add_scaled(y, a, x)
    assert np.all(np.abs(y - expected) <= bound)
    assert sum(sizes) == n and max(sizes) <= OPENBLAS_AXPY_SINGLE_THREAD


def _scipy_wheel_blas() -> set[str]:
    """Real paths of the shared libraries SciPy's installed distribution lists in its RECORD."""
    files = importlib.metadata.files("scipy") or []
    suffixes = (".so", ".dylib", ".dll")
    return {str(Path(f.locate()).resolve()) for f in files if any(s in f.name for s in suffixes)}


def _blas_threads() -> dict[str, int]:
    """{real path: thread count} of every BLAS library loaded, as threadpoolctl reads them."""
    from threadpoolctl import threadpool_info

    return {
        str(Path(i["filepath"]).resolve()): i["num_threads"]
        for i in threadpool_info()
        if i["user_api"] == "blas"
    }


@pytest.fixture
def scipy_blas_on_two_threads():
    """SciPy's wheel's own BLAS on two threads (so that a limit to one shows); its path and the counts."""
    import scipy.linalg  # noqa: F401  (loads SciPy's BLAS)
    from threadpoolctl import threadpool_limits

    own = _scipy_wheel_blas() & set(_blas_threads())
    if not own:
        pytest.skip("SciPy links no BLAS of its own here (one pool, shared with NumPy): nothing to limit")
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        if any(before[path] < 2 for path in own):
            pytest.skip("SciPy's BLAS cannot run two threads on this machine")
        yield own, before


def test_scipy_blas_on_one_thread_limits_only_scipys_own(scipy_blas_on_two_threads):
    """Inside the context the BLAS that SciPy's wheel installs (its RECORD) runs one thread and every
    other BLAS (NumPy's) keeps its count; on exit every count is back."""
    own, before = scipy_blas_on_two_threads
    with _threads.scipy_blas_on_one_thread():
        inside = _blas_threads()
    assert {path: inside[path] for path in own} == {path: 1 for path in own}
    assert {p: n for p, n in inside.items() if p not in own} == {
        p: n for p, n in before.items() if p not in own
    }
    assert _blas_threads() == before


def test_minimize_loss_runs_lbfgs_with_scipys_blas_on_one_thread(monkeypatch, scipy_blas_on_two_threads):
    """Every gradient L-BFGS-B asks for sees SciPy's BLAS on one thread (there its vector work and
    NumPy's products do not compete: 2.6x faster per evaluation at 64k parameters, bench_lbfgs.py),
    and the end point's gradient after the run sees it restored."""
    own, before = scipy_blas_on_two_threads
    seen = []

    def spy(real):
        def call(*args):
            seen.append({p: _blas_threads()[p] for p in own})
            return real(*args)

        return call

    for name in ("loss_and_grad", "loss_and_grad_norm"):  # the steps' gradients; the end point's norm
        monkeypatch.setattr(optimize, name, spy(getattr(optimize, name)))
    optimize.minimize_loss(UFMProblem(3, 2, 1e-2, 1e-2), 4, n_starts=1, classify=False)
    assert len(seen) > 2
    assert all(counts == {p: 1 for p in own} for counts in seen[:-1])
    assert seen[-1] == {p: before[p] for p in own}
