"""The low-rank study (docs/theory.md §16.1): effective and stable ranks against closed forms, and the
per-epoch singular values that training writes (singular_values.csv), their round trip and resume."""

import shutil

import numpy as np
import pytest
import torch

from ufm.datasets import load_dataset
from ufm.experiments.low_rank import (
    LOW_RANK_CSV,
    effective_rank,
    low_rank_section,
    run_low_rank,
    spectrum_measures,
    stable_rank,
)
from ufm.tables import read_csv
from ufm.training import SINGULAR_VALUES, TrainConfig, train

TINY = dict(per_class=10, test_per_class=5, width=16, depth=3, batch_size=20, lr=0.02, epochs=4, device="cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return load_dataset("default", per_class=10, test_per_class=5)


@pytest.mark.parametrize(
    ("s", "erank", "srank"),
    [
        ([2.0], 1.0, 1.0),
        ([1.0, 1.0, 1.0, 0.0], 3.0, 3.0),  # k equal values: both ranks are k; zeros count 0 ln 0 = 0
        ([3.0, 1.0], 4 / 3**0.75, 10 / 9),  # p = (3/4, 1/4): H = ln 4 - (3/4) ln 3
        ([2.0, 1.0, 1.0], 2 ** (3 / 2), 6 / 4),  # p = (1/2, 1/4, 1/4): H = (3/2) ln 2
    ],
)
def test_ranks_against_typed_out_closed_forms(s, erank, srank):
    assert effective_rank(np.array(s)) == pytest.approx(erank, rel=1e-14)
    assert stable_rank(np.array(s)) == pytest.approx(srank, rel=1e-14)


@pytest.mark.parametrize("seed", range(5))
def test_ranks_of_a_matrix_with_a_known_spectrum(seed):
    """W = U diag(s) V^T with random orthogonal U, V: the ranks of np.linalg.svd(W) are those of s,
    and 1 <= stable rank <= rank <= r, 1 <= effective rank <= r."""
    rng = np.random.default_rng(seed)
    r = 7
    s = np.sort(rng.uniform(0.0, 2.0, r))[::-1]
    s[-2:] = 0.0  # rank 5
    U, _ = np.linalg.qr(rng.normal(size=(9, r)))
    V, _ = np.linalg.qr(rng.normal(size=(12, r)))
    sv = np.linalg.svd(U @ np.diag(s) @ V.T, compute_uv=False)[:r]
    p = s[:5] / s.sum()
    assert effective_rank(sv) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-10)
    assert stable_rank(sv) == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-10)
    m = spectrum_measures(sv, rank_rtol=1e-8)
    assert m["rank"] == 5 and m["n_sv"] == r
    assert 1 <= m["stable_rank"] <= m["rank"] and 1 <= m["effective_rank"] <= m["rank"]


@pytest.mark.parametrize("s", [[], [0.0, 0.0], [1.0, -1.0], [np.nan], [[1.0]]])
def test_a_bad_spectrum_is_refused(s):
    with pytest.raises(ValueError, match="singular values must be"):
        effective_rank(np.array(s))


def _spectra(path):
    """{(epoch, refined, layer): values in index order} of a singular_values.csv."""
    out = {}
    for r in read_csv(path):
        out.setdefault((r["epoch"], r["refined"], r["layer"]), []).append((r["index"], r["value"]))
    return {k: np.array([v for _, v in sorted(vals)]) for k, vals in out.items()}


def test_singular_values_file_holds_the_weights_spectra(tmp_path, data):
    """Written at the epochs with singular-value measures only (svd_every = 2 and the last), and the
    last epoch's values are the SVD of the checkpoint's weights (computed here with NumPy)."""
    cfg = TrainConfig(**(TINY | dict(epochs=5, svd_every=2, checkpoint_every=5)))
    result = train(cfg, out=tmp_path, progress=False, dataset=data)
    spectra = _spectra(tmp_path / SINGULAR_VALUES)
    assert sorted({e for e, _, _ in spectra}) == [0, 2, 4, 5]
    weights = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    for k in range(1, 4):
        W = weights[f"layers.{k - 1}.W"].double().numpy()
        s = np.linalg.svd(W, compute_uv=False)
        np.testing.assert_allclose(spectra[(5, 0, k)], s, rtol=1e-6, atol=1e-7 * s[0])
        # sum s_i^2 = ||W||_F^2: the history's stable rank (from the Frobenius norm) at every epoch
        epochs = result.history["epoch"]
        for e in (0, 2, 4, 5):
            i = int(np.flatnonzero(epochs == e)[0])
            s_e = spectra[(e, 0, k)]
            assert result.history[f"srank_W{k}"][i] == pytest.approx(np.sum(s_e**2) / s_e[0] ** 2, rel=1e-6)


