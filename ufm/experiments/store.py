"""The sweep store: one SQLite database per sweep table, the only record of the sweep's runs.

A sweep writes each finished run as one row of the ``runs`` table of ``<table>.sqlite`` (beside the
table its configuration names as ``out``), in one transaction, and exports the CSV or Parquet table
from the store. The guarantees, each tested in ``tests/test_sweep_store.py``:

* **Exact types.** Every column has a declared SQL type (``BOOLEAN``, ``INTEGER``, ``REAL``,
  ``TEXT``), fixed when the column is created (the parameters' from the runner, a result's from its
  first non-empty value) and applied when the row is read back: ``run_id`` is TEXT, so an id such as
  "80890291e0033491" or "0123" comes back as the same string.
* **Nothing lost, nothing duplicated.** ``run_id`` is the primary key; a row is inserted in one
  ``BEGIN IMMEDIATE`` transaction, so concurrent sweeps on one store are serialized by SQLite's lock
  (waiting up to ``BUSY_TIMEOUT_S``) instead of each rewriting a file from its own rows. An "ok" row is
  never replaced (a run finished by two sweeps at once keeps the first row); a failed row is replaced
  by its retry.
* **Kill-safe.** WAL journal with ``synchronous = FULL``: a process killed at any moment leaves every
  committed row and no partial one, and the next sweep resumes from the committed rows.
* **Exports never block.** The CSV/Parquet table is rewritten from the store through a temporary file
  and ``os.replace`` (``ufm.tables.atomic_write``), and a sweep never reads it back, so a torn or
  deleted export only means the next sweep writes it again.

Older versions kept the rows in the CSV/Parquet table itself. A store that does not exist yet is
created from such a table (``import_table``): its well-formed rows are imported, rows cut short by a
crash (fewer fields than the header) are skipped, so their runs run again.
"""

from __future__ import annotations

import csv
import os
import sqlite3
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..tables import atomic_write, cell_value, pyarrow_parquet, write_csv

__all__ = ["BUSY_TIMEOUT_S", "SQL_TYPES", "SweepStore", "read_store", "sql_type", "store_path"]

# Declared type of a column holding Python values of each type (bool before int: a bool is an int).
SQL_TYPES = {bool: "BOOLEAN", int: "INTEGER", float: "REAL", str: "TEXT"}

# How long a write waits for another process's transaction: a row is written in milliseconds, so a
# minute only runs out when a writer hangs.
BUSY_TIMEOUT_S = 60.0

_ARROW_TYPES = {"BOOLEAN": "bool_", "INTEGER": "int64", "REAL": "float64", "TEXT": "string"}


def store_path(table: str | os.PathLike) -> Path:
    """The store behind a sweep table: ``flow_sweep.csv`` -> ``flow_sweep.csv.sqlite``."""
    table = Path(table)
    return table.with_name(table.name + ".sqlite")


