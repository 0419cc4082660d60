"""Image files as viewers show them, for the decoding tests of the CLI (tests/index) and the server
(tests/server): a structured picture, a 16-bit PNG, an EXIF-rotated JPEG."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def smooth(rng: np.random.Generator, grey: bool = False) -> np.ndarray:
    """A 64×64 picture with structure (upsampled noise); `grey`: R = G = B."""
    small = rng.integers(0, 255, (8, 8, 1 if grey else 3), dtype=np.uint8)
    if grey:
        small = np.repeat(small, 3, axis=2)
    return np.asarray(Image.fromarray(small).resize((64, 64), Image.BILINEAR))


def png16(grey: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG showing `grey` (uint8 [H, W]): samples × 257, as any 8→16-bit export."""
    buf = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 257).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    return buf.getvalue()


def exif_rotated_jpeg(image: np.ndarray) -> bytes:
    """A JPEG whose stored pixels are turned 90° anticlockwise, with orientation 6 telling viewers to
    turn them back: a viewer shows `image`."""
    stored = np.ascontiguousarray(np.rot90(image, k=1))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()
