"""The audit log: append-only JSONL, chained with a keyed MAC, one file per process, created 0600.

Each line is one entry, serialized canonically (sorted keys, no spaces) and carrying `prev` (the
`hash` of the entry before it; 64 zeros for the first) and `hash`: HMAC-SHA256 of the entry's
canonical JSON without `hash`, under the audit key (`key` names its id). Any edit — one byte, a
dropped or reordered line, an entry rewritten with its chain recomputed — breaks the chain at that
line for whoever holds the key; `memguard audit verify FILE` finds it. Without an audit key the
chain is plain sha256 (`key` absent): it shows accidents, not an editor, and the server says so.

The audit key (32 bytes, hex or base64) comes from MEMGUARD_AUDIT_KEY or the file named by
MEMGUARD_AUDIT_KEY_FILE, and must not be the data key (memguard.crypto). `python -m memguard.audit
keygen FILE` writes one (0600).

Cutting the newest entries leaves a valid chain: it shows only against a head published elsewhere.
The log publishes its head (sequence number and hash) in the process log at open, at close and at
most once a minute while it changes; the server exports the sequence as `memguard_audit_sequence`.
`verify --head SEQ:HASH` checks a published head is still in the file.

One process writes one file: the file is locked (fcntl.flock) while open, and a second writer is
refused. `{hostname}` and `{pid}` in the path are replaced (one file per replica). A write that is
short or fails is rolled back (the file truncated to its last entry) and raises; if even that fails
the log refuses every later entry (fail closed). A torn last line found at open (no newline: a
crash mid-write) is moved aside to FILE.torn-TIME, logged, and recorded as an entry; the chain
continues from the last whole entry.

    who        key name of the caller ("anonymous" for a failed authentication)
    time       UTC, ISO 8601
    rpc        Generate, GenerateStream, Screen, Protect, Unprotect, auth, audit, …
    request_id the caller's (validated) or the server's request id (may be empty)
    outcome    OK, a decision (BLOCKED, REROUTED, …) or a status code name
    details    small JSON object: matched item ids, protection ids, keyed tags of names and
               reasons; never a name, a reason or the prompt of a request

    memguard audit verify audit.jsonl [--head 41:ab12…]   # exit 0: chain intact; 1: broken (line and why)
    memguard audit export audit.jsonl --rpc Protect --since 2026-12-01 > out.jsonl
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from memguard.crypto import parse_key, warn_if_readable
from memguard.errors import CorruptData, InvalidInput, MemGuardError, MissingResource

log = logging.getLogger(__name__)

GENESIS = "0" * 64
MAX_FIELD_CHARS = 256        # who / rpc / request_id / outcome are clipped to this
ENV_AUDIT_KEY = "MEMGUARD_AUDIT_KEY"
ENV_AUDIT_KEY_FILE = "MEMGUARD_AUDIT_KEY_FILE"
PUBLISH_EVERY_S = 60.0


class AuditLogBusy(MemGuardError):
    """Another process holds the audit log file."""


class AuditWriteError(MemGuardError):
    """An entry could not be written whole (it was rolled back, or the log is closed for writing)."""


def _parse_key(text: str, where: str) -> bytes:
    return parse_key(text, where, "`python -m memguard.audit keygen FILE`")


class AuditKey:
    """The audit key: a chain sub-key (HMAC of each entry) and a tag sub-key (keyed tags of names and
    reasons), both derived from it. repr() never shows key bytes."""

    def __init__(self, raw: bytes):
        if len(raw) != 32:
            raise InvalidInput("audit_key", f"must be 32 bytes, got {len(raw)}")
        self._chain = hmac.new(raw, b"memguard audit chain v1", hashlib.sha256).digest()
        self._tag = hmac.new(raw, b"memguard audit tag v1", hashlib.sha256).digest()
        self.key_id = hashlib.sha256(b"memguard audit key id\0" + self._chain).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"AuditKey(key_id={self.key_id!r})"

    def mac(self, data: bytes) -> str:
        return hmac.new(self._chain, data, hashlib.sha256).hexdigest()

    def tag(self, kind: str, text: str) -> str:
        return "hmac:" + hmac.new(self._tag, f"{kind}\0{text}".encode(), hashlib.sha256).hexdigest()[:32]

    @classmethod
    def resolve(cls, key: "AuditKey | bytes | str | None" = None) -> "AuditKey | None":
        """The given key, else MEMGUARD_AUDIT_KEY, else the file named by MEMGUARD_AUDIT_KEY_FILE, else
        None. Refuses the data key (one key, one job)."""
        if isinstance(key, AuditKey):
            return key
        if isinstance(key, bytes):
            raw = key
        elif isinstance(key, str):
            raw = _parse_key(key, "audit_key")
        elif os.environ.get(ENV_AUDIT_KEY):
            raw = _parse_key(os.environ[ENV_AUDIT_KEY], ENV_AUDIT_KEY)
        elif os.environ.get(ENV_AUDIT_KEY_FILE):
            path = Path(os.environ[ENV_AUDIT_KEY_FILE])
            if not path.is_file():
                raise MissingResource(f"{ENV_AUDIT_KEY_FILE}: {path} does not exist")
            warn_if_readable(path, "audit key file")
            raw = _parse_key(path.read_text(), str(path))
        else:
            return None
        if _is_data_key(raw):
            raise InvalidInput("audit_key", "is the data key: give the audit log a key of its own")
        return cls(raw)


def _is_data_key(raw: bytes) -> bool:
    from memguard.crypto import DataKey

    try:
        data = DataKey.resolve()
    except Exception:          # no usable data key: nothing to compare with
        return False
    return data is not None and DataKey.from_bytes(raw).key_id == data.key_id


def canonical(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def entry_hash(entry: dict[str, Any], key: AuditKey | None = None) -> str:
    """The entry's chain hash: HMAC-SHA256 under `key` for a keyed entry, sha256 for an unkeyed one."""
    body = canonical({k: v for k, v in entry.items() if k != "hash"}).encode()
    if "key" in entry:
        if key is None:
            raise MissingResource(f"the entry is keyed (audit key id {entry['key']}): set {ENV_AUDIT_KEY_FILE}")
        return key.mac(body)
    return hashlib.sha256(body).hexdigest()


