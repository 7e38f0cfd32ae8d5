"""CSV tables round-trip every value exactly; writes are atomic."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ufm.tables import GrowingCsv, GrowingJson, json_parts_items, read_csv, read_table, write_csv, write_json

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


def test_growing_csv_writes_what_write_csv_writes(tmp_path):
    """A history written row by row (the training's GrowingCsv) is byte for byte the table write_csv
    makes of all its rows, also after rows with a new column, an edited row or another path, all of
    which re-encode the table; and it reads back as the rows. Added rows are appended to the file it
    wrote, which keeps its inode; a file changed since is replaced."""
    log, rows, inodes = GrowingCsv(), [], set()
    path = tmp_path / "history.csv"
    for epoch in range(4):
        rows.append({"epoch": epoch, "loss": 1 / (epoch + 1), "nc1": float("nan") if epoch == 2 else 0.1})
        log.write(path, rows)
        assert path.read_bytes() == write_csv(tmp_path / "ref.csv", rows).read_bytes(), epoch
        inodes.add(path.stat().st_ino)
        assert len(inodes) == 1, "rows only added: appended to the same file, not replaced"
    path.write_text(path.read_text()[:-5])  # a file changed by someone else is replaced whole
    rows.append({"epoch": 9, "loss": 0.3, "nc1": 0.2})
    log.write(path, rows)
    assert path.read_bytes() == write_csv(tmp_path / "ref.csv", rows).read_bytes()
    rows.append({"epoch": 4, "loss": 0.2, "refined": 1})  # a new column: every row gets the cell
    rows[0] = dict(rows[0], loss=9.0)  # a changed (replaced) row is re-encoded too
    log.write(path, rows)
    assert path.read_bytes() == write_csv(tmp_path / "ref.csv", rows).read_bytes()
    assert read_csv(path)[0]["loss"] == 9.0 and read_csv(path)[-1]["refined"] == 1
    other = log.write(tmp_path / "other.csv", rows[:2])
    assert read_csv(other) == [
        {"epoch": 0, "loss": 9.0, "nc1": 0.1},
        {"epoch": 1, "loss": 0.5, "nc1": 0.1},
    ]


def test_growing_json_keeps_every_value_and_encodes_each_item_once():
    """GrowingJson's parts decode to the items bit for bit (floats, NaN, inf, ints, lists), one new
    part per call with new items, the earlier parts unchanged (each item encoded once); a replaced
    item re-encodes everything, and a cache read back from parts goes on from them."""
    log, rows, seen = GrowingJson(), [], []
    for epoch in range(4):
        rows.append({"epoch": epoch, "x": 0.1 * epoch + 1e-17, "nc1": float("nan"), "b": [float("inf"), 3]})
        parts = log.parts(rows)
        assert parts[:-1] == seen and len(parts) == epoch + 1
        seen = parts
        assert repr(json_parts_items(parts)) == repr(rows)
    assert log.parts(rows) == seen  # nothing new: nothing encoded
    rows[1] = dict(rows[1], x=2.0)
    assert len(log.parts(rows)) == 1 and json_parts_items(log.parts(rows))[1]["x"] == 2.0
    items, resumed = GrowingJson.read(seen)
    assert repr(items) == repr(rows[:1] + [dict(rows[1], x=0.1 + 1e-17)] + rows[2:])
    items.append({"epoch": 4})
    assert resumed.parts(items)[:-1] == seen and json_parts_items(resumed.parts(items))[-1] == {"epoch": 4}
