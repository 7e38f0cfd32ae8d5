"""Tables on disk: CSV rows written and read back without losing a digit, and JSON records.

Every table ``ufm`` writes (training histories, sweep results, the report's tables) goes through
these functions, so one encoding holds everywhere: None and NaN are empty cells, floats are written
with ``repr`` (read back bit for bit), and files are replaced atomically, so an interrupted run leaves
the previous file whole. ``read_table`` also reads the Parquet tables of a sweep (with pyarrow).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ._validation import check_choice

# Formats of a results table (a sweep's ``out``): CSV always, Parquet with pyarrow.
TABLE_FORMATS = (".csv", ".parquet")


def cell_text(value: Any) -> str:
    """One CSV cell: '' for None or NaN, ``repr`` for floats (exact round trip), ``str`` otherwise."""
    if type(value) is float:  # most cells: skip the checks below
        return "" if value != value else repr(value)
    if value is None:
        return ""
    if isinstance(value, float) or type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float):
            return "" if math.isnan(value) else repr(value)
    return str(value)


def cell_value(text: str) -> Any:
    """Inverse of ``cell_text``: '' -> None, then bool, int, float, else the string."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def columns_of(rows: Iterable[dict[str, Any]], first: Sequence[str] = ()) -> list[str]:
    """Column names in first-seen order, ``first`` leading."""
    seen = dict.fromkeys(first)
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]], first: Sequence[str] = ()) -> Path:
    """Write ``rows`` as a CSV table, atomically (through a temporary file and ``os.replace``)."""

    return _write_text(path, [_csv_text(rows, columns_of(rows, first), header=True)])