def _clip(value: Any) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + "…"


def expand_path(path: str | Path) -> Path:
    """`{hostname}` and `{pid}` in an audit log path → this host's name and this process's id."""
    text = str(path)
    if "{" in text:
        host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname()) or "host"
        text = text.replace("{hostname}", host).replace("{pid}", str(os.getpid()))
    return Path(text)


class AuditLog:
    """Appends chained entries to `path` (thread-safe); fsyncs each entry; holds an exclusive lock on
    the file while open. `key`: an AuditKey (default: from the environment); `require_key`: refuse
    to open without one (a keyed log always needs its key)."""

    def __init__(self, path: str | Path, *, fsync: bool = True, key: AuditKey | bytes | str | None = None,
                 require_key: bool = False, publish_every_s: float = PUBLISH_EVERY_S, on_append=None):
        self.path = expand_path(path)
        self.fsync = fsync
        self.key = AuditKey.resolve(key)
        self.publish_every_s = publish_every_s
        self.on_append = on_append            # (seq, head) after each entry (the server's gauge)
        self._lock = threading.Lock()
        self._broken: str | None = None
        if self.key is None and require_key:
            raise MissingResource(f"no audit key: set {ENV_AUDIT_KEY_FILE} (`python -m memguard.audit keygen FILE`)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AuditLogBusy(f"audit log {self.path} is in use by another process: give each replica "
                               "its own file (e.g. audit-{hostname}.jsonl)") from None
        self._fd = fd
        try:
            os.fchmod(fd, 0o600)
            torn = self._quarantine_torn_tail()
            self._head, self._seq = self._read_head()
        except BaseException:
            os.close(fd)
            self._fd = -1
            raise
        if self.key is None:
            log.warning("audit log %s has no audit key: its sha256 chain shows accidents, not edits (anyone "
                        "who can write the file can rewrite it and recompute the chain); set %s",
                        self.path, ENV_AUDIT_KEY_FILE)
        self._published = 0.0
        if torn is not None:
            self.record(who="memguard", rpc="audit", outcome="QUARANTINED", **torn)
        self.publish("opened")

    # ---- open ------------------------------------------------------------------------------------
    def _quarantine_torn_tail(self) -> dict[str, Any] | None:
        """A last line without its newline (a crash mid-write) → FILE.torn-TIME; the file ends at the
        last whole line. Returns what was moved (for the entry that records it)."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return None
        tail_start, block = size, 4096
        while tail_start > 0:
            start = max(0, tail_start - block)
            chunk = os.pread(self._fd, tail_start - start, start)
            if start + len(chunk) == size and chunk.endswith(b"\n"):
                return None                 # ends with a whole line
            at = chunk.rfind(b"\n")
            if at >= 0:
                tail_start = start + at + 1
                break
            tail_start = start
        torn = os.pread(self._fd, size - tail_start, tail_start)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        aside = self.path.with_name(f"{self.path.name}.torn-{stamp}")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, torn)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.ftruncate(self._fd, tail_start)
        os.fsync(self._fd)
        log.warning("audit log %s: its last line was torn (%d bytes without a newline, a crash mid-write?); "
                    "moved to %s, the chain continues from the last whole entry", self.path, len(torn), aside)
        return {"torn_bytes": len(torn), "torn_sha256": hashlib.sha256(torn).hexdigest(), "moved_to": aside.name}

    def _read_head(self) -> tuple[str, int]:
        last = _last_line(self.path)
        if last is None:
            return GENESIS, 0
        try:
            entry = json.loads(last)
            head, seq = entry["hash"], int(entry["seq"]) + 1
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptData(f"audit log {self.path}: last line is not an audit entry ({exc}); "
                              "run `memguard audit verify`") from exc
        if "key" in entry:
            if self.key is None:
                raise MissingResource(f"audit log {self.path} is keyed (key id {entry['key']}): set "
                                      f"{ENV_AUDIT_KEY_FILE} to continue it")
            if entry["key"] != self.key.key_id:
                raise CorruptData(f"audit log {self.path}: keyed with key id {entry['key']}, the configured "
                                  f"audit key is {self.key.key_id}")
        elif self.key is not None and seq:
            log.warning("audit log %s: entries up to seq %d are unkeyed; keyed from here on", self.path, seq - 1)
        if canonical(entry) != last.decode("utf-8", "surrogateescape") or entry_hash(entry, self.key) != head:
            raise CorruptData(f"audit log {self.path}: the last entry (seq {seq - 1}) does not match its hash "
                              "(edited?); run `memguard audit verify`")
        return head, seq

    # ---- state -----------------------------------------------------------------------------------
    @property
    def head(self) -> str:
        return self._head

    @property
    def seq(self) -> int:
        """The sequence number of the newest entry (-1: none yet)."""
        return self._seq - 1

    def publish(self, why: str = "head") -> None:
        """Log the head (seq and hash): copy it somewhere else to detect a cut tail later."""
        self._published = time.monotonic()
        log.info("audit log %s %s: head seq %d hash %s (key id %s)", self.path, why, self.seq, self._head,
                 self.key.key_id if self.key else "none: unkeyed")

    # ---- writes ----------------------------------------------------------------------------------
    def record(self, *, who: str, rpc: str, outcome: str, request_id: str | None = None,
               **details: Any) -> dict[str, Any]:
        """Append one entry; return it (with its hash). Raises AuditWriteError when it is not written whole."""
        with self._lock:
            if self._fd < 0:
                raise AuditWriteError(f"audit log {self.path} is closed")
            if self._broken:
                raise AuditWriteError(f"audit log {self.path} refuses entries: {self._broken}")
            entry = {"seq": self._seq, "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                     "who": _clip(who), "rpc": _clip(rpc), "request_id": _clip(request_id),
                     "outcome": _clip(outcome), "details": details, "prev": self._head}
            if self.key is not None:
                entry["key"] = self.key.key_id
            entry = json.loads(canonical(entry))    # what verify will read back (str() of odd values)
            entry["hash"] = entry_hash(entry, self.key)
            self._append((canonical(entry) + "\n").encode())
            self._head, self._seq = entry["hash"], self._seq + 1
            seq, head = self._seq - 1, self._head
            due = time.monotonic() - self._published >= self.publish_every_s
        if self.on_append is not None:
            self.on_append(seq, head)
        if due:
            self.publish()
        return entry

    def _append(self, data: bytes) -> None:
        """Write `data` whole or not at all: a short or failed write is truncated away and raises."""
        offset = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write: {written} of {len(data)} bytes")
            if self.fsync:
                os.fsync(self._fd)
        except BaseException as exc:
            try:
                os.ftruncate(self._fd, offset)
                os.fsync(self._fd)
            except OSError as undo:
                self._broken = f"a failed write could not be rolled back ({undo}); restart to quarantine it"
                log.error("audit log %s: %s", self.path, self._broken)
            raise AuditWriteError(f"audit log {self.path}: entry not written ({exc})") from exc

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self.publish("closed")
                os.close(self._fd)      # releases the lock
                self._fd = -1


def _last_line(path: Path) -> bytes | None:
    """The file's last non-empty line, read from the end (the log may be large)."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        block, data = 4096, b""
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            data = f.read(end - start) + data
            end = start
            lines = data.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or start == 0:
                return lines[-1] if lines[-1] else None
    return None


