"""Metric points straight into MLflow's own SQLite tables: the metric writer's fast path.

MLflow's `log_batch` into its SQL store spends ~0.1 ms of CPU per point in SQLAlchemy's unit of work
(bench/RESULTS.md, "Metric ingest"), ten times what SQLite itself needs to insert the row. A GPU step of
about a millisecond logs 8 points, so only the bare insert keeps up. This module writes exactly the rows
`log_batch` would write (`metrics`, and `latest_metrics` where the new point is later), with plain
`executemany` in one transaction per drained batch of blocks.

It touches MLflow's private schema, so it is used only on a store whose Alembic revision and table
layout are ones this code was checked against (`KNOWN_SCHEMAS`; tests/test_metric_store.py compares
every row with `log_batch`'s and fails when an MLflow upgrade changes the schema). Any other store, and
every non-SQLite store, goes through MLflow's public API.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import sqlite3
from itertools import chain, repeat
from pathlib import Path

# Alembic revision of MLflow's tracking schema → the columns (name, declared type, not null, position in
# the primary key) of the two tables written here, as SQLite's `PRAGMA table_info` reports them.
_METRICS = (("key", "VARCHAR(250)", 1, 1), ("value", "FLOAT", 1, 5), ("timestamp", "BIGINT", 1, 2),
            ("run_uuid", "VARCHAR(32)", 1, 4), ("step", "BIGINT", 1, 3), ("is_nan", "BOOLEAN", 1, 6))
_LATEST = (("key", "VARCHAR(250)", 1, 1), ("value", "FLOAT", 1, 0), ("timestamp", "BIGINT", 0, 0),
           ("step", "BIGINT", 1, 0), ("is_nan", "BOOLEAN", 1, 0), ("run_uuid", "VARCHAR(32)", 1, 2))
KNOWN_SCHEMAS = {"dc11669786a5": (_METRICS, _LATEST)}  # MLflow 3.17

# SQL has no infinities: MLflow stores ±inf as ±the largest double and NaN as 0 with is_nan set.
_FLOAT_MAX = 1.7976931348623157e308

# Many rows per statement: executing one statement per row (executemany) costs SQLite's VM more than the
# rows' index updates (measured: 1.5× the rate with 1,000 rows per statement).
_ROWS_PER_INSERT = 1000  # × 6 values, well under SQLite's 32,766 bound variables
_COLUMNS = '("key", value, timestamp, step, is_nan, run_uuid)'


def _insert_sql(n_rows: int) -> str:
    # ON CONFLICT DO NOTHING: an identical point is already stored, and log_batch drops it the same way.
    return f"INSERT INTO metrics {_COLUMNS} VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?)"] * n_rows) + \
        " ON CONFLICT DO NOTHING"

_LATEST_UPSERT = (
    f"INSERT INTO latest_metrics {_COLUMNS} VALUES (?, ?, ?, ?, ?, ?) "
    'ON CONFLICT ("key", run_uuid) DO UPDATE SET value = excluded.value, timestamp = excluded.timestamp, '
    "step = excluded.step, is_nan = excluded.is_nan "
    # MLflow's rule: the later point by (step, timestamp, value) is the latest.
    "WHERE (excluded.step, excluded.timestamp, excluded.value) > "
    "(latest_metrics.step, latest_metrics.timestamp, latest_metrics.value)"
)


# MLflow's documented rule for metric names (checked against MLflow's own check in the tests): letters,
# digits, `_ - . /`, spaces and (but on Windows) colons; at most 250 characters; a normalized relative path.
_NAME = re.compile(r"[/\w.\- ]*" if os.name == "nt" else r"[/\w.\- :]*")
_NAME_MAX = 250


def name_problem(key: str) -> str | None:
    """Why MLflow would refuse `key` as a metric name, or None."""
    if not _NAME.fullmatch(key):
        return f"metric name {key!r}: only letters, digits, '_', '-', '.', '/', spaces and colons are allowed"
    if len(key) > _NAME_MAX:
        return f"metric name {key[:40]!r}…: longer than {_NAME_MAX} characters"
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith(("..", "/")):
        return f"metric name {key!r}: must be a normalized relative path (no '//', '/./', '..', leading '/')"
    return None


class UnknownSchema(Exception):
    """The store is not one this module was checked against; the message says how it differs."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///…` tracking URI; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def schema_of(conn: sqlite3.Connection) -> tuple[str, tuple, tuple]:
    revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    tables = [tuple((r[1], r[2], r[3], r[5]) for r in conn.execute(f"PRAGMA table_info({t})"))
              for t in ("metrics", "latest_metrics")]
    return (revision[0] if revision else "", *tables)