def test_singular_values_file_after_a_resume_equals_the_uninterrupted_run(tmp_path, data):
    """A run killed after recording epoch 3 but before its checkpoint (simulated by putting the epoch-2
    checkpoint back) resumes from epoch 2: the file drops epoch 3's rows and ends byte for byte as
    the uninterrupted run's."""
    cfg = TrainConfig(**(TINY | dict(epochs=5, checkpoint_every=1)))
    train(cfg, out=tmp_path / "full", progress=False, dataset=data)
    part = tmp_path / "part"
    train(cfg, out=part, progress=False, dataset=data, stop_after_epoch=2)
    shutil.copy(part / "checkpoint.pt", tmp_path / "epoch2.pt")
    train(cfg, out=part, resume=True, progress=False, dataset=data, stop_after_epoch=3)
    assert 3 in {e for e, _, _ in _spectra(part / SINGULAR_VALUES)}
    shutil.copy(tmp_path / "epoch2.pt", part / "checkpoint.pt")
    train(cfg, out=part, resume=True, progress=False, dataset=data)
    expected = (tmp_path / "full" / SINGULAR_VALUES).read_text()
    assert (part / SINGULAR_VALUES).read_text() == expected
    assert expected.count("\n") == 1 + 6 * (16 + 16 + 10)  # header, 6 epochs of min(d, 16), 16, 10 values


def test_overwrite_removes_the_old_singular_values(tmp_path, data):
    cfg = TrainConfig(**(TINY | dict(epochs=2)))
    train(cfg, out=tmp_path, progress=False, dataset=data)
    train(TrainConfig(**(TINY | dict(epochs=1))), out=tmp_path, overwrite=True, progress=False, dataset=data)
    assert sorted({e for e, _, _ in _spectra(tmp_path / SINGULAR_VALUES)}) == [0, 1]


def test_run_low_rank_tables_and_report(tmp_path, data):
    """Two tiny runs (lambda = 0 and the default): the table has the report's columns and the ranks'
    invariants, and the report section states W_L's rank out of C from it."""
    runs = []
    for wd in (0.0, TrainConfig.wd):
        cfg = TrainConfig(**(TINY | dict(wd=wd, refine_to=1e-4 if wd else None)))
        train(cfg, out=tmp_path / f"wd_{wd:g}", progress=False, dataset=data)
        runs.append((wd, tmp_path / f"wd_{wd:g}"))
    result = run_low_rank(runs, tmp_path)
    rows = read_csv(result.table)
    assert result.table.name == LOW_RANK_CSV and result.figure.read_bytes()[:4] == b"\x89PNG"
    for r in rows:
        assert 1 - 1e-12 <= r["stable_rank"] <= r["rank"] + 1e-12 and r["rank"] <= r["n_sv"]
        assert 1 - 1e-12 <= r["effective_rank"] <= r["n_sv"] + 1e-12
    assert {r["refined"] for r in rows if r["wd"] > 0} == {0, 1} and {
        r["n_sv"] for r in rows if r["layer"] == 3
    } == {10}
    assert [(wd, C) for wd, _, C in result.final_rank_WL] == [(0.0, 10), (TrainConfig.wd, 10)]
    text = low_rank_section(tmp_path, 7)
    for wd, rank, C in result.final_rank_WL:
        assert f"lambda = {wd:g}: W_L at the last epoch (4) has {rank} of {C} singular values" in text
    with pytest.raises(ValueError, match="recorded no singular values"):
        run_low_rank([(0.0, tmp_path / "nowhere")], tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / SINGULAR_VALUES).write_text("epoch,refined,layer,index,value\n")
    with pytest.raises(ValueError, match="hold only a header"):
        run_low_rank([(0.0, tmp_path / "empty")], tmp_path)
