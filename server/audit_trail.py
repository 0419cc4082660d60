"""What the server writes to the audit log (guard/audit.py), and how.

Entries are appended off the event loop. A write that fails is logged and counted, and the RPC
answers UNAVAILABLE (fail closed: no unaudited Screen, Protect or blocked generation is answered).

Personal data stays out of the append-only log: identity names and free-text reasons appear only
as keyed tags (`tag()`, HMAC under the audit key's tag sub-key), next to protection ids.
Authentication and scope refusals are aggregated: one entry per (peer address, key name, RPC,
status) and window (`refusal_window_s`) with a count, written when the window closes (or at
close), so a flood of refused calls costs a bounded number of entries and never copies a
caller-chosen string into the log.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import time
from datetime import datetime, timezone
from typing import Any

from memguard.audit import AuditKey, AuditLog
from memguard.errors import ScreeningUnavailable
from memguard.types import Decision, ImageResult, Reason

log = logging.getLogger(__name__)

AUDITED_DECISIONS = (Decision.BLOCKED, Decision.REROUTED, Decision.FACE_OBFUSCATED)
MAX_IDS = 16
REFUSAL_WINDOW_S = 60.0
PROTECTION_ID = re.compile(r"prot-[0-9a-f]{16}")
MAX_REFUSAL_KEYS = 1024       # distinct (peer, who, rpc, status) per window; more are counted under "other"


class AuditUnavailable(ScreeningUnavailable):
    """The audit entry could not be written (UNAVAILABLE)."""


def matched_ids(audit: Any, tag=None) -> list[str]:
    """The ids of what actually matched in an engine's audit detail: copies and matched faces, by
    item id or protection id. A candidate that did not match (`is_copy` or `matched` false) is left
    out, so a real match is never crowded out of the bounded list by candidates. An identity name
    is never returned: a training face's item id, a protected one's protection id, else (a protected
    identity without one) `tag(name)`, else a placeholder."""
    found: list[str] = []
    budget = [10_000]          # nodes visited: bounded work on any detail

    def face(node: dict) -> None:
        for key in ("protection_id", "item_id"):
            if isinstance(node.get(key), str) and node[key]:
                found.append(node[key])
                return
        name = node.get("identity")
        if isinstance(name, str) and name:
            if not node.get("protected") and "#face" in name:
                found.append(name)                    # a training face: "item#faceN"
            else:
                found.append(tag(name) if tag is not None else "protected-identity")

    def walk(node: Any, parent: str) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            return
        if isinstance(node, dict):
            if "is_copy" in node and "item_id" in node:           # a copy candidate (index ScreenResult)
                if node.get("is_copy") is True:
                    found.extend(p for p in node.get("protection_ids") or [] if isinstance(p, str) and p)
                    if isinstance(node.get("item_id"), str) and node["item_id"]:
                        found.append(node["item_id"])
            elif "matched" in node and ("identity" in node or "box" in node):   # a face
                if node.get("matched") is True:
                    face(node)
            elif parent == "copies" and isinstance(node.get("item_id"), str) and node["item_id"]:
                found.append(node["item_id"])                    # the pipeline lists copies only
            elif isinstance(node.get("matched_item"), str) and node["matched_item"]:
                found.append(node["matched_item"])
            for name, value in node.items():
                walk(value, str(name))
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value, parent)

    walk(audit, "")
    return list(dict.fromkeys(found))[:MAX_IDS]


def peer_address(peer: str | None) -> str:
    """gRPC's peer string without the port ("ipv4:10.0.0.7:51234" → "ipv4:10.0.0.7"), bounded."""
    text = (peer or "unknown")[:80]
    if text.startswith(("ipv4:", "ipv6:")):
        text = text.rsplit(":", 1)[0]
    return "".join(c if 0x21 <= ord(c) < 0x7f else "?" for c in text)


