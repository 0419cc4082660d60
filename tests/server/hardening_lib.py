"""Shared pieces of the hardening tests (issue 14): a guard-like engine, key files, hostile images."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

from memguard.engine import IndexStats, PipelineEngine, ScreenOutcome
from memguard.types import Decision, GuardMode, Reason
from memguard.proto.memguard.v1 import admin_pb2, memguard_pb2 as pb
from memguard.server.auth import key_entry, new_key

MATCHED = "train-0042"


class GuardLikeEngine(PipelineEngine):
    """The real tiny engine, reporting the way the guarded one does: it says it guards, records the
    mode each request ran with, fills continuous scores, first_flagged_step and membership detail,
    blocks prompts that contain "copy" in ENFORCE, and answers Screen / registry calls as an index
    with one matching training item would. The server's job under test is what it releases."""

    guarded = True

    def __init__(self, pipe):
        super().__init__(pipe)
        self.modes: list[GuardMode] = []
        self.protected: list[str] = []

    def generate(self, requests, **kw):
        self.modes += [r.mode for r in requests]
        results = super().generate(requests, **kw)
        for request, per_request in zip(requests, results):
            for r in per_request:
                if r.reason is Reason.CANCELLED:
                    continue
                r.report.scores.update(similarity_last=0.93, z_similarity=3.1, combined=4.2)
                r.report.first_flagged_step = 1
                r.report.mitigations.append("step 1: rung 1: bos")
                r.report.audit = {"copies": [{"item_id": MATCHED, "scores": {"latent": 0.93}}]}
                if "copy" in request.prompt and request.mode is GuardMode.ENFORCE:
                    r.decision, r.reason, r.image = Decision.BLOCKED, Reason.MEMORIZATION, None
        return results

    def screen(self, image):
        return ScreenOutcome(True, 1, 1, Reason.MEMORIZATION,
                             {"copies": [{"item_id": MATCHED, "scores": {"pdq": 3.0}}],
                              "faces": [{"matched": True, "protected": False, "identity": f"{MATCHED}#face0"}]})

    def protect_image(self, image, reason, item_id=None):
        self.protected.append(reason)
        return f"prot-{len(self.protected)}"

    def protect_face(self, images, identity, reason):
        self.protected.append(reason)
        return f"prot-{len(self.protected)}"

    def unprotect(self, item_id, reason):
        return item_id.startswith("prot-")

    def index_stats(self):
        return IndexStats(items=6, protected_items=len(self.protected))


def write_keys(path: Path, scopes: dict[str, list[str]]) -> dict[str, str]:
    """A key file with one key per name; returns name → plaintext key."""
    keys = {name: new_key() for name in scopes}
    lines = []
    for name, key in keys.items():
        entry = key_entry(name, key, scopes[name])
        quoted = ", ".join(f'"{s}"' for s in entry["scopes"])
        lines.append(f'[[keys]]\nname = "{name}"\nsha256 = "{entry["sha256"]}"\nscopes = [{quoted}]\n')
    path.write_text("\n".join(lines))
    return keys


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def png_header_only(width: int, height: int, color_type: int = 2) -> bytes:
    """A PNG whose IHDR claims width×height, with an empty image stream (only the header matters)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def tall_thin_png(width: int = 8, height: int = 2_097_152) -> bytes:
    """A real, complete RGB PNG of width×height zeros (the issue's 49 KB, 8×2,097,152 probe)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" * (1 + 3 * width)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row * 65536) for _ in range(height // 65536)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def rpc_requests(png: bytes) -> dict[str, object]:
    """One valid request for every RPC of every MemGuard service, by full method name."""
    return {
        "/memguard.v1.MemGuard/Generate": pb.GenerateRequest(prompt="a copy of a red apple", steps=2, seed=1),
        "/memguard.v1.MemGuard/GenerateStream": pb.GenerateRequest(prompt="a red apple", steps=2, seed=1),
        "/memguard.v1.MemGuard/Screen": pb.ScreenRequest(image=png, request_id="s-1"),
        "/memguard.v1.IndexAdmin/Protect": admin_pb2.ProtectRequest(image=admin_pb2.ProtectImage(image=png),
                                                                    reason="takedown #1"),
        "/memguard.v1.IndexAdmin/Unprotect": admin_pb2.UnprotectRequest(id="prot-1", reason="appeal granted"),
        "/memguard.v1.IndexAdmin/GetIndexStats": admin_pb2.GetIndexStatsRequest(),
    }


def service_methods():
    """(full method name, method descriptor) of every RPC in the public protos."""
    for file in (pb.DESCRIPTOR, admin_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            for method in service.methods:
                yield f"/{service.full_name}/{method.name}", method
