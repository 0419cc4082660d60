"""Shared fixtures: a random-weight VAE, a slice of the testbed training set, one built index per backend.

The index is built once per session and backend (about 70 items incl. the 8 photos, 2 with
faces); tests that change it work on a copy (`index_dir`; a copy of a Milvus-backed index shares
its collections, which searches only read). Every test that takes `backend`, `built_index`,
`index_dir` or `index` runs on both backends: faiss files, and Milvus through a real milvus-lite
server process started once per session. Nothing here needs the trained testbed model.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from memguard.index.api import FingerprintIndex
from memguard.index.config import IndexConfig
from memguard.index.sources import ImageFolderSource
from memguard.models import build_vae
from memguard.testbed.dataset import PHOTOS, build_training_set, heldout_images, photo_path, write_image_folder

N_PROCEDURAL = 60


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("model")
    build_vae().save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="session")
def items():
    everything = build_training_set()
    return everything[:N_PROCEDURAL] + [i for i in everything if i.kind == "photo"]


@pytest.fixture(scope="session")
def heldout():
    return heldout_images(count=40)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory, items) -> Path:
    return write_image_folder(items, tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory):
    """A milvus-lite server on a free loopback port for the whole session (its own process)."""
    from memguard.index.backends.lite_server import start_lite_server
    server = start_lite_server(tmp_path_factory.mktemp("milvus"))
    yield server.uri
    server.stop()


@pytest.fixture(scope="session", params=["faiss", "milvus"])
def backend(request) -> str:
    """The vector backend URI of IndexConfig.backend: "faiss", or the session's milvus-lite server."""
    return "faiss" if request.param == "faiss" else request.getfixturevalue("milvus_uri")


def on(backend: str, cfg: IndexConfig = IndexConfig()) -> IndexConfig:
    return replace(cfg, backend=backend)


@pytest.fixture(scope="session")
def build_on(tmp_path_factory, image_folder, vae_dir):
    """backend → the session's index built there (each built once)."""
    built: dict[str, Path] = {}

    def build(backend: str) -> Path:
        if backend not in built:
            out = tmp_path_factory.mktemp("built") / "index"
            report = FingerprintIndex.build(out, ImageFolderSource(image_folder), model_dir=vae_dir,
                                            cfg=on(backend, IndexConfig(batch_size=16)), progress=False)
            assert report.finished and report.skipped == 0
            built[backend] = out
        return built[backend]
    return build


@pytest.fixture(scope="session")
def built_index(build_on, backend) -> Path:
    return build_on(backend)


@pytest.fixture
def faiss_index_dir(build_on, tmp_path) -> Path:
    """A private copy of the faiss-built index: for tests about the faiss files themselves."""
    return Path(shutil.copytree(build_on("faiss"), tmp_path / "index"))


@pytest.fixture
def index_dir(built_index, tmp_path) -> Path:
    """A private copy of the built index, free to modify."""
    return Path(shutil.copytree(built_index, tmp_path / "index"))


@pytest.fixture
def index(index_dir):
    with FingerprintIndex.open(index_dir) as ix:
        yield ix


@pytest.fixture(scope="session")
def full_photo():
    """key -> the full-size original photo (RGB uint8), not the 64×64 training crop."""
    from PIL import Image

    def load(key: str) -> np.ndarray:
        photo = next(p for p in PHOTOS if p.key == key)
        return np.asarray(Image.open(photo_path(photo)).convert("RGB"))
    return load


def assert_opens_only_with_its_key(index_dir: Path, monkeypatch, missing: str, wrong: str) -> None:
    """Without a data key the index does not open (MissingResource matching `missing`); with another
    key it does not either (CorruptData matching `wrong`)."""
    from memguard.errors import CorruptData, MissingResource
    monkeypatch.delenv("MEMGUARD_DATA_KEY")
    with pytest.raises(MissingResource, match=missing):
        FingerprintIndex.open(index_dir)
    monkeypatch.setenv("MEMGUARD_DATA_KEY", "77" * 32)
    with pytest.raises(CorruptData, match=wrong):
        FingerprintIndex.open(index_dir)


def run(capsys, *argv) -> tuple[int, dict | str, str]:
    """`memguard` with argv in-process: exit code, stdout (parsed when it is JSON), stderr."""
    import json

    from memguard.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    try:
        return code, json.loads(out), err
    except json.JSONDecodeError:
        return code, out, err
