"""Seeded hostile-request generator for every MemGuard RPC, and a runner against a live server.

    # the full run (issue 14's acceptance: 2,000 per RPC) against a spawned `memguard serve` with a
    # small real index; prints per-RPC status codes, the INTERNAL count and the server's RSS:
    .venv/bin/python tests/server/fuzz_server.py --count 2000
    .venv/bin/python tests/server/fuzz_server.py --target 127.0.0.1:50051 --count 500   # a running server

Requests are valid-shaped messages with hostile values (long and odd strings, extreme numbers,
out-of-range enums, odd sizes, huge/odd/disallowed images; 16-bit, EXIF-oriented, animated,
transparent and many-faces encodings for Screen and Protect), raw bytes with the wrong wire types,
mutated encodings, and calls cancelled mid-flight. Any INTERNAL or UNKNOWN status is a failure.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE)]   # hardening_lib; memguard is imported as installed

from hardening_lib import png_header_only, tall_thin_png  # noqa: E402
from memguard.proto.memguard.v1 import admin_pb2, memguard_pb2 as pb  # noqa: E402

RPCS = {  # method → (request class, response class, streaming)
    "/memguard.v1.MemGuard/Generate": (pb.GenerateRequest, pb.GenerateResponse, False),
    "/memguard.v1.MemGuard/GenerateStream": (pb.GenerateRequest, pb.GenerateEvent, True),
    "/memguard.v1.MemGuard/Screen": (pb.ScreenRequest, pb.ScreenResponse, False),
    "/memguard.v1.IndexAdmin/Protect": (admin_pb2.ProtectRequest, admin_pb2.ProtectResponse, False),
    "/memguard.v1.IndexAdmin/Unprotect": (admin_pb2.UnprotectRequest, admin_pb2.UnprotectResponse, False),
    "/memguard.v1.IndexAdmin/GetIndexStats": (admin_pb2.GetIndexStatsRequest, admin_pb2.IndexStats, False),
}
BAD_CODES = ("INTERNAL", "UNKNOWN")
_TALL = tall_thin_png()


class Hostile:
    """Seeded hostile values."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def string(self, limit: int = 1 << 20) -> str:
        r = self.r
        kind = r.randrange(10)
        if kind == 0:
            return ""
        if kind == 1:
            return "x" * r.choice([1, 127, 128, 129, 2000, 2001, 65536, min(limit, 1 << 20)])
        if kind == 2:
            return "".join(chr(r.choice([0, 7, 9, 10, 13, 27, 127, 0x202E, 0x200B, 0xFEFF, 0x301])) for _ in range(40))
        if kind == 3:
            return r.choice(["%s%n%x", "{0}{1}", "../../etc/passwd", "'; DROP TABLE items; --", "\\u0000", "☃" * 50])
        if kind == 4:
            return "".join(chr(r.randrange(0x20, 0x2FFFF)) for _ in range(r.randrange(1, 300))
                           ).encode("utf-8", "replace").decode("utf-8", "replace")
        return "a red apple " * r.randrange(1, 5)

    def uint(self, bits: int = 32) -> int:
        return self.r.choice([0, 1, 2, 3, 7, 8, 9, 63, 64, 65, 128, 150, 151, 1024, 4096, 2**bits - 1,
                              self.r.randrange(2**bits)])

    def enum(self) -> int:
        return self.r.choice([0, 1, 2, 3, 4, 42, -1, 2**31 - 1, -2**31])

    def float(self) -> float:
        return self.r.choice([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 7.5, 30.0, 30.001, 1e30,
                              -1e-30, 3.4e38])

    def image(self) -> bytes:
        from PIL import Image

        r = self.r
        kind = r.randrange(20)
        if kind >= 14:
            return self.viewer_encoding(kind - 14)
        if kind == 0:
            return b""
        if kind == 1:
            return bytes(r.randrange(256) for _ in range(r.randrange(1, 4096)))
        if kind == 2:
            return _TALL
        if kind == 3:
            return png_header_only(r.choice([1, 8, 16, 20000, 65535, 2**31 - 1]), r.choice([1, 8, 16, 20000, 2**31 - 1]),
                                   r.choice([0, 2, 3, 4, 6, 7]))
        w, h = r.choice([1, 7, 15, 16, 17, 64, 129, 255]), r.choice([1, 16, 64, 100, 256])
        mode = r.choice(["RGB", "L", "RGBA", "P", "I;16", "1", "CMYK", "LA", "F"])
        fmt = r.choice(["PNG", "PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM"])
        pixels = np.frombuffer(r.getrandbits(8 * w * h * 3).to_bytes(w * h * 3, "little"), np.uint8)
        try:
            img = Image.fromarray(pixels.reshape(h, w, 3)).convert(mode)
            buf = io.BytesIO()
            img.save(buf, format=fmt)
            data = buf.getvalue()
        except Exception:
            data = png_header_only(w, h)
        if kind >= 11 and data:      # corrupt: truncate, flip a byte, or append junk
            at = r.randrange(len(data))
            data = [data[:at], data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:], data + b"\0" * 1000][kind - 11]
        return data

    def viewer_encoding(self, kind: int) -> bytes:
        """Encodings whose pixels differ from what a plain convert("RGB") sees (issue 29): 16-bit grey,
        EXIF orientation (valid and not), animations (APNG, animated WebP; up to past MAX_FRAMES),
        transparency, and many faces in one picture."""
        from PIL import Image

        r = self.r
        w, h = r.choice([16, 64, 100, 300]), r.choice([16, 64, 257])
        noise = np.frombuffer(r.getrandbits(8 * w * h * 3).to_bytes(w * h * 3, "little"), np.uint8).reshape(h, w, 3)
        buf = io.BytesIO()
        if kind == 0:      # 16-bit greyscale, full range
            wide = np.frombuffer(r.getrandbits(16 * w * h).to_bytes(2 * w * h, "little"), np.uint16).reshape(h, w)
            img = Image.fromarray(wide)
            img.save(buf, format="PNG", **({"transparency": int(wide[0, 0])} if r.random() < 0.3 else {}))
        elif kind == 1:    # EXIF orientation, including values outside 1..8
            exif = Image.Exif()
            exif[0x0112] = r.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 65535])
            Image.fromarray(noise).save(buf, format=r.choice(["JPEG", "PNG", "WEBP"]), exif=exif)
        elif kind in (2, 3):   # animated: APNG or WebP, 2 .. 40 frames
            n = r.choice([2, 3, 16, 17, 40])
            frames = [Image.fromarray(np.roll(noise, i, axis=0)) for i in range(n)]
            fmt = "PNG" if kind == 2 else "WEBP"
            frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50,
                           **({"default_image": r.random() < 0.5} if fmt == "PNG" else {}))
        elif kind == 4:    # transparency: RGBA, LA, palette with tRNS
            alpha = np.frombuffer(r.getrandbits(8 * w * h).to_bytes(w * h, "little"), np.uint8).reshape(h, w)
            img = Image.fromarray(np.dstack([noise, alpha]))
            mode = r.choice(["RGBA", "LA", "P"])
            img = img.convert(mode) if mode != "P" else img.convert("RGB").convert("P")
            img.save(buf, format="PNG", **({"transparency": 0} if mode == "P" else {}))
        else:              # many faces: a grid of one face
            grid = r.choice([2, 4, 6, 12])         # faces of 160 px: the detector finds every one
            Image.fromarray(_many_faces(grid)).save(buf, format=r.choice(["PNG", "JPEG"]))
        return buf.getvalue()

    def raw(self, valid: bytes) -> bytes:
        """Bytes on the wire: wrong wire types for known fields, mutations of a valid encoding, noise."""
        r = self.r
        kind = r.randrange(4)
        if kind == 0:
            return bytes(r.randrange(256) for _ in range(r.randrange(0, 64)))
        if kind == 1 and valid:
            data = bytearray(valid)
            for _ in range(r.randrange(1, 4)):
                data[r.randrange(len(data))] = r.randrange(256)
            return bytes(data)
        if kind == 2 and valid:
            return valid[: r.randrange(len(valid))]
        out = b""
        for _ in range(r.randrange(1, 6)):
            number, wire = r.randrange(1, 13), r.choice([0, 1, 2, 5, 3, 4, 6, 7])
            tag = (number << 3) | wire
            out += bytes([tag]) if tag < 128 else bytes([0x80 | (tag & 0x7F), tag >> 7])
            if wire == 0:
                out += b"\xff" * r.randrange(1, 11) + b"\x01"
            elif wire == 1:
                out += struct.pack("<d", self.float())
            elif wire == 5:
                out += struct.pack("<f", 1.5)
            elif wire == 2:
                payload = r.choice([b"\xff\xfe", b"ok", b"\x80" * 3, self.image()[:120]])
                out += bytes([len(payload) if r.random() < 0.8 else 127]) + payload
        return out