def check_schema(conn: sqlite3.Connection) -> None:
    revision, metrics, latest = schema_of(conn)
    if revision not in KNOWN_SCHEMAS:
        raise UnknownSchema(f"MLflow schema revision {revision or '(none)'} is not one of {sorted(KNOWN_SCHEMAS)}")
    if (metrics, latest) != KNOWN_SCHEMAS[revision]:
        raise UnknownSchema(f"MLflow schema revision {revision} has metric tables laid out differently: "
                            f"{metrics}, {latest}")


# A block: (run_id, timestamp_ms, [(key, first_step, [value, …]), …]); each column holds consecutive steps.
Column = tuple[str, int, list[float]]
Block = tuple[str, int, list[Column]]


def _sanitized(values: list[float]) -> tuple[list[float], list[int] | None]:
    if all(map(math.isfinite, values)):  # the common case, at C speed
        return values, None
    clean, is_nan = [], []
    for v in values:
        nan = v != v
        clean.append(0.0 if nan else (_FLOAT_MAX if v > 0 else -_FLOAT_MAX) if math.isinf(v) else v)
        is_nan.append(int(nan))
    return clean, is_nan


class SqliteMetricStore:
    """One connection to a checked SQLite store; `write` stores blocks of points of several runs."""

    def __init__(self, db: Path, timeout: float = 60.0):
        # The store is shared with MLflow in this and other processes: wait for their transactions
        # (SQLite's busy handler) rather than fail. Autocommit mode, transactions begun explicitly.
        # mode=rw: never create a file where the URI pointed at none (a typo'd path, a query string).
        self.conn = sqlite3.connect(f"{Path(db).resolve().as_uri().replace('file://', 'file:', 1)}?mode=rw", uri=True,
                                    timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            check_schema(self.conn)
            self.conn.execute("PRAGMA cache_size = -65536")  # 64 MB: index pages of long histories stay hot
        except (sqlite3.Error, UnknownSchema):
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def write(self, blocks: list[Block]) -> dict[str, str]:
        """Store blocks of several runs in one transaction.

        Returns {run_id: reason} for runs whose points were refused (gone, deleted, a bad name: what
        log_batch refuses): a refused block and the run's blocks after it are left out, the rest stored.
        A database error raises with nothing of this call stored.
        """
        by_run: dict[str, list[tuple[int, list[Column]]]] = {}
        for run_id, ts, columns in blocks:
            by_run.setdefault(run_id, []).append((ts, columns))
        refused: dict[str, str] = {}
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock upgrading a read lock
        try:
            for run_id, run_blocks in by_run.items():
                found = conn.execute("SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
                if found is None or found[0] != "active":
                    refused[run_id] = (f"run {run_id} not found" if found is None else
                                       f"the run {run_id} must be in the 'active' state; current state is {found[0]}")
                    continue
                columns = []
                for ts, block in run_blocks:
                    problems = [p for key, _, values in block if values and (p := name_problem(key))]
                    if problems:  # what log_batch refuses, and the run's blocks after it: no points after a gap
                        refused[run_id] = problems[0]
                        break
                    columns += [(key, ts, first, values) for key, first, values in block if values]
                if columns:
                    self._insert(conn, run_id, columns)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return refused

    @staticmethod
    def _insert(conn: sqlite3.Connection, run_id: str, columns: list[tuple[str, int, int, list[float]]]) -> None:
        # In primary-key order (key, timestamp, step): each key's points go in at one place of the index.
        columns.sort(key=lambda c: c[:3])
        flat: list = []
        latest: dict[str, tuple] = {}
        for key, ts, first, values in columns:
            steps = range(first, first + len(values))
            values, is_nan = _sanitized(values)
            flat.extend(chain.from_iterable(zip(repeat(key), values, repeat(ts), steps,
                                                repeat(0) if is_nan is None else is_nan, repeat(run_id))))
            last = (steps[-1], ts, values[-1], 0 if is_nan is None else is_nan[-1])
            if key not in latest or last[:3] > latest[key][:3]:
                latest[key] = last
        per_statement = 6 * _ROWS_PER_INSERT
        for i in range(0, len(flat), per_statement):
            chunk = flat[i : i + per_statement]
            conn.execute(_insert_sql(len(chunk) // 6), chunk)
        conn.executemany(_LATEST_UPSERT, [(key, value, ts, step, nan, run_id)
                                          for key, (step, ts, value, nan) in latest.items()])


def open_fast_store(uri: str) -> tuple[SqliteMetricStore | None, str]:
    """The fast path for `uri` when it can be used, else (None, why not)."""
    db = sqlite_path(uri)
    if db is None:
        return None, "not a SQLite store"
    try:
        return SqliteMetricStore(db), ""
    except UnknownSchema as e:
        return None, str(e)
    except sqlite3.Error as e:
        return None, f"{db}: {e}"
