"""The in-memory view of the protected registry: an immutable snapshot, swapped whole on change.

Readers take `index.protected` once per call and use only that object, so a concurrent
protect/unprotect never shows them a half-applied change and needs no reader lock. Snapshots are
small exact (brute-force) indexes: the registry holds opt-outs and takedowns, not a training set.
Each change rebuilds the snapshot in O(protected vectors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from memguard.index.registry_sql import Protection


@dataclass(frozen=True)
class ProtectedRow:
    pid: str
    kind: str       # "image" | "face"
    subject: str    # item id (images) or identity (faces)
    box: list[int] | None = None


@dataclass(frozen=True)
class ProtectedSnapshot:
    seq: int = 0                                              # last mutation applied
    protections: dict[str, Protection] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)     # signal -> [P, D]
    rows: dict[str, list[ProtectedRow]] = field(default_factory=dict)  # signal -> owner of each row

    @classmethod
    def from_protections(cls, seq: int, protections: list[Protection]) -> "ProtectedSnapshot":
        vectors: dict[str, list[np.ndarray]] = {}
        rows: dict[str, list[ProtectedRow]] = {}
        for prot in protections:
            for signal, entries in prot.vectors.items():
                for vec, box in entries:
                    vectors.setdefault(signal, []).append(vec)
                    rows.setdefault(signal, []).append(ProtectedRow(prot.pid, prot.kind, prot.subject, box))
        return cls(seq, {p.pid: p for p in protections},
                   {s: np.stack(v) for s, v in vectors.items()}, rows)

    def with_added(self, prot: Protection) -> "ProtectedSnapshot":
        return self.from_protections(prot.seq, [*self.protections.values(), prot])

    def with_removed(self, pids: list[str], seq: int) -> "ProtectedSnapshot":
        gone = set(pids)
        return self.from_protections(seq, [p for pid, p in self.protections.items() if pid not in gone])

    def count(self, signal: str) -> int:
        return len(self.rows.get(signal, ()))

    @cached_property
    def protected_subjects(self) -> frozenset[str]:
        return frozenset(p.subject for p in self.protections.values())