def sql_type(types: Iterable[type]) -> str:
    """The declared type of a column whose values have one of ``types`` (None aside)."""
    types = set(types) - {type(None)}
    for t in SQL_TYPES:
        if t in types:
            return SQL_TYPES[t]
    raise ValueError(f"no column type for values of type {', '.join(t.__name__ for t in types)}")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SweepStore:
    """The SQLite store of one sweep table (module docstring).

    Parameters
    ----------
    path : the database file (``store_path(table)``).
    kind : the runner kind of every row; a store holding rows of another kind is refused.
    columns : the leading columns, name -> declared SQL type; ``run_id`` is the primary key.
    """

    def __init__(self, path: Path, kind: str, columns: Mapping[str, str]):
        self.path, self.kind = Path(path), kind
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: no implicit transactions; every write is an explicit BEGIN IMMEDIATE.
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as err:  # a directory where no file can be made (read-only, /proc)
            raise ValueError(
                f"cannot open the sweep store {self.path} ({err}): it lies beside the table 'out', whose "
                "directory must be writable; choose another 'out'"
            ) from None
        try:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            with self.transaction():
                defs = ", ".join(
                    f"{_quote(c)} {t}" + (" PRIMARY KEY NOT NULL" if c == "run_id" else "")
                    for c, t in columns.items()
                )
                self._db.execute(f"CREATE TABLE IF NOT EXISTS runs ({defs})")
                self._db.execute("CREATE TABLE IF NOT EXISTS empty_columns (name TEXT PRIMARY KEY NOT NULL)")
                self._add_columns({c: t for c, t in columns.items() if c not in _typed_columns(self._db)})
                other = [
                    k for (k,) in self._db.execute("SELECT DISTINCT kind FROM runs WHERE kind != ?", (kind,))
                ]
        except sqlite3.DatabaseError as err:
            self._db.close()
            raise ValueError(
                f"{self.path} is not a readable sweep store ({err}); move it away to start the sweep afresh"
            ) from None
        if other:
            self._db.close()
            raise ValueError(
                f"{self.path} holds {', '.join(other)} runs; a sweep store holds one kind ({kind})"
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SweepStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self):
        """One write transaction, holding SQLite's write lock from its start (BEGIN IMMEDIATE)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def columns(self) -> dict[str, str | None]:
        """Every column, in table order, with its declared type (None: seen only empty so far)."""
        return _columns(self._db)

    def _add_columns(self, new: Mapping[str, str]) -> None:
        for name, decl in new.items():
            self._db.execute(f"ALTER TABLE runs ADD COLUMN {_quote(name)} {decl}")

    def put(self, row: Mapping[str, Any]) -> bool:
        """Store one finished run in one transaction; False (nothing written) if it is already "ok".

        A result column not in the table yet is added with the type of its value; one whose values
        so far are all None is only listed (``empty_columns``) until a value gives it a type.
        """
        with self.transaction():
            # Read inside the transaction: another sweep may have added columns or this very run.
            have = _typed_columns(self._db)
            new = {k: sql_type([type(v)]) for k, v in row.items() if k not in have and v is not None}
            self._add_columns(new)
            self._db.executemany("DELETE FROM empty_columns WHERE name = ?", [(k,) for k in new])
            self._db.executemany(
                "INSERT OR IGNORE INTO empty_columns VALUES (?)",
                [(k,) for k, v in row.items() if k not in have and v is None],
            )
            old = self._db.execute("SELECT status FROM runs WHERE run_id = ?", (row["run_id"],)).fetchone()
            if old is not None and old[0] == "ok":
                return False
            names = [k for k in row if k in have or k in new]
            self._db.execute(
                f"INSERT OR REPLACE INTO runs ({', '.join(map(_quote, names))}) "
                f"VALUES ({', '.join('?' * len(names))})",
                [row[k] for k in names],
            )
        return True

    def done(self) -> set[str]:
        """The run ids whose rows are "ok"."""
        return {rid for (rid,) in self._db.execute("SELECT run_id FROM runs WHERE status = 'ok'")}

    def rows(self) -> list[dict[str, Any]]:
        """Every row, in the order written, each value in its column's declared type (None if empty)."""
        return _rows(self._db)

    def export(self, table: Path) -> Path:
        """Write every row to ``table`` (.csv, or .parquet with the declared types), atomically."""
        rows, columns = self.rows(), self.columns()
        if table.suffix == ".parquet":
            pq = pyarrow_parquet()  # a clear error when pyarrow is missing
            import pyarrow as pa

            schema = pa.schema(
                # A column seen only empty has no type yet: an all-null Parquet column.
                [(c, getattr(pa, _ARROW_TYPES.get(t, "null"))()) for c, t in columns.items()]
            )
            data = pa.Table.from_pylist(rows, schema=schema)
            return atomic_write(table, lambda tmp: pq.write_table(data, tmp))
        return write_csv(table, rows, list(columns))

    def import_table(self, table: Path, text_columns: Iterable[str]) -> int:
        """Copy the rows of an older version's table into the store (module docstring); returns how
        many were imported. Rows cut short by a crash are skipped with a warning."""
        if table.suffix == ".parquet":
            rows = pyarrow_parquet().read_table(table).to_pylist()
        else:
            rows, torn = _read_whole_rows(table, set(text_columns))
            if torn:
                warnings.warn(
                    f"{table}: skipped {torn} row(s) cut short (a crash while writing)", stacklevel=3
                )
        n = 0
        for row in rows:
            if row.get("run_id") is None or row.get("kind") not in (None, self.kind):
                continue
            n += self.put({"kind": self.kind} | {k: v for k, v in row.items() if v is not None})
        return n


def read_store(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of an existing store (read only), as :meth:`SweepStore.rows`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no sweep store {path}; run the sweep (ufm sweep CONFIG) first")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        return _rows(db)
    except sqlite3.DatabaseError as err:
        raise ValueError(f"{path} is not a readable sweep store ({err})") from None
    finally:
        db.close()


def _typed_columns(db: sqlite3.Connection) -> dict[str, str]:
    return {name: decl for _, name, decl, *_ in db.execute("PRAGMA table_info(runs)")}


def _columns(db: sqlite3.Connection) -> dict[str, str | None]:
    """The typed columns in table order, then those seen only empty (type None)."""
    empty = [name for (name,) in db.execute("SELECT name FROM empty_columns ORDER BY rowid")]
    return _typed_columns(db) | {name: None for name in empty}


def _rows(db: sqlite3.Connection) -> list[dict[str, Any]]:
    columns = _typed_columns(db)
    empty = {name: None for name in _columns(db) if name not in columns}
    booleans = [c for c, t in columns.items() if t == "BOOLEAN"]
    cursor = db.execute(f"SELECT {', '.join(map(_quote, columns))} FROM runs ORDER BY rowid")
    rows = [dict(zip(columns, values)) | empty for values in cursor]
    for row in rows:
        for c in booleans:
            row[c] = None if row[c] is None else bool(row[c])
    return rows


def _read_whole_rows(path: Path, text: set[str]) -> tuple[list[dict[str, Any]], int]:
    """The rows of a CSV table with as many fields as its header, and how many others there were."""
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        whole, torn = [], 0
        for fields in reader:
            if len(fields) != len(header):
                torn += 1
                continue
            whole.append({k: (v or None) if k in text else cell_value(v) for k, v in zip(header, fields)})
    return whole, torn
