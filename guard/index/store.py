"""SQLite storage of an index: item metadata (immutable after the build) and the protected registry.

- items.sqlite: one row per indexed item (row = its position in every vector file), detected
  faces, and the images the build skipped. Written during the build in a staging directory, copied
  compacted into the index directory at the end and checksummed by the manifest; opened read-only.
- registry.sqlite (WAL, synchronous=FULL): protections, their vectors, and an append-only mutation
  log. A protection is acknowledged only after its transaction has committed, i.e. after SQLite has
  fsync'ed the WAL, so it survives kill -9 and power loss.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from guard.errors import CorruptData, InvalidInput

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

PROTECTION_KINDS = ("image", "face")


def connect(path: Path, *, readonly: bool = False, wal: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), usable from any thread."""
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA busy_timeout=30000")
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

    def __init__(self, path: Path):
        self.path = Path(path)
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
        return {r: (i, ident) for r, i, ident in
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


@dataclass
class Protection:
    """One active protection with its vectors: signal -> list of (vector, box or None)."""
    pid: str
    kind: str
    subject: str
    reason: str
    created: float
    vectors: dict[str, list[tuple[np.ndarray, list[int] | None]]] = field(default_factory=dict)
    seq: int = 0          # mutation-log sequence number of the protect


class Registry:
    """registry.sqlite: the durable protected registry and its mutation log."""

    def __init__(self, path: Path, *, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise CorruptData(f"{self.path}: missing")
        self._conn = connect(self.path, wal=True)
        self._poll = connect(self.path)   # a second connection: data_version sees others' commits
        self._lock = threading.Lock()
        if create:
            self._conn.executescript(REGISTRY_SCHEMA)

    def add(self, kind: str, subject: str | None, reason: str,
            vectors: list[tuple[str, np.ndarray, list[int] | None]]) -> Protection:
        """Insert a protection and its vectors in one durable transaction; returns it once committed.
        subject: the protected item id or identity name; None uses the new protection id."""
        if kind not in PROTECTION_KINDS:
            raise InvalidInput("kind", f"must be one of {PROTECTION_KINDS}, got {kind!r}")
        if not reason or not reason.strip():
            raise InvalidInput("reason", "a protection needs a non-empty reason (it goes to the audit log)")
        pid = f"prot-{uuid.uuid4().hex[:16]}"
        prot = Protection(pid, kind, subject or pid, reason, time.time())
        subject = prot.subject
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("INSERT INTO protections (pid, kind, subject, reason, created) VALUES (?,?,?,?,?)",
                                   (prot.pid, kind, subject, reason, prot.created))
                for signal, vec, box in vectors:
                    self._conn.execute("INSERT INTO protected_vectors (pid, signal, vec, box) VALUES (?,?,?,?)",
                                       (prot.pid, signal, _encode_vec(vec), json.dumps(box) if box else None))
                    prot.vectors.setdefault(signal, []).append((vec, box))
                prot.seq = self._conn.execute(
                    "INSERT INTO mutations (ts, op, pid, subject, reason) VALUES (?,?,?,?,?)",
                    (prot.created, "protect", prot.pid, subject, reason)).lastrowid
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return prot

    def remove(self, ident: str, reason: str) -> list[tuple[str, int]]:
        """Deactivate the protection with pid `ident`, or every active one whose subject is `ident`.
        Returns (pid, mutation seq) of each, once committed."""
        if not reason or not reason.strip():
            raise InvalidInput("reason", "unprotect needs a non-empty reason (it goes to the audit log)")
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                rows = self._conn.execute(
                    "SELECT pid, subject FROM protections WHERE active = 1 AND (pid = ? OR subject = ?)",
                    (ident, ident)).fetchall()
                done = []
                for pid, subject in rows:
                    self._conn.execute("UPDATE protections SET active = 0, removed = ?, removed_reason = ? "
                                       "WHERE pid = ?", (now, reason, pid))
                    done.append((pid, self._conn.execute(
                        "INSERT INTO mutations (ts, op, pid, subject, reason) VALUES (?,?,?,?,?)",
                        (now, "unprotect", pid, subject, reason)).lastrowid))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        if not rows:
            raise InvalidInput("id", f"no active protection has id or subject {ident!r}")
        return done

    def active(self) -> tuple[int, list[Protection]]:
        """(last mutation seq, every active protection with its vectors), read in one snapshot."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                seq = self._conn.execute("SELECT coalesce(max(seq), 0) FROM mutations").fetchone()[0]
                prots = {pid: Protection(pid, kind, subject, reason, created) for pid, kind, subject, reason, created
                         in self._conn.execute("SELECT pid, kind, subject, reason, created FROM protections "
                                               "WHERE active = 1 ORDER BY created, pid")}
                for pid, signal, blob, box in self._conn.execute(
                        "SELECT v.pid, v.signal, v.vec, v.box FROM protected_vectors v JOIN protections p "
                        "ON p.pid = v.pid WHERE p.active = 1 ORDER BY v.id"):
                    prots[pid].vectors.setdefault(signal, []).append((_decode_vec(blob, self.path),
                                                                       json.loads(box) if box else None))
            finally:
                self._conn.execute("COMMIT")
        return seq, list(prots.values())

    def data_version(self) -> int:
        """Changes whenever another connection (this process or another) commits to the registry."""
        with self._lock:
            return self._poll.execute("PRAGMA data_version").fetchone()[0]

    def last_seq(self) -> int:
        with self._lock:
            return self._poll.execute("SELECT coalesce(max(seq), 0) FROM mutations").fetchone()[0]

    def mutations(self, limit: int = 50) -> list[dict]:
        with self._lock:
            rows = self._conn.execute("SELECT seq, ts, op, pid, subject, reason FROM mutations "
                                      "ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [dict(zip(("seq", "ts", "op", "pid", "subject", "reason"), r)) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            q = self._conn.execute
            return {"protected_images": q("SELECT count(*) FROM protections WHERE active=1 AND kind='image'").fetchone()[0],
                    "protected_identities": q("SELECT count(*) FROM protections WHERE active=1 AND kind='face'").fetchone()[0],
                    "mutations": q("SELECT count(*) FROM mutations").fetchone()[0]}

    def integrity_errors(self) -> list[str]:
        with self._lock:
            return integrity_errors(self._conn, self.path)

    def close(self) -> None:
        self._conn.close()
        self._poll.close()


def _encode_vec(vec: np.ndarray) -> bytes:
    """A vector as bytes: one dtype byte ('f' float32, 'u' uint8) then the raw values."""
    v = np.asarray(vec)
    if v.dtype == np.uint8:
        return b"u" + v.tobytes()
    return b"f" + np.asarray(v, dtype=np.float32).tobytes()


def _decode_vec(blob: bytes, path: Path) -> np.ndarray:
    tag, body = blob[:1], blob[1:]
    if tag == b"u":
        return np.frombuffer(body, dtype=np.uint8).copy()
    if tag == b"f" and len(body) % 4 == 0:
        return np.frombuffer(body, dtype=np.float32).copy()
    raise CorruptData(f"{path}: a protected vector has an unknown encoding")
