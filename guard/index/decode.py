"""Decode image bytes as a viewer shows them (issue 29, finding 4): one decoder for the server's
uploads (Screen, Protect) and the index CLI's `screen` and `protect`.

EXIF orientation applied, 16-bit and 32-bit samples scaled (not clipped to white), palette and
transparency composited over white (and, for screening, over black too), every frame of an animation
or multi-picture JPEG (each a view). The work is bounded from the header before any pixel is decoded
(`DecodeLimits`: formats, pixels, minimum side, aspect ratio; the server's `UploadConfig` has the same
fields). Errors are InvalidInput naming the caller's field, without memory addresses.

Index BUILD decoding (`memguard.index.sources.decode_image`) is a different job: one still picture
per training record, no limits, PIL's convert("RGB"); it is not this function.
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass

import numpy as np

from memguard.errors import InvalidInput


@dataclass(frozen=True)
class DecodeLimits:
    """What a decode may cost. `formats` None: any format PIL reads (local files)."""
    max_pixels: int = 4096 * 4096       # decoded size, all frames together
    min_side: int = 16
    max_aspect_ratio: float = 8.0       # long side / short side
    formats: tuple[str, ...] | None = ("PNG", "JPEG", "WEBP")


UPLOAD_LIMITS = DecodeLimits()          # the server's default uploads (server.config.UploadConfig)
# local files named by the operator (memguard index screen / protect): any format PIL reads, any
# shape, up to PIL's own decompression-bomb warning size
LOCAL_LIMITS = DecodeLimits(max_pixels=89_478_485, min_side=1, max_aspect_ratio=float("inf"), formats=None)


def check_image_header(width: int, height: int, field: str, limits: DecodeLimits) -> None:
    """Bound the work an upload can cause before decoding it: pixels, minimum side, aspect ratio."""
    if width * height > limits.max_pixels:
        raise InvalidInput(field, f"{width}x{height} exceeds {limits.max_pixels} pixels")
    if min(width, height) < limits.min_side:
        raise InvalidInput(field, f"{width}x{height}: the short side is under {limits.min_side} pixels")
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise InvalidInput(field, f"{width}x{height}: aspect ratio over {limits.max_aspect_ratio:g}:1")


MAX_FRAMES = 16            # frames of an animated Screen upload that are screened; more → INVALID_ARGUMENT
_ORIENTATION = 0x0112      # EXIF tag
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")   # 16-bit (PNG) samples: 0..65535
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _describe(exc: BaseException) -> str:
    """An exception as its type and message, with memory addresses (``0x7f…``) masked."""
    text = _REPR.sub("the upload", f"{type(exc).__name__}: {str(exc)[:200]}")
    return _ADDRESS.sub("0x…", text)


_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")       # <_io.BytesIO object at 0x7f…>
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


def _kinds(limits: DecodeLimits) -> str:
    return f"{'/'.join(limits.formats)} " if limits.formats else ""


def _orientation(img) -> int:
    try:
        value = int(img.getexif().get(_ORIENTATION, 1))
    except Exception:         # an unreadable EXIF block is no orientation, as in viewers
        return 1
    return value if 1 <= value <= 8 else 1


def _transposed(frame, orientation: int):
    """What ImageOps.exif_transpose shows, applied to every frame (the tag is read once, from frame 0)."""
    from PIL import Image

    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
              7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}.get(orientation)
    return frame if method is None else frame.transpose(method)


def _rgba(frame) -> tuple[np.ndarray, np.ndarray | None]:
    """A frame as a viewer reads its samples: uint8 RGB [H, W, 3] and alpha [H, W] (None when opaque).

    16-bit and 32-bit integer samples are scaled (÷257), not clipped at 255 (PIL's convert("RGB") of
    an I;16 image turns every sample over 255 white); float samples are taken as 0..1 when they all
    lie there, else as 0..255; palette and grey transparency (tRNS) become alpha."""
    mode = frame.mode
    if mode in _WIDE_MODES or mode == "F":
        raw = np.asarray(frame)
        if mode == "F":
            values = np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
            scale = 255.0 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else 1.0
            grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        else:
            grey = np.clip(np.rint(raw.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        transparent = frame.info.get("transparency")
        alpha = None
        if isinstance(transparent, int) and mode != "F":
            alpha = np.where(raw == transparent, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), alpha
    if mode in _ALPHA_MODES or "transparency" in frame.info:
        rgba = np.asarray(frame.convert("RGBA"), dtype=np.uint8)
        alpha = rgba[..., 3]
        return np.ascontiguousarray(rgba[..., :3]), (None if alpha.min() == 255 else alpha)
    return np.asarray(frame.convert("RGB"), dtype=np.uint8), None


def _over(rgb: np.ndarray, alpha: np.ndarray, background: int) -> np.ndarray:
    a = alpha.astype(np.uint16)[..., None]
    return ((rgb.astype(np.uint16) * a + background * (255 - a) + 127) // 255).astype(np.uint8)


def decode_views(data: bytes, field: str, limits: DecodeLimits = UPLOAD_LIMITS, *,
                 multi_frame: bool = True, max_frames: int = MAX_FRAMES) -> list[np.ndarray]:
    """Image bytes (PNG/JPEG/WebP by default: `limits.formats`) → what a viewer can be shown: uint8
    [H, W, 3] images, distinct.

    Each frame is decoded as a viewer shows it: EXIF orientation applied, 16-bit samples scaled,
    palette and transparency composited over white, and, for an image with any transparency, over
    black too (a dark page shows what a white one hides). An animated image (APNG, animated WebP,
    multi-picture JPEG) yields every frame, at most `max_frames`, all frames together within
    `limits.max_pixels`; with `multi_frame=False` it is refused. InvalidInput names `field` for
    anything it will not take."""
    from PIL import Image

    if not data:
        raise InvalidInput(field, "no image bytes")
    try:
        with Image.open(io.BytesIO(data), formats=list(limits.formats) if limits.formats else None) as img:
            check_image_header(img.width, img.height, field, limits)
            frames = int(getattr(img, "n_frames", 1) or 1)
            if img.format == "MPO" and not multi_frame:
                frames = 1      # a multi-picture JPEG: viewers show its primary picture, Protect takes that
            if frames > 1 and not multi_frame:
                raise InvalidInput(field, f"an animated or multi-frame image ({frames} frames); send one still image")
            if frames > max_frames:
                raise InvalidInput(field, f"{frames} frames; at most {max_frames} are screened")
            if frames * img.width * img.height > limits.max_pixels:
                raise InvalidInput(field, f"{frames} frames of {img.width}x{img.height} exceed "
                                          f"{limits.max_pixels} pixels in all")
            orientation = _orientation(img)
            views: dict[bytes, np.ndarray] = {}
            pixels = 0
            for number in range(frames):
                if number:
                    img.seek(number)     # an MPO's pictures differ in size: each is bounded, and all together
                    check_image_header(img.width, img.height, f"{field} (frame {number})", limits)
                pixels += img.width * img.height
                if pixels > limits.max_pixels:
                    raise InvalidInput(field, f"its frames exceed {limits.max_pixels} pixels in all")
                rgb, alpha = _rgba(img)
                shown = [rgb] if alpha is None else [_over(rgb, alpha, 255), _over(rgb, alpha, 0)]
                for view in shown:
                    view = np.asarray(_transposed(Image.fromarray(view), orientation), dtype=np.uint8)
                    views.setdefault(hashlib.sha256(view.tobytes() + str(view.shape).encode()).digest(), view)
            return list(views.values())
    except InvalidInput:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidInput(field, f"decompression bomb refused ({_describe(exc)})") from exc
    except Exception as exc:   # PIL raises many types on hostile bytes; all mean "not an image we take"
        raise InvalidInput(field, f"not a decodable {_kinds(limits)}image ({_describe(exc)})") from exc


def decode_image(data: bytes, field: str, limits: DecodeLimits = UPLOAD_LIMITS) -> np.ndarray:
    """One still image → uint8 [H, W, 3] as a viewer shows it (transparency over white); a multi-frame
    image is refused (InvalidInput naming `field`): Protect registers exactly what it was shown."""
    return decode_views(data, field, limits, multi_frame=False)[0]


