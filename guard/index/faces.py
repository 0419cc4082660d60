"""Faces: dlib's HOG detector, 5-point alignment and 128-d ResNet descriptor.

The model files ship in the `face_recognition_models` package. Its own __init__ imports
pkg_resources (absent from new setuptools), so the files are located through the import system
without executing it. Descriptors of one person lie within Euclidean distance ~0.6 of each other
(dlib's convention); `calibrate` measures the threshold on real data.

Small images: the HOG detector finds faces of at least ~80 px. Images whose short side is below
`upscale_to` (400 by default) are upscaled (Lanczos) by an integer factor (≤ 8) first: a 64×64
image is searched at 448×448, so faces of about 12-15 px and up are found (the testbed's faces are
~22 px); a 160 px image is searched at 480 px (faces from ~28 px). Measured: at 256 px instead,
faces of 28 px in a 160 px image were missed.
"""
from __future__ import annotations

import importlib.util
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memguard.errors import InvalidInput, MissingResource
from memguard.index.pdq import check_image

FACE_DIM = 128
MAX_WORK_PIXELS = 2048 * 2048   # cap of the detector's working copy (upscaled or not): bounded memory and time
MAX_FACES = 32                  # faces described per screened image (~0.2 s each, under one lock); more: refused
MODEL_FILES = {"landmarks": "shape_predictor_5_face_landmarks.dat",
               "descriptor": "dlib_face_recognition_resnet_model_v1.dat"}


def model_dir() -> Path:
    """Directory of the .dat files of the installed face_recognition_models package (not imported)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingResource("face screening needs the 'face-recognition-models' package")
    directory = Path(list(spec.submodule_search_locations)[0]) / "models"
    for name in MODEL_FILES.values():
        if not (directory / name).is_file():
            raise MissingResource(f"{directory / name}: face model file missing")
    return directory


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[int, int, int, int]      # left, top, right, bottom in the input image's pixels
    descriptor: np.ndarray              # [128] float32


class FaceEmbedder:
    """Detects faces and computes descriptors. Loads dlib models on first use; thread-safe."""

    def __init__(self, upscale_to: int = 400, max_upscale: int = 8, max_work_pixels: int = MAX_WORK_PIXELS):
        self.upscale_to = upscale_to
        self.max_upscale = max_upscale
        self.max_work_pixels = max_work_pixels
        self._models = None
        self._lock = threading.Lock()

    def _load(self):
        if self._models is None:
            try:
                import dlib
            except ImportError as exc:
                raise MissingResource("face screening needs the 'dlib-bin' package") from exc
            directory = model_dir()
            self._models = (dlib.get_frontal_face_detector(),
                            dlib.shape_predictor(str(directory / MODEL_FILES["landmarks"])),
                            dlib.face_recognition_model_v1(str(directory / MODEL_FILES["descriptor"])))
        return self._models

    def upscale_factor(self, height: int, width: int) -> int:
        short = min(height, width)
        return 1 if short >= self.upscale_to else min(self.max_upscale, math.ceil(self.upscale_to / short))

    def work_scale(self, height: int, width: int) -> float:
        """The upscale factor, capped so that the working copy holds at most max_work_pixels
        (below 1: a very large input is downscaled)."""
        return min(float(self.upscale_factor(height, width)), math.sqrt(self.max_work_pixels / (height * width)))

    def detect(self, image: np.ndarray, field_name: str = "image",
               max_faces: int | None = MAX_FACES) -> list[DetectedFace]:
        """Every frontal face in an RGB uint8 image [H, W, 3], largest first. More than `max_faces`
        (None: no bound, for building an index) raises InvalidInput naming the field before any
        descriptor is computed: a picture tiled with faces cannot hold the detector for minutes, and
        no face is left unscreened by keeping only some."""
        image = check_image(image, field_name)
        factor = self.work_scale(*image.shape[:2])
        work = image
        size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
        if size != (image.shape[1], image.shape[0]):
            from PIL import Image
            work = np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))
        with self._lock:
            detector, landmarks, descriptor = self._load()
            found = []
            rects = list(detector(work, 0))
            if max_faces is not None and len(rects) > max_faces:
                raise InvalidInput(field_name, f"{len(rects)} faces; at most {max_faces} are screened per image")
            for rect in rects:
                shape = landmarks(work, rect)
                vec = np.asarray(descriptor.compute_face_descriptor(work, shape), dtype=np.float32)
                box = tuple(int(round(v / factor)) for v in (rect.left(), rect.top(), rect.right(), rect.bottom()))
                found.append(DetectedFace(box, vec))
        return sorted(found, key=lambda f: -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
