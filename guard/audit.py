"""The audit log: append-only JSONL, hash-chained, created 0600.

Each line is one entry, serialized canonically (sorted keys, no spaces) and carrying
`prev` (the `hash` of the entry before it; 64 zeros for the first) and `hash` (sha256 of the
entry's canonical JSON without `hash`). Any edit — one byte, a dropped or reordered line — breaks
the chain at that line; `memguard audit verify FILE` finds it. Truncating the tail is detectable
only against a head hash kept elsewhere (`verify` prints it; ship it to another store).

    who        key name of the caller ("anonymous" for a failed authentication)
    time       UTC, ISO 8601
    rpc        Generate, GenerateStream, Screen, Protect, Unprotect, auth, …
    request_id the caller's or the server's request id (may be empty)
    outcome    OK, a decision (BLOCKED, REROUTED, …) or a status code name
    details    small JSON object: matched item ids, registry ids, reasons; never the prompt of an
               allowed request (generation entries carry only the prompt's sha256)

    memguard audit verify audit.jsonl       # exit 0: chain intact; 1: broken (line and why)
    memguard audit export audit.jsonl --rpc Protect --since 2026-12-01 > out.jsonl
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from memguard.errors import CorruptData

GENESIS = "0" * 64
MAX_FIELD_CHARS = 256        # who / rpc / request_id / outcome are clipped to this


def canonical(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"}).encode()).hexdigest()


def _clip(value: Any) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + "…"


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


class AuditLog:
    """Appends chained entries to `path` (thread-safe, one process); fsyncs each entry."""

    def __init__(self, path: str | Path, *, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        self._fd = fd
        last = _last_line(self.path)
        if last is None:
            self._head, self._seq = GENESIS, 0
        else:
            try:
                entry = json.loads(last)
                self._head, self._seq = entry["hash"], int(entry["seq"]) + 1
            except (ValueError, KeyError, TypeError) as exc:
                os.close(fd)
                raise CorruptData(f"audit log {self.path}: last line is not an audit entry ({exc}); "
                                  "run `memguard audit verify`") from exc

    @property
    def head(self) -> str:
        return self._head

    def record(self, *, who: str, rpc: str, outcome: str, request_id: str | None = None,
               **details: Any) -> dict[str, Any]:
        """Append one entry; return it (with its hash)."""
        with self._lock:
            entry = {"seq": self._seq, "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                     "who": _clip(who), "rpc": _clip(rpc), "request_id": _clip(request_id),
                     "outcome": _clip(outcome), "details": details, "prev": self._head}
            entry = json.loads(canonical(entry))    # what verify will read back (str() of odd values)
            entry["hash"] = entry_hash(entry)
            os.write(self._fd, (canonical(entry) + "\n").encode())
            if self.fsync:
                os.fsync(self._fd)
            self._head, self._seq = entry["hash"], self._seq + 1
        return entry

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


@dataclass
class Verification:
    ok: bool
    entries: int
    head: str
    error: str | None = None       # "line N: why"


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


def verify(path: str | Path) -> Verification:
    """Walk the chain; the first line that does not follow stops it."""
    head, count = GENESIS, 0
    for number, raw, entry in iter_entries(path):
        if entry is None:
            return Verification(False, count, head, f"line {number}: not a JSON object")
        if canonical(entry) != raw:
            return Verification(False, count, head, f"line {number}: not in canonical form (edited?)")
        if entry.get("seq") != count:
            return Verification(False, count, head, f"line {number}: seq {entry.get('seq')} where {count} was due")
        if entry.get("prev") != head:
            return Verification(False, count, head, f"line {number}: prev does not match the previous entry's hash")
        if entry.get("hash") != entry_hash(entry):
            return Verification(False, count, head, f"line {number}: hash does not match its content")
        head, count = entry["hash"], count + 1
    return Verification(True, count, head)


# ----------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser("audit", help="verify or export the server's hash-chained audit log")
    sub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    v = sub.add_parser("verify", help="check the hash chain; exit 1 at the first broken line")
    v.add_argument("file", type=Path)
    v.set_defaults(func=_verify_cli)
    e = sub.add_parser("export", help="print the entries as JSONL (after verifying the chain)")
    e.add_argument("file", type=Path)
    e.add_argument("--rpc", action="append", help="only these RPCs (repeatable)")
    e.add_argument("--who", help="only this key name")
    e.add_argument("--since", help="only entries at or after this ISO time (UTC), e.g. 2026-12-01")
    e.add_argument("--out", type=Path, help="write here instead of stdout")
    e.add_argument("--force", action="store_true", help="export even when the chain is broken")
    e.set_defaults(func=_export_cli)


def _check_file(path: Path) -> None:
    if not path.is_file():
        from memguard.errors import MissingResource
        raise MissingResource(f"audit log {path} does not exist")


def _verify_cli(args) -> int:
    _check_file(args.file)
    result = verify(args.file)
    if result.ok:
        print(f"{args.file}: chain intact, {result.entries} entries, head {result.head}")
        return 0
    print(f"{args.file}: chain BROKEN at {result.error} ({result.entries} entries verified before it)",
          file=sys.stderr)
    return 1


def _export_cli(args) -> int:
    _check_file(args.file)
    result = verify(args.file)
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
