"""The service's metadata store: one SQLite database in WAL mode.

Tables: ``models`` (their default stat bank since schema 4), ``versions`` (immutable once
written; their weights digest and BN layers are filled in lazily for versions older than
schema 3), ``aliases``, ``banks`` (stat banks, immutable), ``datasets`` and ``jobs``;
JSON-valued columns hold lineage, reports and progress. Artifacts and uploaded data live
on the filesystem; rows only point at them.

One :class:`Database` per app: :func:`service.app.create_app` creates it, hands it to the
registry, the data set store and the job manager, and closes it when the app stops. The
connection is opened lazily (nothing touches the disk until the first query) and shared
by the server's threads behind a lock; a job's worker process opens its own connection to
report progress (WAL lets it write while the server reads; ``busy_timeout`` covers the
short write overlaps).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["Database", "dumps", "loads", "utcnow"]

_SCHEMA_VERSION = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    source_format TEXT NOT NULL,
    metadata TEXT NOT NULL,
    default_bank TEXT
);
CREATE TABLE IF NOT EXISTS versions (
    model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    parent_version INTEGER,
    dataset_id TEXT,
    job_id TEXT,
    recalibration TEXT,
    report TEXT NOT NULL,
    validation TEXT,
    signature TEXT NOT NULL,
    artifacts TEXT NOT NULL,
    weights_digest TEXT,
    bn_layers TEXT,
    PRIMARY KEY (model_id, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    model_id TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (model_id, alias),
    FOREIGN KEY (model_id, version) REFERENCES versions(model_id, version) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS banks (
    model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    layers TEXT NOT NULL,
    weights_digest TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (model_id, name)
);
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    format TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    tensors TEXT NOT NULL,
    samples INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    state TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    dataset_id TEXT NOT NULL,
    validation_dataset_id TEXT,
    params TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    progress TEXT NOT NULL,
    error TEXT,
    result_version INTEGER,
    promoted INTEGER NOT NULL DEFAULT 0,
    validation TEXT,
    plan TEXT,
    result_bank TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_by_model ON jobs(model_id, created_at);
"""


_ADDED_COLUMNS = (
    ("jobs", "plan TEXT"),  # schema 1 -> 2: the jobs' adaptation plans
    ("versions", "weights_digest TEXT"),  # 2 -> 3: what stat banks are checked against
    ("versions", "bn_layers TEXT"),
    ("jobs", "result_bank TEXT"),  # 2 -> 3: a job that produced a bank
    ("models", "default_bank TEXT"),  # 3 -> 4: the bank requests naming none use
)
"""Columns added after schema 1, as ``(table, "name TYPE")``; nullable, so old rows stay."""


def _add_column(conn: sqlite3.Connection, table: str, column: str) -> None:
    """``ALTER TABLE table ADD COLUMN column`` unless it exists (a concurrent process may
    add it between the check and the ``ALTER``: its duplicate is tolerated)."""
    name = column.split()[0]
    if name in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
        return
    try:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    except sqlite3.OperationalError as exc:  # another process migrated first
        if "duplicate column" not in str(exc):
            raise


def utcnow() -> str:
    """The current UTC time as ISO 8601 with milliseconds (``...+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def dumps(value: Any) -> str:
    """JSON for a column (compact, keys sorted so equal values store equal text)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def loads(text: str | None) -> Any:
    """The value of a JSON column (``None`` for SQL NULL)."""
    return None if text is None else json.loads(text)


class Database:
    """A lazily opened SQLite (WAL) connection shared by threads, with the service schema.

    Args:
        path: the database file (its directory is created on first use).
        timeout: seconds a write waits for another connection's write lock.
    """

    def __init__(self, path: str | Path, *, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self._timeout = timeout
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
            self._migrate(conn)
            self._conn = conn
        return self._conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > _SCHEMA_VERSION:
            raise RuntimeError(
                f"expected a database of schema version <= {_SCHEMA_VERSION} (got {found}); "
                "it was written by a newer recalib"
            )
        conn.executescript(_SCHEMA)  # new tables (schema 3: banks) are created here
        for table, column in _ADDED_COLUMNS:
            _add_column(conn, table, column)
        if 3 <= found < 5:
            # 4 -> 5: weights digests written before could skip weights held in Constant
            # nodes (recalib.onnx.bank_files.weights_digest de-duplicated by id()): they
            # are computed again on first use (Catalog.version_weights)
            conn.execute("UPDATE versions SET weights_digest = NULL")
        conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): committed on exit, rolled back on error."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """All rows of one statement."""
        with self._lock:
            return self._connection().execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        """The first row of one statement, or ``None``."""
        with self._lock:
            row: sqlite3.Row | None = self._connection().execute(sql, params).fetchone()
            return row

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write statement (its own transaction); returns the changed row count."""
        with self._lock:
            return self._connection().execute(sql, params).rowcount

    def close(self) -> None:
        """Close the connection (a later query opens a new one)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
