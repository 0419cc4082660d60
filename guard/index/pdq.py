"""PDQ perceptual hashes (256 bits) via the `pdqhash` package (Facebook's reference C++ code).

PDQ matches near-exact copies: resizes, recompression, mild colour changes. Distances are Hamming
distances between the 256-bit codes; Facebook's suggested match threshold is 31 bits.
"""
from __future__ import annotations

import numpy as np

from memguard.errors import InvalidInput, MissingResource

PDQ_BITS = 256
PDQ_BYTES = PDQ_BITS // 8
PDQ_MIN_SIDE = 64   # PDQ downsamples to 64×64 internally; smaller inputs are upscaled first
PDQ_MAX_SIDE = 2048  # working-size cap of every resize here: bounded memory whatever the aspect ratio


def check_image(image: np.ndarray, field_name: str = "image") -> np.ndarray:
    """Validate an RGB uint8 image [H, W, 3]; grayscale [H, W] is expanded. InvalidInput names the field."""
    if not isinstance(image, np.ndarray):
        raise InvalidInput(field_name, f"must be a numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise InvalidInput(field_name, f"must be [H, W, 3], got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise InvalidInput(field_name, f"must be uint8, got {image.dtype}")
    if min(image.shape[:2]) < 8:
        raise InvalidInput(field_name, f"is too small ({image.shape[1]}×{image.shape[0]}); need at least 8×8")
    return np.ascontiguousarray(image[..., :3])


def working_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) PDQ hashes at: the short side up to PDQ_MIN_SIDE, no side over PDQ_MAX_SIDE.

    PDQ reduces any input to 64×64 (ignoring the aspect ratio), so clipping a side costs nothing
    in matching, and an 8×2,097,152 upload no longer grows into a 64×16,777,216 working copy."""
    short, long_ = min(height, width), max(height, width)
    scale = PDQ_MIN_SIDE / short if short < PDQ_MIN_SIDE else min(1.0, PDQ_MAX_SIDE / long_)
    return (min(PDQ_MAX_SIDE, max(1, round(width * scale))), min(PDQ_MAX_SIDE, max(1, round(height * scale))))


def pdq_hash(image: np.ndarray) -> tuple[np.ndarray, int]:
    """PDQ code of an RGB uint8 image [H, W, 3] → (packed code [32] uint8, quality 0..100)."""
    try:
        import pdqhash
    except ImportError as exc:  # a declared dependency; say so instead of a bare ImportError
        raise MissingResource("PDQ hashing needs the 'pdqhash' package (pip install pdqhash)") from exc
    image = check_image(image)
    size = working_size(image.shape[0], image.shape[1])
    if size != (image.shape[1], image.shape[0]):
        from PIL import Image
        image = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
    bits, quality = pdqhash.compute(image)
    return np.packbits(bits.astype(np.uint8), bitorder="little"), int(quality)


def pdq_batch(images: list[np.ndarray]) -> np.ndarray:
    """Packed codes [N, 32] uint8 of N images."""
    if not images:
        return np.zeros((0, PDQ_BYTES), np.uint8)
    return np.stack([pdq_hash(im)[0] for im in images])
