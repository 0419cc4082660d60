"""The protected registry in PostgreSQL: one registry and mutation log shared by every replica.

    registry = PgRegistry("postgresql://memguard@db:5432/memguard")

Writes take a transaction-scoped advisory lock, so mutation seq numbers are assigned and
committed in one order, and NOTIFY `memguard_registry` with the new seq inside the transaction
(delivered at commit). A watcher thread per replica LISTENs on its own connection and polls
`max(seq)` every `poll_s` as a heartbeat (and in case a notification was lost across a reconnect).
`version()` is what the index checks on each call: the watcher's (connection epoch, latest seq),
read from memory, no round trip. When the watcher has had no answer from the server for
`stale_after_s`, `version()` asks the server itself, and raises RegistryUnavailable when that fails
too: the replica fails closed (Screen and Protect answer UNAVAILABLE, guarded generation releases
nothing, health goes NOT_SERVING) until contact is back. With stale_after_s < 1 s, an acknowledged
Protect is enforced by every replica within 1 s, or that replica refuses to screen.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from memguard.crypto import DataKey
from memguard.errors import InvalidInput, RegistryUnavailable, MissingResource
from memguard.index.registry_sql import SqlRegistry

log = logging.getLogger(__name__)

CHANNEL = "memguard_registry"
WRITE_LOCK = 0x6D656D67   # pg_advisory_xact_lock key of registry writers ("memg")

PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS protections (pid TEXT PRIMARY KEY, kind TEXT NOT NULL, subject TEXT NOT NULL,
    reason TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, active INTEGER NOT NULL DEFAULT 1,
    removed DOUBLE PRECISION, removed_reason TEXT, subject_enc BYTEA, dedupe TEXT);
CREATE INDEX IF NOT EXISTS protections_subject ON protections (subject);
CREATE INDEX IF NOT EXISTS protections_dedupe ON protections (dedupe);
CREATE TABLE IF NOT EXISTS protected_vectors (id BIGSERIAL PRIMARY KEY, pid TEXT NOT NULL,
    signal TEXT NOT NULL, vec BYTEA NOT NULL, box TEXT);
CREATE INDEX IF NOT EXISTS protected_vectors_pid ON protected_vectors (pid);
CREATE TABLE IF NOT EXISTS mutations (seq BIGSERIAL PRIMARY KEY, ts DOUBLE PRECISION NOT NULL,
    op TEXT NOT NULL, pid TEXT NOT NULL, subject TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, pid TEXT NOT NULL, request TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL);
"""


@dataclass(frozen=True)
class PgSettings:
    poll_s: float = 0.1            # heartbeat / seq poll of the watcher
    stale_after_s: float = 0.8     # no answer for this long: ask directly, then fail closed
    connect_timeout_s: int = 2
    statement_timeout_ms: int = 5000

    def validate(self) -> None:
        if not 0 < self.poll_s < self.stale_after_s:
            raise InvalidInput("registry.poll_s", f"must be above 0 and below stale_after_s ({self.stale_after_s})")


def _psycopg():
    try:
        import psycopg
    except ImportError as exc:
        raise MissingResource(f"a postgresql:// registry needs psycopg 3 (pip install 'psycopg[binary]'): {exc}") from exc
    return psycopg