@dataclass
class Verification:
    ok: bool
    entries: int
    head: str
    error: str | None = None       # "line N: why"
    keyed: bool = False            # every entry verified under the audit key


def iter_entries(path: str | Path) -> Iterator[tuple[int, str, dict[str, Any] | None]]:
    """(line number, raw line, parsed entry or None) for every line."""
    with Path(path).open("r", encoding="utf-8", errors="surrogateescape") as f:
        for number, raw in enumerate(f, 1):
            raw = raw.rstrip("\n")
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = None
            yield number, raw, entry if isinstance(entry, dict) else None


def verify(path: str | Path, key: AuditKey | bytes | str | None = None, *,
           head: tuple[int, str] | None = None, allow_unkeyed_prefix: bool = False) -> Verification:
    """Walk the chain; the first line that does not follow stops it. With an audit key (default: the
    environment's) every entry must be keyed with it (an unkeyed entry is what an editor without the
    key would write), except leading ones with `allow_unkeyed_prefix` (a log from before the key).
    `head` (seq, hash): a head published earlier, which must still be in the file (a cut tail)."""
    key = AuditKey.resolve(key)
    last, count, keyed_seen = GENESIS, 0, False
    found_head = head is None
    for number, raw, entry in iter_entries(path):
        fail = lambda why: Verification(False, count, last, f"line {number}: {why}")   # noqa: E731
        if entry is None:
            return fail("not a JSON object")
        if canonical(entry) != raw:
            return fail("not in canonical form (edited?)")
        if entry.get("seq") != count:
            return fail(f"seq {entry.get('seq')} where {count} was due")
        if entry.get("prev") != last:
            return fail("prev does not match the previous entry's hash")
        if "key" in entry:
            if key is None:
                return fail(f"keyed entry (audit key id {entry['key']}): set {ENV_AUDIT_KEY_FILE} to verify it")
            if entry["key"] != key.key_id:
                return fail(f"keyed with key id {entry['key']}, not the given key {key.key_id}")
            keyed_seen = True
        elif key is not None and (keyed_seen or not allow_unkeyed_prefix):
            return fail("an unkeyed entry where the audit key was given (rewritten without the key?)")
        if entry.get("hash") != entry_hash(entry, key):
            return fail("hash does not match its content")
        last, count = entry["hash"], count + 1
        if head is not None and entry["seq"] == head[0]:
            if entry["hash"] != head[1]:
                return fail(f"seq {head[0]} has hash {entry['hash']}, not the published head {head[1]}")
            found_head = True
    if not found_head:
        return Verification(False, count, last, f"the published head seq {head[0]} is not in the file "
                            f"({count} entries): its newest entries were cut")
    return Verification(True, count, last, keyed=key is not None and count > 0 and keyed_seen)


