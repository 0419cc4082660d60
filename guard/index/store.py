"""SQLite storage of an index: item metadata (immutable after the build) and the protected registry.

- items.sqlite: one row per indexed item (row = its position in every vector file), detected
  faces, and the images the build skipped. Written during the build in a staging directory, copied
  compacted into the index directory at the end and checksummed by the manifest; opened read-only.
- registry.sqlite (WAL, synchronous=FULL, secure_delete): the embedded store of the protected
  registry (memguard.index.registry_sql holds its logic; registry_pg the shared PostgreSQL store). A
  protection is acknowledged only after its transaction has committed, i.e. after SQLite has
  fsync'ed the WAL, so it survives kill -9 and power loss.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from memguard.crypto import DataKey
from memguard.errors import CorruptData, RegistryUnavailable
from memguard.index.registry_sql import V2_COLUMNS, Protection, SqlRegistry
from memguard.index.sealed import open_identity

__all__ = ["ItemStore", "Protection", "Registry", "connect", "integrity_errors"]
log = logging.getLogger(__name__)

ITEMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (row INTEGER PRIMARY KEY, item_id TEXT NOT NULL UNIQUE,
    source TEXT, caption TEXT, meta TEXT);
CREATE TABLE IF NOT EXISTS faces (row INTEGER PRIMARY KEY, item_row INTEGER NOT NULL,
    identity TEXT NOT NULL, box TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS skipped (seq INTEGER PRIMARY KEY, ref TEXT NOT NULL, error TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS build_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

REGISTRY_SCHEMA = """
CREATE TABLE IF NOT EXISTS protections (pid TEXT PRIMARY KEY, kind TEXT NOT NULL, subject TEXT NOT NULL,
    reason TEXT NOT NULL, created REAL NOT NULL, active INTEGER NOT NULL DEFAULT 1,
    removed REAL, removed_reason TEXT);
CREATE INDEX IF NOT EXISTS protections_subject ON protections (subject);
CREATE TABLE IF NOT EXISTS protected_vectors (id INTEGER PRIMARY KEY, pid TEXT NOT NULL,
    signal TEXT NOT NULL, vec BLOB NOT NULL, box TEXT);
CREATE INDEX IF NOT EXISTS protected_vectors_pid ON protected_vectors (pid);
CREATE TABLE IF NOT EXISTS mutations (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,
    op TEXT NOT NULL, pid TEXT NOT NULL, subject TEXT NOT NULL, reason TEXT NOT NULL);
"""
# version 2 (idempotency, dedupe, sealed identity names); added to older registries at their first write
REGISTRY_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, pid TEXT NOT NULL, request TEXT NOT NULL,
    created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS protections_dedupe ON protections (dedupe);
"""



