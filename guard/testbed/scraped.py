"""The testbeds' training sets as a scraper would hold them: near duplicates of every popular image.

A web-scale training set does not hold a popular image once, nor only as identical files: it holds
it re-encoded, resized, re-hosted with a banner or a watermark, slightly cropped. Exact copies fold
into one index item (guard.index.duplicates.DedupedSource); near duplicates stay separate items and
must form one cluster, or the screen's calibration takes a photo's own re-encode for "another
item" and closes its thresholds down to exact matches.

`near_duplicate(image, kind, rng)` makes one such variant; `scraped_copies(item, n)` deals an
item's duplicates into identical copies and `n` near duplicates, deterministically per item. The
variants are encodings a re-host makes, never the augmentations index calibration fits on, at
strengths a viewer still calls the same picture.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

NEAR_DUPLICATE_KINDS = ("reencode", "resize", "resize_reencode", "crop", "banner", "watermark")


@dataclass(frozen=True)
class NearDuplicate:
    """One near-duplicate file: its bytes (a whole encoded file) and extension."""
    kind: str
    data: bytes
    ext: str


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _resize(image: np.ndarray, factor: float) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((max(8, round(w * factor)), max(8, round(h * factor))),
                                                    Image.BICUBIC))


def _banner(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A caption strip over the bottom 8-12 % (a re-host's title bar), dark or light."""
    img = Image.fromarray(image).copy()
    h, w = image.shape[:2]
    strip = max(4, round(h * rng.uniform(0.08, 0.12)))
    dark = rng.random() < 0.5
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, h - strip, w, h), fill=(16, 16, 16) if dark else (240, 240, 240))
    draw.text((2, h - strip), "wallpapers4k.example", fill=(240, 240, 240) if dark else (16, 16, 16))
    return np.asarray(img)


def _watermark(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A translucent text mark in a corner (alpha 0.35-0.5)."""
    base = Image.fromarray(image).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    h, w = image.shape[:2]
    alpha = int(255 * rng.uniform(0.35, 0.5))
    ImageDraw.Draw(layer).text((int(rng.integers(0, max(1, w // 3))), int(rng.integers(0, max(1, h // 2)))),
                               "(c) stock", fill=(255, 255, 255, alpha))
    return np.asarray(Image.alpha_composite(base, layer).convert("RGB"))


def near_duplicate(image: np.ndarray, kind: str, rng: np.random.Generator) -> NearDuplicate:
    """One near duplicate of an RGB uint8 image, as the bytes of the file a scraper would store."""
    if kind == "reencode":
        return NearDuplicate(kind, _jpeg(image, int(rng.integers(60, 95))), "jpg")
    if kind == "resize":
        return NearDuplicate(kind, _png(_resize(image, float(rng.choice([0.75, 1.5, 2.0])))), "png")
    if kind == "resize_reencode":
        return NearDuplicate(kind, _jpeg(_resize(image, 1.5), int(rng.integers(60, 95))), "jpg")
    if kind == "crop":
        h, w = image.shape[:2]
        f = rng.uniform(0.94, 0.98)          # a re-host trims a few percent, then rescales
        ch, cw = max(8, round(h * f)), max(8, round(w * f))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        cut = np.ascontiguousarray(image[top:top + ch, left:left + cw])
        return NearDuplicate(kind, _png(np.asarray(Image.fromarray(cut).resize((w, h), Image.BICUBIC))), "png")
    if kind == "banner":
        return NearDuplicate(kind, _png(_banner(image, rng)), "png")
    if kind == "watermark":
        return NearDuplicate(kind, _png(_watermark(image, rng)), "png")
    raise ValueError(f"near-duplicate kind {kind!r}: choose from {NEAR_DUPLICATE_KINDS}")


def scraped_copies(item_id: str, image: np.ndarray, near: int) -> list[NearDuplicate]:
    """`near` near duplicates of one item, the kinds dealt in turn, seeded by the item id (the
    same files on every machine)."""
    seed = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    return [near_duplicate(image, NEAR_DUPLICATE_KINDS[k % len(NEAR_DUPLICATE_KINDS)], rng) for k in range(near)]