_FACE: list[np.ndarray] = []


def _many_faces(grid: int, cell: int = 160) -> np.ndarray:
    """grid × grid copies of one face (the skimage astronaut's; a drawn one without skimage)."""
    from PIL import Image, ImageDraw

    if not _FACE:
        try:
            from skimage import data
            face = Image.fromarray(data.astronaut()).crop((150, 20, 290, 190))
        except Exception:
            face = Image.new("RGB", (140, 170), (120, 120, 120))
            d = ImageDraw.Draw(face)
            d.ellipse((20, 10, 120, 160), fill=(224, 172, 140))
            d.ellipse((45, 60, 60, 72), fill=(30, 30, 30))
            d.ellipse((80, 60, 95, 72), fill=(30, 30, 30))
            d.arc((50, 100, 90, 130), 0, 180, fill=(120, 40, 40), width=4)
        _FACE.append(face.convert("RGB"))
    return np.tile(np.asarray(_FACE[0].resize((cell, cell), Image.LANCZOS)), (grid, grid, 1))


def make_request(method: str, h: Hostile):
    """(message or None, raw bytes or None) for one call of `method`."""
    r = h.r
    if method.endswith("Generate") or method.endswith("GenerateStream"):
        msg = pb.GenerateRequest(prompt=h.string(), negative_prompt=h.string() if r.random() < 0.3 else "",
                                 height=h.uint() if r.random() < 0.4 else 64, width=h.uint() if r.random() < 0.4 else 64,
                                 steps=h.uint() if r.random() < 0.5 else r.randrange(1, 4),
                                 num_images=h.uint() if r.random() < 0.3 else 1,
                                 mode=h.enum() if r.random() < 0.5 else 0,
                                 face_action=h.enum() if r.random() < 0.3 else 0,
                                 request_id=h.string() if r.random() < 0.5 else "")
        if r.random() < 0.5:
            msg.guidance_scale = h.float()
        if r.random() < 0.5:
            msg.seed = h.uint(64)
    elif method.endswith("Screen"):
        msg = pb.ScreenRequest(image=h.image(), request_id=h.string() if r.random() < 0.3 else "")
    elif method.endswith("/Protect"):
        msg = admin_pb2.ProtectRequest(reason=h.string(), idempotency_key=h.string() if r.random() < 0.3 else "")
        target = r.randrange(3)
        if target == 0:
            msg.image.CopyFrom(admin_pb2.ProtectImage(image=h.image(), item_id=h.string() if r.random() < 0.3 else ""))
        elif target == 1:
            msg.face.CopyFrom(admin_pb2.ProtectFace(photos=[h.image() for _ in range(r.choice([0, 1, 2, 17]))],
                                                    identity=h.string()))
    elif method.endswith("Unprotect"):
        msg = admin_pb2.UnprotectRequest(id=h.string(), reason=h.string())
    else:
        msg = admin_pb2.GetIndexStatsRequest()
    if r.random() < 0.25:
        return None, h.raw(msg.SerializeToString())
    return msg, None


