"""What the server writes to the audit log (guard/audit.py), and how.

Entries are appended off the event loop. A write that fails is logged and counted, and the RPC
answers UNAVAILABLE (fail closed: no unaudited Screen, Protect or blocked generation is answered).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from memguard.audit import AuditLog
from memguard.errors import ScreeningUnavailable
from memguard.types import Decision, ImageResult, Reason

log = logging.getLogger(__name__)

AUDITED_DECISIONS = (Decision.BLOCKED, Decision.REROUTED, Decision.FACE_OBFUSCATED)
_ID_KEYS = ("item_id", "matched_item", "protection_id")
MAX_IDS = 16


class AuditUnavailable(ScreeningUnavailable):
    """The audit entry could not be written (UNAVAILABLE)."""


def matched_ids(audit: Any) -> list[str]:
    """Item ids and matched identities named anywhere in an engine's audit detail (bounded)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if len(found) >= MAX_IDS:
            return
        if isinstance(node, dict):
            for key in _ID_KEYS:
                if isinstance(node.get(key), str) and node[key]:
                    found.append(node[key])
            if node.get("matched") and isinstance(node.get("identity"), str):
                found.append(node["identity"])
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)
    walk(audit)
    return list(dict.fromkeys(found))[:MAX_IDS]


class ServerAudit:
    """The server's audit trail; `log=None` writes nothing (no audit_log configured)."""

    def __init__(self, log_: AuditLog | None, metrics=None):
        self.log, self.metrics = log_, metrics

    @property
    def enabled(self) -> bool:
        return self.log is not None

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

    async def generation(self, *, who: str, rpc: str, request_id: str, prompt: str, mode: str,
                         results: list[ImageResult]) -> None:
        """One entry for a request with a blocked, rerouted or face-obfuscated image; none otherwise
        (an allowed request leaves no trace, its prompt least of all)."""
        flagged = [r for r in results if r.decision in AUDITED_DECISIONS and r.reason is not Reason.CANCELLED]
        if not flagged:
            return
        worst = next(d for d in AUDITED_DECISIONS if any(r.decision is d for r in flagged))
        images = [{"index": r.index, "seed": r.seed, "decision": r.decision.value, "reason": r.reason.value,
                   "matched": matched_ids(r.report.audit)} for r in flagged]
        await self.record(who=who, rpc=rpc, outcome=worst.value, request_id=request_id, mode=mode, images=images,
                          prompt_sha256=hashlib.sha256(prompt.encode()).hexdigest())

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
