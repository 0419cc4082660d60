"""Image encoders: the pipeline's own VAE → latent fingerprint; optionally an open_clip embedding.

Both load from local paths only (a diffusers model directory, an open_clip checkpoint file); no
download is ever attempted. The latent fingerprint is `memguard.kernels.fingerprint.latent_fingerprint` of
the VAE posterior mean, the same function the guard applies to x̂0 at every denoising step.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from memguard.errors import InvalidInput, MissingResource
from memguard.index.pdq import check_image
from memguard.digest import sha256_file
from memguard.index.vectors import normalize_rows


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop of an RGB uint8 image, resized to size×size (Lanczos) → [size, size, 3] uint8."""
    from PIL import Image
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(crop)
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.LANCZOS))


def vae_location(model_dir: Path) -> tuple[Path, str | None]:
    """(directory, subfolder) of an AutoencoderKL inside a pipeline directory or a bare VAE directory."""
    model_dir = Path(model_dir)
    if (model_dir / "vae" / "config.json").is_file():
        return model_dir, "vae"
    if (model_dir / "config.json").is_file():
        return model_dir, None
    raise MissingResource(f"{model_dir}: neither {model_dir}/vae/config.json nor {model_dir}/config.json exists")


class LatentEncoder:
    """Images → latent fingerprints [B, F] float32 through a diffusers AutoencoderKL (CPU or GPU)."""

    def __init__(self, model_dir: Path, device: str = "cpu"):
        import torch
        from diffusers import AutoencoderKL

        from memguard.index.align import ALIGN_GRID
        from memguard.kernels.fingerprint import FINGERPRINT_GRID, fingerprint_dim

        self.model_dir = Path(model_dir)
        root, subfolder = vae_location(self.model_dir)
        try:
            self.vae = AutoencoderKL.from_pretrained(root, subfolder=subfolder, local_files_only=True,
                                                     low_cpu_mem_usage=False)
        except (OSError, ValueError) as exc:
            raise MissingResource(f"{self.model_dir}: cannot load the VAE ({exc})") from exc
        self.vae.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        cfg = self.vae.config
        size = cfg.sample_size
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.scaling_factor = float(cfg.scaling_factor)
        self.grid = FINGERPRINT_GRID
        self.dim = fingerprint_dim(cfg.latent_channels, FINGERPRINT_GRID)
        self.channels = int(cfg.latent_channels)
        self.map_grid = min(ALIGN_GRID, self.image_size // 2 ** (len(cfg.block_out_channels) - 1))
        self.map_dim = self.channels * self.map_grid ** 2
        self._vae_dir = root / subfolder if subfolder else root
        self._lock = threading.Lock()

    def describe(self) -> dict:
        weights = sorted(p for p in self._vae_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
        return {"kind": "vae_latent_fingerprint", "path": str(self.model_dir.resolve()), "dim": self.dim,
                "grid": self.grid, "latent_channels": self.channels, "map_grid": self.map_grid,
                "image_size": self.image_size, "config_sha256": sha256_file(self._vae_dir / "config.json"),
                "weights_sha256": {p.name: sha256_file(p) for p in weights}}

    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 images (any size) → fingerprints [B, F] float32 with unit rows."""
        return self.encode_with_maps(images)[0]

    def encode_with_maps(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One VAE pass → (fingerprints [B, F] float32 unit rows, latent maps [B, map_dim] float16
        for the aligned re-score, see memguard.index.align)."""
        import torch

        from memguard.index.align import latent_map
        from memguard.kernels.fingerprint import latent_fingerprint

        if not images:
            return np.zeros((0, self.dim), np.float32), np.zeros((0, self.map_dim), np.float16)
        batch = np.stack([square_resize(check_image(im, f"images[{i}]"), self.image_size)
                          for i, im in enumerate(images)])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(self.device)
        with self._lock, torch.inference_mode():
            mean = self.vae.encode(x).latent_dist.mean * self.scaling_factor
            return latent_fingerprint(mean).cpu().numpy(), latent_map(mean, self.map_grid)

    def round_trip(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Each image through the VAE and back (RGB uint8 at the VAE's size): what a generation that
        copies the image perfectly decodes to. Index calibration's positives of the model's kind."""
        import torch

        if not images:
            return []
        batch = np.stack([square_resize(check_image(im, f"images[{i}]"), self.image_size)
                          for i, im in enumerate(images)])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(self.device)
        with self._lock, torch.inference_mode():
            out = self.vae.decode(self.vae.encode(x).latent_dist.mean).sample
        out = out.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [np.ascontiguousarray(o) for o in out]

# open_clip weights shipped with MemGuard: the testbeds' CLIP (guard/testbed/clip/, trained here)
BUNDLED_CLIP_WEIGHTS = Path(__file__).resolve().parents[1] / "testbed" / "clip" / "open_clip_model.safetensors"


class ClipEncoder:
    """Images → open_clip image embeddings [B, D] float32, unit rows, from a LOCAL checkpoint file."""

    def __init__(self, model_name: str, weights: Path, device: str = "cpu"):
        import open_clip
        import torch

        self.model_name, self.weights = model_name, Path(weights)
        if not self.weights.is_file():
            raise MissingResource(f"{self.weights}: open_clip weights file not found (downloads are never attempted)")
        # a custom architecture ships its open_clip config beside the weights as <model_name>.json
        # (e.g. the testbed judge: memguard-testbed-clip, guard/testbed/clip/); built-in names are unchanged
        local_config = self.weights.parent / f"{model_name}.json"
        if model_name not in open_clip.list_models() and local_config.is_file():
            open_clip.add_model_config(local_config)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(self.weights),
                                                                         device=device)
        except RuntimeError as exc:
            raise MissingResource(f"{self.weights}: open_clip cannot load {model_name!r} from it ({exc})") from exc
        except (KeyError, ValueError) as exc:
            raise InvalidInput("clip_model", f"open_clip has no model {model_name!r} ({exc})") from exc
        self.model, self.preprocess = model.eval(), preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)
        self.dim = int(model.visual.output_dim)
        self._lock = threading.Lock()

    def describe(self) -> dict:
        return {"kind": "open_clip", "model": self.model_name, "path": str(self.weights.resolve()),
                "dim": self.dim, "weights_sha256": sha256_file(self.weights)}

    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        import torch
        from PIL import Image

        if not images:
            return np.zeros((0, self.dim), np.float32)
        x = torch.stack([self.preprocess(Image.fromarray(check_image(im, f"images[{i}]")))
                         for i, im in enumerate(images)]).to(self.device)
        with self._lock, torch.inference_mode():
            return normalize_rows(self.model.encode_image(x).float().cpu().numpy())

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Captions → [N, D] float32 unit rows (open_clip's tokenizer; longer captions are truncated)."""
        import torch

        if not texts:
            return np.zeros((0, self.dim), np.float32)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInput(f"texts[{i}]", f"must be a string, got {type(t).__name__}")
        ids = self.tokenizer(list(texts)).to(self.device)
        with self._lock, torch.inference_mode():
            return normalize_rows(self.model.encode_text(ids).float().cpu().numpy())