class GrowingCsv:
    """A CSV table that grows by rows, as a training history does: after :meth:`write` the file holds
    exactly what ``write_csv(path, rows)`` writes, but only the rows added since the previous call
    are encoded (the others are kept as text), and they are appended to the file when it is still
    the one this object wrote (same path, columns and size); anything else replaces it atomically. A
    history written after each of E epochs then costs E row encodings in all, not E^2/2 (measured:
    28 ms per write at 300 rows of 90 columns, against 1 ms), and no rename per epoch: on ext4 a file
    renamed over another is written out at once (its auto_da_alloc; measured in a training run: 3.4 ms a
    write, against 0.02 ms for an append). An append cut short by a crash leaves a partial last row,
    as any append does; a resumed training run rewrites its history from the checkpoint.

    Rows already written are recognized by identity (the same dict objects, in the same order, under
    the same columns); anything else is encoded afresh.
    """

    def __init__(self):
        self._key: tuple | None = None  # (path, columns)
        self._rows: list[dict[str, Any]] = []  # the rows encoded, as objects
        self._text: list[str] = []  # the header, then one line per row
        self._size: int | None = None  # of the file after the last write

    def write(self, path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
        path = Path(path)
        kept = _kept(self._rows, rows)
        if self._key is not None and self._key[0] == path and kept == len(self._rows):
            # The kept rows' keys are the kept columns, in first-seen order: only new rows add any.
            columns = columns_of(rows[kept:], first=self._key[1])
        else:
            kept, columns = 0, columns_of(rows)
        key = (path, tuple(columns))
        if key != self._key or kept == 0:
            self._key, self._rows, self._text, kept = key, [], [_csv_text([], columns, header=True)], 0
        new = list(rows[kept:])
        self._rows += new
        self._text.append(_csv_text(new, columns, header=False))
        if kept and self._size is not None and _size(path) == self._size:
            with path.open("a", newline="") as fh:
                fh.write(self._text[-1])
        else:
            _write_text(path, self._text)
        self._size = _size(path)
        return path


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


class GrowingJson:
    """A list that grows at its end, held as JSON text for a checkpoint: :meth:`parts` returns strings
    whose decoded lists, concatenated (:func:`json_parts_items`), are the items, and encodes only the
    items added since the previous call (the others are recognized by identity, as in
    :class:`GrowingCsv`). A checkpoint of a history of E rows saved every k epochs then costs E row
    encodings in all, not E^2/(2k); torch.save pickles a few strings instead of every cell.

    JSON, not pickle: a checkpoint loaded with ``weights_only`` must not run code, and Python's json
    keeps floats bit for bit (``repr``), and NaN and inf.
    """

    def __init__(self, items: Sequence[Any] = (), parts: Sequence[str] = ()):
        self._items, self._parts = list(items), list(parts)  # the items encoded, and their text

    @classmethod
    def read(cls, parts: Sequence[str]) -> tuple[list[Any], GrowingJson]:
        """The items of ``parts``, and a GrowingJson that has them encoded already (a resume)."""
        items = json_parts_items(parts)
        return items, cls(items, parts)

    def parts(self, items: Sequence[Any]) -> list[str]:
        if _kept(self._items, items) < len(self._items):
            self._items, self._parts = [], []
        if len(items) > len(self._items):
            self._parts.append(json.dumps(list(items[len(self._items) :])))
            self._items = list(items)
        return list(self._parts)


def json_parts_items(parts: Sequence[str]) -> list[Any]:
    """The items that :meth:`GrowingJson.parts` encoded, in order."""
    return [item for part in parts for item in json.loads(part)]


def _kept(encoded: Sequence[Any], items: Sequence[Any]) -> int:
    """How many leading ``items`` are the ``encoded`` ones, the same objects in the same order."""
    kept = 0
    for a, b in zip(encoded, items):
        if a is not b:
            break
        kept += 1
    return kept


def _csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, header: bool) -> str:
    """The lines ``write_csv`` writes for ``rows`` under ``columns`` (with the header line or not)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    if header:
        writer.writeheader()
    writer.writerows({k: cell_text(v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def _write_text(path: str | os.PathLike, parts: Sequence[str]) -> Path:
    """The concatenated ``parts`` as the file ``path``, atomically, line endings as given."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            fh.writelines(parts)

    return atomic_write(path, write)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then ``os.replace`` it onto ``path``.

    A crash leaves the previous file whole; a failed write (a full disk, a file-size limit) removes
    the temporary file and raises an OSError naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One temporary name per process: two sweeps exporting one table never write the same file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # torch.save reports a short write as a RuntimeError from its zip writer.
        if isinstance(err, OSError | RuntimeError):
            raise OSError(
                f"cannot write {path} ({str(err).strip().splitlines()[0]}); is the disk full? "
                "The previous file is kept"
            ) from err
        raise
    return path


def read_csv(path: str | os.PathLike, text_columns: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of a CSV table written by ``write_csv``, with typed cells (None where empty).

    ``text_columns`` are kept as written: an identifier such as the hex run id "80890291e0033491"
    would otherwise read back as the float inf, and "0123" as the int 123.
    """
    text = set(text_columns)
    with Path(path).open(newline="") as fh:
        return [
            {k: (v or None) if k in text else cell_value(v) for k, v in row.items()}
            for row in csv.DictReader(fh)
        ]


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically; NaN is refused (it is not JSON)."""
    text = json.dumps(obj, indent=1, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_table(path: str | os.PathLike, text_columns: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of a results table (.csv or .parquet, e.g. a sweep's) as dicts; missing values are None.
    ``text_columns`` of a CSV are kept as strings (``read_csv``); Parquet keeps its column types."""
    path = Path(path)
    check_choice("table format", path.suffix, TABLE_FORMATS)
    if path.suffix == ".parquet":
        return pyarrow_parquet().read_table(path).to_pylist()
    return read_csv(path, text_columns)


def pyarrow_parquet():
    """``pyarrow.parquet``, or a ValueError saying how to get it (Parquet is optional)."""
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise ValueError("Parquet tables need pyarrow (pip install pyarrow); or use a .csv path") from None
    return pq