def redact(uri: str) -> str:
    """The URI without its password, for messages and logs."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(uri)
    except Exception as exc:   # noqa: BLE001 - any parse failure is the caller's bad URI
        raise InvalidInput("registry", f"not a PostgreSQL connection URI ({type(exc).__name__})") from exc
    return f"postgresql://{info.get('user', '')}@{info.get('host', '')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


class _Watcher(threading.Thread):
    """LISTEN for commits and poll max(seq): keeps `seq`, `epoch` and `last_ok` current."""

    def __init__(self, registry: "PgRegistry"):
        super().__init__(name="memguard-registry-watch", daemon=True)
        self.registry = registry
        self.seq, self.epoch, self.last_ok = 0, 0, float("-inf")
        self.contact = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        psycopg, reg = _psycopg(), self.registry
        outage = False
        while not self._halt.is_set():
            try:
                with psycopg.connect(reg.uri, autocommit=True, **reg.connect_kwargs()) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.epoch += 1
                    while not self._halt.is_set():
                        seq = conn.execute("SELECT coalesce(max(seq), 0) FROM mutations").fetchone()[0]
                        self.seq, self.last_ok = max(self.seq, seq), time.monotonic()
                        self.contact.set()
                        if outage:
                            log.warning("registry %s: contact restored", reg.label)
                            outage = False
                        for note in conn.notifies(timeout=reg.settings.poll_s):
                            self.seq, self.last_ok = max(self.seq, int(note.payload)), time.monotonic()
            except psycopg.Error as exc:
                reg.errors += 1
                if not outage:
                    log.error("registry %s: lost contact (%s); failing closed until it is back", reg.label, exc)
                    outage = True
                self._halt.wait(reg.settings.poll_s)

    def stop(self) -> None:
        self._halt.set()


class PgRegistry(SqlRegistry):
    def __init__(self, uri: str, *, key: DataKey | None = None, settings: PgSettings = PgSettings()):
        psycopg = _psycopg()
        settings.validate()
        super().__init__(key)
        self.uri, self.label, self.settings = uri, redact(uri), settings
        self._psycopg = psycopg
        self._lock = threading.Lock()
        self._conn = None
        with self._transaction(write=True) as conn:   # concurrent first starts: the lock serialises them
            conn.execute(PG_SCHEMA)
        self._watcher = _Watcher(self)
        self._watcher.start()
        if not self._watcher.contact.wait(settings.connect_timeout_s + 1.0):
            self.close()
            raise RegistryUnavailable(f"registry {self.label}: the change watcher could not connect")

    def connect_kwargs(self) -> dict:
        s = self.settings
        return {"connect_timeout": s.connect_timeout_s, "application_name": "memguard",
                "options": f"-c statement_timeout={s.statement_timeout_ms} -c lock_timeout={s.statement_timeout_ms}",
                "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2}

    def _connection(self):
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._psycopg.connect(self.uri, autocommit=True, **self.connect_kwargs())
        return self._conn

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def _transaction(self, write: bool):
        psycopg = self._psycopg
        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction():
                    if write:
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                    else:
                        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    yield conn
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self.errors += 1
                if self._conn is not None:
                    self._conn.close()
                raise RegistryUnavailable(f"registry {self.label}: {str(exc).strip()}") from exc

    def _after_write(self, conn, seq: int) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))

    def _purge(self) -> None:
        """Rewrite the two tables that held the erased face, so no dead tuple keeps its sealed bytes."""
        try:
            with self._lock:
                conn = self._connection()
                conn.execute("VACUUM FULL protected_vectors")
                conn.execute("VACUUM FULL protections")
        except self._psycopg.Error as exc:
            self.errors += 1
            log.error("registry %s: purge after an erasure failed: %s", self.label, exc)

    def version(self) -> tuple[int, int]:
        watcher = self._watcher
        if time.monotonic() - watcher.last_ok > self.settings.stale_after_s:
            self._check()   # the watcher is behind (reconnecting, or starved of CPU): ask directly
        return watcher.epoch, watcher.seq

    def _check(self) -> None:
        """Read max(seq) on the query connection; RegistryUnavailable if the server does not answer."""
        with self._transaction(write=False) as conn:
            seq = conn.execute("SELECT coalesce(max(seq), 0) FROM mutations").fetchone()[0]
        watcher = self._watcher
        watcher.seq, watcher.last_ok = max(watcher.seq, seq), time.monotonic()

    def last_seq(self) -> int:
        return self._watcher.seq

    def close(self) -> None:
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher.stop()
            watcher.join(timeout=5)
        with self._lock:
            if self._conn is not None:
                self._conn.close()