@dataclass
class FuzzReport:
    codes: dict[str, Counter] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)      # "method code details" of INTERNAL / UNKNOWN
    sent: int = 0

    def add(self, method: str, code: str, details: str = "") -> None:
        self.codes.setdefault(method, Counter())[code] += 1
        self.sent += 1
        if code in BAD_CODES:
            self.bad.append(f"{method} {code} {details[:200]}")

    def format(self) -> str:
        lines = []
        for method, counts in sorted(self.codes.items()):
            lines.append(f"{method.rsplit('/', 1)[-1]:14s} {sum(counts.values()):6d}  "
                         + ", ".join(f"{c} {n}" for c, n in counts.most_common()))
        return "\n".join(lines)


def one_call(channel: grpc.Channel, method: str, seed: int, report: FuzzReport) -> None:
    h = Hostile(seed)
    request_cls, response_cls, streaming = RPCS[method]
    msg, raw = make_request(method, h)
    serializer = (lambda b: b) if raw is not None else request_cls.SerializeToString
    payload = raw if raw is not None else msg
    kind = channel.unary_stream if streaming else channel.unary_unary
    stub = kind(method, request_serializer=serializer, response_deserializer=response_cls.FromString)
    timeout = h.r.choice([0.05, 0.5, 2.0])
    # header values must be printable ASCII (a client library refuses anything else before sending)
    token = "".join(chr(h.r.randrange(0x20, 0x7F)) for _ in range(h.r.choice([0, 8, 43, 300])))
    metadata = [(h.r.choice(["authorization", "x-api-key"]), "Bearer " + token)] if h.r.random() < 0.1 else None
    cancel = h.r.random() < 0.1
    try:
        if streaming:
            call = stub(payload, timeout=timeout, metadata=metadata)
            for i, _ in enumerate(call):
                if cancel and i >= h.r.randrange(3):
                    call.cancel()
                    break
            code = "OK" if not cancel else "CANCELLED"
        else:
            future = stub.future(payload, timeout=timeout, metadata=metadata)
            if cancel:
                time.sleep(h.r.random() * 0.05)
                future.cancel()
            future.result()
            code = "OK"
        report.add(method, code)
    except grpc.FutureCancelledError:
        report.add(method, "CANCELLED")
    except grpc.RpcError as exc:
        report.add(method, exc.code().name, exc.details() or "")