# ----------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser("audit", help="verify or export the server's chained audit log; make an audit key")
    sub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    v = sub.add_parser("verify", help="check the chain; exit 1 at the first broken line")
    v.add_argument("file", type=Path)
    e = sub.add_parser("export", help="print the entries as JSONL (after verifying the chain)")
    e.add_argument("file", type=Path)
    e.add_argument("--rpc", action="append", help="only these RPCs (repeatable)")
    e.add_argument("--who", help="only this key name")
    e.add_argument("--since", help="only entries at or after this ISO time (UTC), e.g. 2026-12-01")
    e.add_argument("--out", type=Path, help="write here instead of stdout")
    e.add_argument("--force", action="store_true", help="export even when the chain is broken")
    for q in (v, e):
        q.add_argument("--key-file", type=Path, help=f"the audit key (default: ${ENV_AUDIT_KEY} or ${ENV_AUDIT_KEY_FILE})")
        q.add_argument("--head", help="SEQ:HASH, a head the server published earlier: it must still be in the file")
        q.add_argument("--allow-unkeyed-prefix", action="store_true",
                       help="accept unkeyed entries before the first keyed one (a log begun before its key)")
    v.set_defaults(func=_verify_cli)
    e.set_defaults(func=_export_cli)
    k = sub.add_parser("keygen", help="write a new audit key to a file (0600; refuses to overwrite)")
    k.add_argument("file", type=Path)
    k.set_defaults(func=_keygen_cli)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise MissingResource(f"audit log {path} does not exist")


