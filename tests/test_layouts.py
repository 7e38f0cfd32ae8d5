"""Pass 2's product layouts (ufm._layouts): both equal the product, the choice between them follows
the timings with its margin, and nc_metrics gives the same answer whichever is chosen."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ufm import _layouts, nc_metrics

LAYOUTS = (_layouts.basis_first, _layouts.rows_first)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_each_layout_is_the_product(layout, dtype):
    """out (k, b) = basis_t @ block.T against the float64 product of the same values, written into a
    strided column slice of a wider result as nc_metrics does; float32 within (p + 2) 2^-24 |B|^T |X|
    entrywise (the float32 dot-product bound), float64 within 1e-13 of it."""
    rng = np.random.default_rng(1)
    b, p, k = 300, 40, 7
    block = rng.standard_normal((b, p)).astype(dtype)
    basis_t = rng.standard_normal((k, p)).astype(dtype)
    ref = basis_t.astype(np.float64) @ block.astype(np.float64).T  # (k, b)
    scale = np.abs(basis_t).astype(np.float64) @ np.abs(block).astype(np.float64).T
    unit = (p + 2) * 2.0**-24 if dtype == np.float32 else 1e-13
    out = np.full((k, b + 10), np.nan, dtype=dtype)
    args = (out[:, 5 : 5 + b], basis_t, np.ascontiguousarray(basis_t.T), block)
    layout(*(torch.from_numpy(a) for a in args))
    got = out[:, 5 : 5 + b].astype(np.float64)
    assert np.all(np.abs(got - ref) <= unit * scale)
    assert np.isnan(out[:, :5]).all() and np.isnan(out[:, 5 + b :]).all()  # nothing written outside


def _clock(durations: dict, calls: list):
    """A clock and a run: each run of a layout advances the clock by that layout's next duration."""
    now = [0.0]
    iters = {layout: iter(ts) for layout, ts in durations.items()}

    def run(layout):
        calls.append(layout)
        now[0] += next(iters[layout])

    return (lambda: now[0]), run


@pytest.mark.parametrize(
    ("incumbent_times", "challenger_times", "expected"),
    [
        ((1.0, 1.0, 1.0), (0.95, 0.95, 0.95), "incumbent"),  # faster, but within the margin
        ((1.0, 1.0, 1.0), (0.85, 0.85, 0.85), "challenger"),  # past the margin
        ((5.0, 1.0, 1.0), (0.95, 0.95, 0.95), "incumbent"),  # a slow first run does not count: best-of
        ((1.0, 1.0, 1.0), (3.0, 0.8, 3.0), "challenger"),  # one fast run of the challenger does
    ],
)
def test_faster_layout_keeps_the_incumbent_unless_the_challenger_clears_the_margin(
    incumbent_times, challenger_times, expected
):
    incumbent, challenger = LAYOUTS
    calls: list = []
    clock, run = _clock({incumbent: incumbent_times, challenger: challenger_times}, calls)
    key = ("test", incumbent_times, challenger_times)
    _layouts._chosen.pop(key, None)
    got = _layouts.faster_layout(key, incumbent, challenger, run, clock=clock)
    assert got is {"incumbent": incumbent, "challenger": challenger}[expected]
    assert calls == [incumbent, challenger] * _layouts.TRIALS  # alternating
    # Timed once per key: a second call reuses the choice without running anything.
    assert _layouts.faster_layout(key, incumbent, challenger, run, clock=clock) is got
    assert len(calls) == 2 * _layouts.TRIALS
    assert _layouts.chosen()[key] == got.__name__
    del _layouts._chosen[key]


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_nc_metrics_is_the_same_whichever_layout_is_chosen(monkeypatch, library, dtype):
    """nc_metrics with each layout forced, on features of several full product blocks and a partial
    one: every measure agrees between the two to float64 rounding (1e-12 relative; the float32 products
    are exact sums of float32 products only up to their own rounding, so 1e-5 there), and NC1 equals
    Tr(Sigma_W Sigma_B^+)/C typed out in NumPy float64 on the same values."""
    rng = np.random.default_rng(3)
    n, p, C = 5 * 2**18 // 64 + 17, 64, 5  # 5 full blocks of 4096 rows and 17 rows more
    y = np.arange(n) % C
    H = (rng.standard_normal((n, p)) + 3 * rng.standard_normal((C, p))[y]).astype(dtype)
    W = rng.standard_normal((C, p))
    features = torch.from_numpy(H) if library == "torch" else H
    results = []
    for layout in LAYOUTS:
        monkeypatch.setattr(_layouts, "faster_layout", lambda key, a, b, run, layout=layout: layout)
        results.append(nc_metrics(features, y, W).as_dict())
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for key, value in results[0].items():
        other = results[1][key]
        if value is None or isinstance(value, int):
            assert other == value, key
        else:
            np.testing.assert_allclose(other, value, rtol=rtol, atol=1e-12, err_msg=key)
    H64 = H.astype(np.float64)
    mu = np.stack([H64[y == c].mean(axis=0) for c in range(C)])
    D, M = H64 - mu[y], mu - H64.mean(axis=0)
    nc1 = np.trace(D.T @ D / n @ np.linalg.pinv(M.T @ M / C, rcond=1e-8, hermitian=True)) / C
    for result in results:
        assert result["nc1"] == pytest.approx(nc1, rel=1e-9 if dtype == np.float64 else 1e-5)


def test_the_first_full_block_is_timed_once_per_process_and_key():
    """nc_metrics on CPU features (NumPy or torch) with a full product block records one choice for its
    key (dtype, p, k = r + C, block rows); a batch smaller than one block is measured without timing."""
    rng = np.random.default_rng(4)
    p, C = 96, 3
    rows = 2**18 // p
    for library, n in itertools.product(("numpy", "torch"), (rows + 5, rows - 5)):
        y = np.arange(n) % C
        H = rng.standard_normal((n, p)) + rng.standard_normal((C, p))[y]
        key = ("torch.float64", p, 2 * C - 1, rows)
        _layouts._chosen.pop(key, None)
        nc_metrics(torch.from_numpy(H) if library == "torch" else H, y, rng.standard_normal((C, p)))
        assert (key in _layouts.chosen()) == (n > rows), (library, n)