def run_fuzz(target: str, count: int, seed: int = 0, workers: int = 8, methods=None) -> FuzzReport:
    """`count` hostile calls per RPC, `workers` at a time, against a running server."""
    report = FuzzReport()
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(target, options=options) as channel, ThreadPoolExecutor(workers) as pool:
        jobs = [(m, seed * 1_000_003 + i * 7919 + k) for i in range(count) for k, m in enumerate(methods or RPCS)]
        list(pool.map(lambda job: one_call(channel, job[0], job[1], report), jobs))
    return report


# ----------------------------------------------------------------------------- the full run
def rss_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def build_small_index(tmp: Path) -> tuple[Path, Path]:
    """A 6-item fingerprint index (faces on, so the face detector sees the uploads) over the tiny VAE."""
    import torch
    from PIL import Image

    from memguard.index.api import FingerprintIndex
    from memguard.index.sources import ImageFolderSource
    from memguard.models import build_tiny_pipeline

    torch.manual_seed(0)
    build_tiny_pipeline().vae.save_pretrained(tmp / "vae")
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir()
    for i in range(6):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 64), Image.BILINEAR).save(tmp / "images" / f"item{i}.png")
    FingerprintIndex.build(tmp / "index", ImageFolderSource(tmp / "images"), model_dir=tmp / "vae", progress=False)
    return tmp / "index", tmp / "vae"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", help="HOST:PORT of a running server (default: spawn one with a small index)")
    p.add_argument("--count", type=int, default=2000, help="hostile calls per RPC")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=8)
    args = p.parse_args(argv)
    proc = None
    target = args.target
    tmp = tempfile.TemporaryDirectory()
    if target is None:
        from memguard.benchmarks.load import free_port
        from memguard.server.client import wait_until_serving

        os.environ.setdefault("MEMGUARD_DATA_KEY", os.urandom(32).hex())   # a throwaway key seals the faces
        index, vae = build_small_index(Path(tmp.name))
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "memguard.cli", "serve", "--engine", "memguard.engine:PipelineEngine",
                                 "--tiny-random", "--model", str(vae), "--index", str(index), "--port", str(port),
                                 "--metrics-port", "-1", "--torch-threads", "1", "--max-queue", "16"],
                                cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONSAFEPATH="1"), stdout=subprocess.DEVNULL,
                                stderr=open(Path(tmp.name) / "server.log", "w"))
        target = f"127.0.0.1:{port}"
        wait_until_serving(target, timeout=600)
        before = rss_mb(proc.pid)
    try:
        t0 = time.monotonic()
        report = run_fuzz(target, args.count, args.seed, args.workers)
        seconds = time.monotonic() - t0
        print(report.format())
        print(f"{report.sent} calls in {seconds:.0f} s; INTERNAL/UNKNOWN: {len(report.bad)}")
        for line in report.bad[:20]:
            print("  ", line)
        status = 1 if report.bad else 0
        if proc is not None:
            from memguard.server.client import health_status

            alive = proc.poll() is None and health_status(target) == "SERVING"
            after = rss_mb(proc.pid) if proc.poll() is None else {}
            print(f"server alive and SERVING: {alive}; RSS before {before.get('VmRSS', 0):.0f} MB, after "
                  f"{after.get('VmRSS', 0):.0f} MB, peak {after.get('VmHWM', 0):.0f} MB")
            status = status or (0 if alive else 1)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)
    tmp.cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