def _verify_args(args) -> Verification:
    _check_file(args.file)
    key = None
    if args.key_file:
        warn_if_readable(args.key_file, "audit key file")
        key = _parse_key(args.key_file.read_text(), str(args.key_file))
    head = None
    if args.head:
        seq, _, digest = args.head.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise InvalidInput("--head", "expected SEQ:HASH (the 64 hex digits the server logged)")
        head = (int(seq), digest)
    return verify(args.file, key, head=head, allow_unkeyed_prefix=args.allow_unkeyed_prefix)


def _verify_cli(args) -> int:
    result = _verify_args(args)
    if result.ok:
        how = "keyed (HMAC-SHA256)" if result.keyed else "UNKEYED (sha256: shows accidents, not edits)"
        print(f"{args.file}: chain intact, {result.entries} entries, {how}, head seq {result.entries - 1} "
              f"hash {result.head}")
        return 0
    print(f"{args.file}: chain BROKEN at {result.error} ({result.entries} entries verified before it)",
          file=sys.stderr)
    return 1


def _export_cli(args) -> int:
    result = _verify_args(args)
    if not result.ok and not args.force:
        print(f"{args.file}: chain BROKEN at {result.error}; not exported (--force exports anyway)", file=sys.stderr)
        return 1
    since = args.since
    out = args.out.open("w") if args.out else sys.stdout
    try:
        for _, raw, entry in iter_entries(args.file):
            if entry is None or (args.rpc and entry.get("rpc") not in args.rpc):
                continue
            if (args.who and entry.get("who") != args.who) or (since and str(entry.get("time", "")) < since):
                continue
            out.write(raw + "\n")
    finally:
        if args.out:
            out.close()
    return 0 if result.ok else 1


def write_key_file(path: Path) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_bytes(32).hex() + "\n")
    return path


def _keygen_cli(args) -> int:
    write_key_file(args.file)
    print(f"audit key written to {args.file} (0600); serve with {ENV_AUDIT_KEY_FILE}={args.file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from memguard.cli import main
    sys.exit(main(["audit", *sys.argv[1:]]))
