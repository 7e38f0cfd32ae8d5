"""CSV tables round-trip every value exactly; writes are atomic."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ufm.tables import read_csv, read_table, write_csv, write_json

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False),
    st.text(alphabet="abcxyz_ ", min_size=1),  # no digits, "nan" or "inf": stays a string
)


@given(rows=st.lists(st.fixed_dictionaries({"a": scalars, "b": scalars}), min_size=1, max_size=5))
def test_csv_round_trip(tmp_path_factory, rows):
    path = write_csv(tmp_path_factory.mktemp("t") / "x.csv", rows)
    back = read_csv(path)
    for row, got in zip(rows, back, strict=True):
        assert got == row  # floats bit for bit (repr), None as an empty cell


def test_nan_and_numpy_scalars(tmp_path):
    path = write_csv(tmp_path / "x.csv", [{"x": float("nan"), "y": np.float64(0.1), "z": np.int64(3)}])
    assert read_csv(path) == [{"x": None, "y": 0.1, "z": 3}]


def test_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"x": float("nan")})
    assert not (tmp_path / "x.json").exists()


def test_read_table_reads_csv_and_refuses_other_formats(tmp_path):
    rows = [{"run_id": "a", "x": 0.1, "ok": True, "note": None}]
    assert read_table(write_csv(tmp_path / "t.csv", rows)) == rows
    with pytest.raises(ValueError, match=r"unknown table format '\.xlsx'"):
        read_table(tmp_path / "t.xlsx")