def connect(path: Path, *, readonly: bool = False, wal: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), usable from any thread.
    A database it creates is created 0600 (SQLite gives its -wal and -shm files the same mode);
    deleted content is overwritten with zeros (secure_delete)."""
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    if not readonly and not Path(path).exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA busy_timeout=30000")
        if not readonly:
            conn.execute("PRAGMA secure_delete=ON")
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")   # fsync the WAL at every commit
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        raise CorruptData(f"{path}: not a readable SQLite database ({exc})") from exc
    return conn


def integrity_errors(conn: sqlite3.Connection, path: Path) -> list[str]:
    rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    return [] if rows == ["ok"] else [f"{path}: {r}" for r in rows]


class ItemStore:
    """Read access to items.sqlite. Safe to share between threads (reads are serialised)."""

    def __init__(self, path: Path, key: DataKey | None = None):
        self.path = Path(path)
        self.label = self.path.name
        self.key = key   # opens sealed identity names (memguard.index.sealed)
        self._conn = connect(self.path, readonly=True)
        self._lock = threading.Lock()

    def _query(self, sql: str, args=()) -> list[tuple]:
        with self._lock:
            try:
                return self._conn.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise CorruptData(f"{self.path}: {exc}") from exc

    def ids_of_rows(self, rows: list[int]) -> dict[int, str]:
        """Item ids of vector rows (missing rows are absent from the result)."""
        unique = sorted({int(r) for r in rows if r >= 0})
        out: dict[int, str] = {}
        for start in range(0, len(unique), 900):   # SQLite's bound-parameter limit
            chunk = unique[start:start + 900]
            marks = ",".join("?" * len(chunk))
            out.update(self._query(f"SELECT row, item_id FROM items WHERE row IN ({marks})", chunk))
        return out

    def row_of(self, item_id: str) -> int | None:
        rows = self._query("SELECT row FROM items WHERE item_id = ?", (item_id,))
        return rows[0][0] if rows else None

    def item(self, row: int) -> dict | None:
        rows = self._query("SELECT item_id, source, caption, meta FROM items WHERE row = ?", (row,))
        if not rows:
            return None
        item_id, source, caption, meta = rows[0]
        return {"item_id": item_id, "source": source, "caption": caption, "meta": json.loads(meta or "{}")}

    def faces_of_rows(self, rows: list[int]) -> dict[int, tuple[int, str]]:
        """Face row -> (item row, identity)."""
        unique = sorted({int(r) for r in rows if r >= 0})
        marks = ",".join("?" * len(unique))
        if not unique:
            return {}
        return {r: (i, open_identity(self.key, r, ident)) for r, i, ident in
                self._query(f"SELECT row, item_row, identity FROM faces WHERE row IN ({marks})", unique)}

    def counts(self) -> dict[str, int]:
        return {name: self._query(f"SELECT count(*) FROM {name}")[0][0] for name in ("items", "faces", "skipped")}

    def skipped(self, limit: int = 100) -> list[dict]:
        return [{"ref": r, "error": e} for r, e in
                self._query("SELECT ref, error FROM skipped ORDER BY seq LIMIT ?", (limit,))]

    def integrity_errors(self) -> list[str]:
        with self._lock:
            return integrity_errors(self._conn, self.path)

    def close(self) -> None:
        self._conn.close()


class Registry(SqlRegistry):
    """registry.sqlite (WAL, synchronous=FULL, secure_delete): the embedded protected registry.

    Writers are serialised by BEGIN IMMEDIATE; other processes' commits are seen through
    `PRAGMA data_version` on a second connection, one cheap call per snapshot check."""

    def __init__(self, path: Path, *, create: bool = False, key: DataKey | None = None):
        self.path = Path(path)
        self.label = self.path.name
        if not create and not self.path.is_file():
            raise CorruptData(f"{self.path}: missing")
        super().__init__(key)
        self._conn = connect(self.path, wal=True)
        self._poll = connect(self.path)   # a second connection: data_version sees others' commits
        self._lock = threading.Lock()
        if create:
            self._conn.executescript(REGISTRY_SCHEMA)
            self._migrate(self._conn)

    @contextmanager
    def _transaction(self, write: bool):
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.OperationalError as exc:
                self.errors += 1
                raise RegistryUnavailable(f"{self.path}: {exc}") from exc
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _has_v2(self, conn) -> bool:
        return "subject_enc" in {row[1] for row in conn.execute("PRAGMA table_info(protections)")}

    def _migrate(self, conn) -> None:
        if not self._has_v2(conn):
            for name, kind in V2_COLUMNS:
                conn.execute(f"ALTER TABLE protections ADD COLUMN {name} {kind}")
        for statement in REGISTRY_SCHEMA_V2.strip().split(";"):
            if statement.strip():
                conn.execute(statement)

    def _purge(self) -> None:
        """Rewrite the file without free pages, then copy the WAL back and truncate it to zero bytes,
        so no old page holding erased bytes is left in registry.sqlite or its -wal."""
        with self._lock:
            try:
                self._conn.execute("VACUUM")
                for _ in range(100):
                    busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                    if not busy:
                        return
                    time.sleep(0.05)   # another process is reading: wait for it to finish
            except sqlite3.OperationalError as exc:
                log.error("%s: purge after an erasure failed: %s", self.path, exc)
            else:
                log.error("%s: purge after an erasure: the WAL stayed busy; it is truncated at the next erasure",
                          self.path)
            self.errors += 1

    def version(self) -> int:
        """Changes whenever another connection (this process or another) commits to the registry."""
        with self._lock:
            try:
                return self._poll.execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.OperationalError as exc:
                self.errors += 1
                raise RegistryUnavailable(f"{self.path}: {exc}") from exc

    data_version = version

    def last_seq(self) -> int:
        with self._lock:
            return self._poll.execute("SELECT coalesce(max(seq), 0) FROM mutations").fetchone()[0]

    def integrity_errors(self) -> list[str]:
        with self._lock:
            return integrity_errors(self._conn, self.path)

    def close(self) -> None:
        self._conn.close()
        self._poll.close()
