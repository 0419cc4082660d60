"""An independent, pixel-space judge of near copies (not the guard's own signals).

A generated image is a near copy of training image x when all four hold:
- SSIM(gen, x) ≥ SSIM_THRESHOLD: structurally the same picture;
- normalized L2 ≤ RMSE_THRESHOLD: the RMSE of [0, 1] pixels after removing each image's
  per-channel mean colour. Blind to a global colour cast, as copy detectors are (SSCD trains with
  colour jitter): an ε-prediction testbed reproduced its photos with a seed-dependent tint, and a
  tinted copy of a face or a photograph is still a copy;
- relative distance ≤ RELATIVE_THRESHOLD: normalized L2 to x divided by the mean normalized L2 to
  the RELATIVE_NEIGHBOURS nearest *other* training images. After Carlini et al. (2023, "Extracting
  Training Data from Diffusion Models"), whose extraction criterion divides the distance to the
  training image by the distance to its nearest neighbours in the training set: a generation
  close to many training images at once (a small shape on a smooth background the set holds in
  many variants) is generic, not a copy of one of them; a copy is far closer to its source than
  to anything else;
- edge correlation ≥ EDGE_THRESHOLD: the Pearson correlation of the two images' gradient
  magnitudes (Sobel on each colour channel after a Gaussian blur of EDGE_BLUR pixels, the channels'
  squares summed). A copy redraws its source's edges. SSIM and the distances above are dominated by
  smooth areas: on the SDXL-format testbed a flat orange smear scored SSIM 0.62-0.67, nRMSE 0.06 and
  rel 0.46 against a training image of an orange triangle on a yellow gradient, with no triangle in
  it (edge correlation under 0.07). Over the 999 plain generations the three other terms call
  copies on the three shipped testbeds, every other one scored ≥ 0.79, and VAE reconstructions of
  the memorized items score higher still (REPORT.md), so the bar sits well below both. Colour
  channels, not grey: an edge between two colours of one brightness is an edge. The blur: pixel
  noise has no edges to redraw. A source with no edges at all (a flat image) leaves the term
  vacuous: its copies are judged by the other three.

The testbed's VAE caps how close any generation can get: its reconstructions of the photos reach
SSIM ≈ 0.8-0.95 (REPORT.md lists them), so the SSIM threshold sits below that cap and well above
what distinct training images score against each other (the report shows both).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.filters import gaussian, sobel
from skimage.metrics import structural_similarity

SSIM_THRESHOLD = 0.5
RMSE_THRESHOLD = 0.12
RELATIVE_THRESHOLD = 0.5
RELATIVE_NEIGHBOURS = 50
EDGE_THRESHOLD = 0.3
EDGE_BLUR = 1.0          # Gaussian sigma in pixels before the Sobel filter


@dataclass(frozen=True)
class CopyScore:
    ssim: float
    rmse: float          # normalized L2: RMSE after removing each image's mean colour
    relative: float      # rmse / mean rmse to the nearest other training images
    raw_rmse: float      # plain RMSE, for diagnosis
    edges: float         # correlation of the gradient magnitudes (1.0 when the source has no edges)

    @property
    def is_copy(self) -> bool:
        return is_near_copy(self.ssim, self.rmse, self.relative, self.edges)


def is_near_copy(ssim_value: float, normalized_rmse_value: float, relative_value: float,
                 edge_value: float) -> bool:
    """The judge's rule, for scores already measured (REPORT.md re-counts stored figures with it)."""
    return (ssim_value >= SSIM_THRESHOLD and normalized_rmse_value <= RMSE_THRESHOLD
            and relative_value <= RELATIVE_THRESHOLD and edge_value >= EDGE_THRESHOLD)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 [H, W, 3] images (colour, 7×7 windows)."""
    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square difference on [0, 1] pixels."""
    d = a.astype(np.float32) / 255.0 - b.astype(np.float32) / 255.0
    return float(np.sqrt(np.mean(d * d)))


def _edge_map(image: np.ndarray) -> np.ndarray:
    """Gradient magnitude of a uint8 [H, W, C] image: Sobel per channel after a light blur, flattened."""
    x = gaussian(image.astype(np.float32) / 255.0, sigma=EDGE_BLUR, channel_axis=-1)
    return np.sqrt(sum(sobel(x[..., c]) ** 2 for c in range(x.shape[-1]))).ravel()