class ServerAudit:
    """The server's audit trail; `log=None` writes nothing (no audit_log configured)."""

    def __init__(self, log_: AuditLog | None, metrics=None, *, refusal_window_s: float = REFUSAL_WINDOW_S):
        self.log, self.metrics = log_, metrics
        self.refusal_window_s = refusal_window_s
        self._ephemeral = AuditKey(hashlib.sha256(threading.get_ident().to_bytes(8, "little")
                                                  + time.time_ns().to_bytes(8, "little")).digest())
        self._refusals: dict[tuple[str, str, str, str], list] = {}
        self._window_start = time.monotonic()
        self._refusal_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.log is not None:
            if metrics is not None and hasattr(metrics, "audit_head"):
                self.log.on_append = lambda seq, head: metrics.audit_head(seq)
                metrics.audit_head(self.log.seq)
            self._thread = threading.Thread(target=self._tick, name="memguard-audit", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.log is not None

    def tag(self, kind: str, text: str) -> str:
        """A keyed tag standing in for a name or a reason (the same text, the same tag, under one key;
        without an audit key, a per-process key: tags then link entries of one run only)."""
        key = self.log.key if self.log is not None and self.log.key is not None else self._ephemeral
        return key.tag(kind, text)

    def private(self, *, reason: str | None = None, identity: str | None = None, subject: str | None = None,
                idempotency_key: str | None = None) -> dict[str, str]:
        """Audit details for personal or caller-chosen text: keyed tags, never the text. `subject` (an
        Unprotect target) stays in clear only when it is a protection id."""
        out: dict[str, str] = {}
        if reason:
            out["reason_tag"] = self.tag("reason", reason)
        if identity:
            out["subject_tag"] = self.tag("subject", identity)
        if subject:
            if PROTECTION_ID.fullmatch(subject):
                out["id"] = subject
            else:
                out["subject_tag"] = self.tag("subject", subject)
        if idempotency_key:
            out["idempotency_tag"] = self.tag("idempotency_key", idempotency_key)
        return out

    async def record(self, *, who: str, rpc: str, outcome: str, request_id: str | None = None,
                     **details: Any) -> None:
        if self.log is None:
            return
        try:
            await asyncio.to_thread(self.log.record, who=who, rpc=rpc, outcome=outcome,
                                    request_id=request_id, **details)
        except Exception as exc:
            log.exception("audit log write failed (%s %s)", rpc, outcome)
            if self.metrics is not None:
                self.metrics.audited(False)
            raise AuditUnavailable(f"audit log unavailable: {type(exc).__name__}") from exc
        if self.metrics is not None:
            self.metrics.audited(True)

    # ---- refusals ---------------------------------------------------------------------------------
    def refused(self, *, peer: str | None, who: str, rpc: str, outcome: str) -> None:
        """Count one refused call; the window's entry is written when the window closes."""
        if self.log is None:
            return
        key = (peer_address(peer), who[:64], rpc[:32], outcome[:32])
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._refusal_lock:
            if key not in self._refusals and len(self._refusals) >= MAX_REFUSAL_KEYS:
                key = ("other", "other", key[2], key[3])
            slot = self._refusals.setdefault(key, [0, now, now])
            slot[0] += 1
            slot[2] = now

    def flush_refusals(self) -> int:
        """Write one entry per (peer, who, rpc, status) counted since the last flush; returns how many."""
        with self._refusal_lock:
            pending, self._refusals = self._refusals, {}
            self._window_start = time.monotonic()
        written = 0
        for (peer, who, rpc, outcome), (count, first, last) in pending.items():
            try:
                self.log.record(who=who, rpc=rpc, outcome=outcome, peer=peer, count=count, first=first, last=last,
                                window_s=self.refusal_window_s)
                written += 1
                if self.metrics is not None:
                    self.metrics.audited(True)
            except Exception:
                log.exception("audit log: could not write %d refused %s calls from %s", count, rpc, peer)
                if self.metrics is not None:
                    self.metrics.audited(False)
        return written

    def _tick(self) -> None:
        """Close refusal windows; publish the head while it changes (guard/audit.py logs it)."""
        published = self.log.head
        while not self._stop.wait(min(1.0, self.refusal_window_s)):
            if time.monotonic() - self._window_start >= self.refusal_window_s:
                self.flush_refusals()
            if self.log.head != published and time.monotonic() - self.log._published >= self.log.publish_every_s:
                self.log.publish()
                published = self.log.head

    # ---- generations ------------------------------------------------------------------------------
    async def generation(self, *, who: str, rpc: str, request_id: str, prompt: str, mode: str,
                         results: list[ImageResult]) -> None:
        """One entry for a request with a blocked, rerouted or face-obfuscated image; none otherwise
        (an allowed request leaves no trace, its prompt least of all)."""
        flagged = [r for r in results if r.decision in AUDITED_DECISIONS and r.reason is not Reason.CANCELLED]
        if not flagged:
            return
        worst = next(d for d in AUDITED_DECISIONS if any(r.decision is d for r in flagged))
        images = [{"index": r.index, "seed": r.seed, "decision": r.decision.value, "reason": r.reason.value,
                   "matched": matched_ids(r.report.audit, lambda name: self.tag("subject", name))}
                  for r in flagged]
        await self.record(who=who, rpc=rpc, outcome=worst.value, request_id=request_id, mode=mode, images=images,
                          prompt_sha256=hashlib.sha256(prompt.encode()).hexdigest())

    def close(self) -> None:
        if self.log is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self.flush_refusals()
            self.log.close()
