"""The protected registry: protections, their vectors and an append-only mutation log, in SQL.

One interface, two stores, the same SQL: SQLite (`memguard.index.store.Registry`, the embedded
default, a file in the index directory) and PostgreSQL (`memguard.index.registry_pg.PgRegistry`, one
registry shared by every replica). A store supplies its transactions, its change detection
(`version()`, `last_seq()`) and its purge; everything else is here. Rules both keep:

- a protect or unprotect is acknowledged only after its transaction has committed;
- writers are serialised, so the order of mutation seq numbers is the commit order: a reader that has
  seen seq N has seen every mutation up to N;
- face descriptors and identity names are sealed with the data key (memguard.crypto, AES-GCM); the
  protection row and the mutation log carry only a keyed hash of the identity;
- `reason` is personal data (a takedown's free text names people): with a data key it is stored
  sealed ("sealed:" + base64, bound to its protection), in the protection row and the mutation log;
- unprotecting erases: the protect reason (row and log) always, and for a face its descriptors and
  sealed name; then the store purges old copies of the pages (SQLite: secure_delete, VACUUM, WAL
  truncation; PostgreSQL: VACUUM FULL). The unprotect's own reason stays, sealed;
- the testbeds' public demo key never seals a protection here (refused: it protects nothing); an
  unprotect still erases;
- idempotency: a repeated idempotency key returns the original receipt; without a key, an active
  protection of the same content and subject is returned instead of a duplicate.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memguard.crypto import DataKey, require_key
from memguard.errors import CorruptData, InvalidInput

log = logging.getLogger(__name__)

PROTECTION_KINDS = ("image", "face")
SEALED = b"e"        # vector encoding tag of a sealed (encrypted) vector
SEALED_TEXT = "sealed:"   # prefix of a sealed reason
ERASED = ""               # what an erased reason reads as in the store
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,128}")

# columns added after the first release; SQLite registries gain them at their first write
V2_COLUMNS = (("subject_enc", "BLOB"), ("dedupe", "TEXT"))


@dataclass
class Protection:
    """One protection with its vectors: signal -> list of (vector, box or None)."""
    pid: str
    kind: str
    subject: str          # item id (images) or identity name (faces; the stored form is a keyed hash)
    reason: str
    created: float
    vectors: dict[str, list[tuple[np.ndarray, list[int] | None]]] = field(default_factory=dict)
    seq: int = 0          # mutation-log sequence number of the protect
    replayed: bool = False   # an earlier protection returned for a repeated request
    n_vectors: int = 0


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidInput("idempotency_key", "must be 1 to 128 printable ASCII characters without spaces")
    return key


def content_digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


class SqlRegistry:
    """The registry logic over a DB-API connection given by the store's `_transaction`."""

    label: str = "registry"

    def __init__(self, key: DataKey | None = None):
        self.key = key if key is not None else DataKey.resolve()
        self.errors = 0   # failed reads, writes and purges since open (logged where they happen)

    # ---- what a store provides -------------------------------------------------------------------
    def _transaction(self, write: bool) -> AbstractContextManager[Any]:
        """A transaction on the store's connection: writers serialised, readers on one snapshot."""
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql

    def _has_v2(self, conn) -> bool:
        return True

    def _migrate(self, conn) -> None:
        """Bring the schema up to date (inside a write transaction)."""

    def _after_write(self, conn, seq: int) -> None:
        """Inside the write transaction, after its last mutation (PostgreSQL: NOTIFY)."""

    def _purge(self) -> None:
        """After an erasure committed: remove old copies of erased bytes from the store's files."""

    def version(self) -> Any:
        """Changes whenever anything is committed; raises RegistryUnavailable when out of contact."""
        raise NotImplementedError

    def last_seq(self) -> int:
        raise NotImplementedError

    def integrity_errors(self) -> list[str]:
        return []

    def close(self) -> None:
        pass

    def _q(self, conn, sql: str, args: tuple = ()):
        return conn.execute(self._sql(sql), args)

    # ---- writes ----------------------------------------------------------------------------------
    def add(self, kind: str, subject: str | None, reason: str,
            vectors: list[tuple[str, np.ndarray, list[int] | None]], *,
            idempotency_key: str | None = None, content_hash: str | None = None) -> Protection:
        """Insert a protection and its vectors in one durable transaction; returns it once committed.
        subject: the protected item id or identity name; None uses the new protection id.
        content_hash: a digest of what was protected (dedupes retries that carry no key)."""
        if kind not in PROTECTION_KINDS:
            raise InvalidInput("kind", f"must be one of {PROTECTION_KINDS}, got {kind!r}")
        if not reason or not reason.strip():
            raise InvalidInput("reason", "a protection needs a non-empty reason (it goes to the audit log)")
        self._refuse_demo_key()
        idempotency_key = check_idempotency_key(idempotency_key)
        key = require_key(self.key, "protect a face") if kind == "face" else None
        pid = f"prot-{uuid.uuid4().hex[:16]}"
        prot = Protection(pid, kind, subject or pid, reason, time.time(), n_vectors=len(vectors))
        request = content_digest(kind, subject or "", content_hash or "")
        dedupe = None if content_hash is None else key.tag(request) if key else f"sha256:{request}"
        stored_subject = key.tag(prot.subject) if key else prot.subject
        sealed_name = key.seal(prot.subject.encode(), f"{pid}/identity") if key else None
        stored_reason = self._seal_text(reason, f"{pid}/reason")
        with self._transaction(write=True) as conn:
            self._migrate(conn)
            earlier = self._replay(conn, idempotency_key, request, dedupe)
            if earlier is not None:
                return earlier
            self._q(conn, "INSERT INTO protections (pid, kind, subject, reason, created, subject_enc, dedupe) "
                          "VALUES (?,?,?,?,?,?,?)",
                    (pid, kind, stored_subject, stored_reason, prot.created, sealed_name, dedupe))
            for signal, vec, box in vectors:
                blob = _encode_vec(vec)
                if key:
                    blob = SEALED + key.seal(blob, f"{pid}/{signal}")
                self._q(conn, "INSERT INTO protected_vectors (pid, signal, vec, box) VALUES (?,?,?,?)",
                        (pid, signal, blob, json.dumps(box) if box else None))
                prot.vectors.setdefault(signal, []).append((vec, box))
            prot.seq = self._log(conn, prot.created, "protect", pid, stored_subject, stored_reason)
            if idempotency_key is not None:
                self._q(conn, "INSERT INTO idempotency (key, pid, request, created) VALUES (?,?,?,?)",
                        (idempotency_key, pid, request, prot.created))
            self._after_write(conn, prot.seq)
        return prot

    def _log(self, conn, ts: float, op: str, pid: str, subject: str, reason: str) -> int:
        return self._q(conn, "INSERT INTO mutations (ts, op, pid, subject, reason) VALUES (?,?,?,?,?) RETURNING seq",
                       (ts, op, pid, subject, reason)).fetchone()[0]

    def _replay(self, conn, idempotency_key: str | None, request: str, dedupe: str | None) -> Protection | None:
        """The earlier protection this request repeats (same key, or same content and subject), if any."""
        pid = None
        if idempotency_key is not None:
            row = self._q(conn, "SELECT pid, request FROM idempotency WHERE key = ?", (idempotency_key,)).fetchone()
            if row is not None and row[1] != request:
                raise InvalidInput("idempotency_key", "was already used for a different protection request")
            pid = row[0] if row else None
        if pid is None and dedupe is not None:
            row = self._q(conn, "SELECT pid FROM protections WHERE active = 1 AND dedupe = ?", (dedupe,)).fetchone()
            pid = row[0] if row else None
            if pid is not None and idempotency_key is not None:
                self._q(conn, "INSERT INTO idempotency (key, pid, request, created) VALUES (?,?,?,?)",
                        (idempotency_key, pid, request, time.time()))
        return None if pid is None else self._receipt(conn, pid)

    def _receipt(self, conn, pid: str) -> Protection:
        kind, subject, reason, created, sealed = self._q(
            conn, "SELECT kind, subject, reason, created, subject_enc FROM protections WHERE pid = ?", (pid,)).fetchone()
        seq = self._q(conn, "SELECT min(seq) FROM mutations WHERE pid = ? AND op = 'protect'", (pid,)).fetchone()[0]
        count = self._q(conn, "SELECT count(*) FROM protected_vectors WHERE pid = ?", (pid,)).fetchone()[0]
        return Protection(pid, kind, self._subject(pid, subject, sealed), self._reason(pid, reason), created,
                          seq=seq, replayed=True, n_vectors=count)

    def remove(self, ident: str, reason: str) -> list[tuple[str, int]]:
        """Deactivate the protection with pid `ident`, or every active one whose subject is `ident`.
        A face is erased: its descriptors and sealed name are deleted. Returns (pid, mutation seq)
        of each, once committed."""
        if not reason or not reason.strip():
            raise InvalidInput("reason", "unprotect needs a non-empty reason (it goes to the audit log)")
        now = time.time()
        tagged = self.key.tag(ident) if self.key else ident
        with self._transaction(write=True) as conn:
            self._migrate(conn)
            rows = self._q(conn, "SELECT pid, kind, subject FROM protections WHERE active = 1 "
                                 "AND (pid = ? OR subject = ? OR subject = ?)", (ident, ident, tagged)).fetchall()
            done = []
            for pid, kind, subject in rows:
                removed_reason = self._seal_text(reason, f"{pid}/removed_reason")
                # the protect reason is erased with the protection, in the row and in the log
                self._q(conn, "UPDATE protections SET active = 0, removed = ?, removed_reason = ?, reason = ? "
                              "WHERE pid = ?", (now, removed_reason, ERASED, pid))
                self._q(conn, "UPDATE mutations SET reason = ? WHERE pid = ? AND op = 'protect'", (ERASED, pid))
                if kind == "face":
                    self._q(conn, "DELETE FROM protected_vectors WHERE pid = ?", (pid,))
                    self._q(conn, "UPDATE protections SET subject_enc = NULL, dedupe = NULL WHERE pid = ?", (pid,))
                done.append((pid, self._log(conn, now, "unprotect", pid, subject, removed_reason)))
            if done:
                self._after_write(conn, done[-1][1])
        if not rows:
            raise InvalidInput("id", "no active protection has this id or subject")
        self._purge()               # erased reasons (and faces): no old page keeps them
        return done

    # ---- reads -----------------------------------------------------------------------------------
    def active(self) -> tuple[int, list[Protection]]:
        """(last mutation seq, every active protection with its vectors), read in one snapshot."""
        with self._transaction(write=False) as conn:
            sealed = "subject_enc" if self._has_v2(conn) else "NULL"
            seq = self._q(conn, "SELECT coalesce(max(seq), 0) FROM mutations").fetchone()[0]
            prots = {pid: Protection(pid, kind, self._subject(pid, subject, name), self._reason(pid, reason), created)
                     for pid, kind, subject, reason, created, name in self._q(
                         conn, f"SELECT pid, kind, subject, reason, created, {sealed} FROM protections "
                               "WHERE active = 1 ORDER BY created, pid").fetchall()}
            for pid, signal, blob, box in self._q(
                    conn, "SELECT v.pid, v.signal, v.vec, v.box FROM protected_vectors v JOIN protections p "
                          "ON p.pid = v.pid WHERE p.active = 1 ORDER BY v.id").fetchall():
                prots[pid].vectors.setdefault(signal, []).append((self._vector(pid, signal, bytes(blob)),
                                                                   json.loads(box) if box else None))
        for prot in prots.values():
            prot.seq, prot.n_vectors = seq, sum(len(v) for v in prot.vectors.values())
        return seq, list(prots.values())

    def _subject(self, pid: str, stored: str, sealed: bytes | None) -> str:
        if sealed is None:
            return stored
        return require_key(self.key, "read protected identities").open(bytes(sealed), f"{pid}/identity").decode()

    def _refuse_demo_key(self) -> None:
        if self.key is not None and self.key.is_demo:
            raise InvalidInput("data_key", "is the testbeds' PUBLIC demo key: the protected registry does not seal "
                                           "with it (it protects nothing); configure a key of your own "
                                           "(`python -m memguard.crypto FILE`)")

    def _seal_text(self, text: str, aad: str) -> str:
        """Free text (a reason) as stored: sealed with the data key, or as is without one."""
        if self.key is None:
            return text
        return SEALED_TEXT + base64.b64encode(self.key.seal(text.encode(), aad)).decode()

    def _reason(self, pid: str, stored: str, aad: str = "reason") -> str:
        if not stored.startswith(SEALED_TEXT):
            return stored
        if self.key is None:
            return "[sealed]"
        return self.key.open(base64.b64decode(stored[len(SEALED_TEXT):]), f"{pid}/{aad}").decode()

    def _vector(self, pid: str, signal: str, blob: bytes) -> np.ndarray:
        if blob[:1] == SEALED:
            blob = require_key(self.key, "read protected face descriptors").open(blob[1:], f"{pid}/{signal}")
        return _decode_vec(blob, self.label)

    def mutations(self, limit: int = 50) -> list[dict]:
        with self._transaction(write=False) as conn:
            rows = self._q(conn, "SELECT seq, ts, op, pid, subject, reason FROM mutations "
                                 "ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [dict(zip(("seq", "ts", "op", "pid", "subject", "reason"),
                         (*r[:5], self._reason(r[3], r[5], "reason" if r[2] == "protect" else "removed_reason"))))
                for r in rows]

    def counts(self) -> dict[str, int]:
        with self._transaction(write=False) as conn:
            def one(sql: str) -> int:
                return self._q(conn, sql).fetchone()[0]
            return {"protected_images": one("SELECT count(*) FROM protections WHERE active = 1 AND kind = 'image'"),
                    "protected_identities": one("SELECT count(*) FROM protections WHERE active = 1 AND kind = 'face'"),
                    "mutations": one("SELECT count(*) FROM mutations"),
                    "registry_errors": self.errors}


def _encode_vec(vec: np.ndarray) -> bytes:
    """A vector as bytes: one dtype byte ('f' float32, 'u' uint8) then the raw values."""
    v = np.asarray(vec)
    if v.dtype == np.uint8:
        return b"u" + v.tobytes()
    return b"f" + np.asarray(v, dtype=np.float32).tobytes()


def _decode_vec(blob: bytes, where: str) -> np.ndarray:
    tag, body = blob[:1], blob[1:]
    if tag == b"u":
        return np.frombuffer(body, dtype=np.uint8).copy()
    if tag == b"f" and len(body) % 4 == 0:
        return np.frombuffer(body, dtype=np.float32).copy()
    raise CorruptData(f"{where}: a protected vector has an unknown encoding")