def _centred_edges(image: np.ndarray) -> np.ndarray:
    e = _edge_map(image)
    return e - e.mean()


def _correlate_edges(generated: np.ndarray, source: np.ndarray) -> float:
    """Pearson correlation of two centred edge maps (as `_centred_edges` gives them)."""
    if not np.any(np.abs(source) > 1e-6):
        return 1.0
    norm = float(np.linalg.norm(generated) * np.linalg.norm(source))
    return float(generated @ source) / norm if norm > 0 else 0.0


def edge_correlation(generated: np.ndarray, source: np.ndarray) -> float:
    """Pearson correlation of the gradient magnitudes of two uint8 [H, W, 3] images; 1.0 when the
    source has no edges (nothing to redraw: the other terms judge it), 0.0 when only the generation has none."""
    return _correlate_edges(_centred_edges(generated), _centred_edges(source))


def _centred(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] → float32 [..., H·W·3] on [0, 1] with each image's per-channel mean removed."""
    x = images.astype(np.float32) / 255.0
    x = x - x.mean(axis=(-3, -2), keepdims=True)
    return x.reshape(*x.shape[:-3], -1)


def normalized_rmse(a: np.ndarray, b: np.ndarray) -> float:
    """RMSE on [0, 1] pixels after removing each image's mean colour (blind to a global tint)."""
    d = _centred(a) - _centred(b)
    return float(np.sqrt(np.mean(d * d)))


@dataclass(frozen=True)
class References:
    """The training images, prepared once for many judgements (the centring and edge maps are the costly part)."""
    images: np.ndarray       # uint8 [M, H, W, 3]
    centred: np.ndarray      # float32 [M, H·W·3]
    edges: np.ndarray        # float32 [M, H·W]: each image's centred edge map

    @classmethod
    def of(cls, images: np.ndarray) -> "References":
        if len(images) < 2:
            raise ValueError("the judge needs at least 2 training images (the relative distance compares them)")
        return cls(images, _centred(images), np.stack([_centred_edges(im) for im in images]))

    def distances(self, generated: np.ndarray) -> np.ndarray:
        """Normalized L2 of a uint8 [H, W, 3] image to every reference → float32 [M]."""
        return np.sqrt(((self.centred - _centred(generated)[None]) ** 2).mean(axis=1))


def _refs(references: np.ndarray | References) -> References:
    return references if isinstance(references, References) else References.of(references)


def _score(generated: np.ndarray, target: int, refs: References, dist: np.ndarray, order: np.ndarray,
           exclude: int | None, edges: np.ndarray) -> CopyScore:
    """dist: normalized L2 to every reference; order: argsort(dist); edges: the generation's centred
    edge map; all three shared by all targets."""
    nearest_others = order[(order != target) & (order != (-1 if exclude is None else exclude))]
    context = float(dist[nearest_others[:RELATIVE_NEIGHBOURS]].mean())
    d = float(dist[target])
    source = refs.images[target]
    return CopyScore(ssim(generated, source), d, d / max(context, 1e-12), rmse(generated, source),
                     _correlate_edges(edges, refs.edges[target]))


def copy_score(generated: np.ndarray, target: int, references: np.ndarray | References) -> CopyScore:
    """How close `generated` (uint8 [H, W, 3]) comes to being a copy of references[target]."""
    refs = _refs(references)
    dist = refs.distances(generated)
    return _score(generated, target, refs, dist, np.argsort(dist), None, _centred_edges(generated))


def nearest(generated: np.ndarray, references: np.ndarray | References, shortlist: int = 16,
            exclude: int | None = None) -> tuple[int, CopyScore]:
    """The reference that comes closest to being copied: among the `shortlist` closest in normalized
    L2, a near copy if any (the closest in normalized L2 first), else the highest SSIM.
    references: uint8 [M, H, W, 3], or `References.of(...)` of them when calling many times;
    exclude: a reference index to leave out (an image judged against the set that holds it)."""
    refs = _refs(references)
    dist = refs.distances(generated)
    order = np.argsort(dist)
    candidates = order[order != (-1 if exclude is None else exclude)][:shortlist]
    edges = _centred_edges(generated)
    scores = [(int(i), _score(generated, int(i), refs, dist, order, exclude, edges)) for i in candidates]
    found = [s for s in scores if s[1].is_copy]
    return found[0] if found else max(scores, key=lambda s: s[1].ssim)
