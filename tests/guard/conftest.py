"""Fixtures for the guard's tests: the tiny random pipeline, small indexes, and the trained testbed.

Everything runs on one CPU thread: the suite shares two cores with other jobs, and oversubscribed
OpenMP threads are ten times slower than one.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from memguard.calibrate import TESTBED_INDEX_DIR, TESTBED_MODEL_DIR, TESTBED_POLICY

HAVE_TESTBED = (TESTBED_MODEL_DIR / "model_index.json").is_file()
HAVE_TESTBED_GUARD = HAVE_TESTBED and (TESTBED_INDEX_DIR / "manifest.json").is_file() and TESTBED_POLICY.is_file()
needs_testbed = pytest.mark.skipif(not HAVE_TESTBED_GUARD,
                                   reason="the trained testbed with its index and policy is not in the tree")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pipe():
    from memguard.models import build_tiny_pipeline

    torch.manual_seed(int(np.random.default_rng().integers(2**31)))   # fresh random weights each run
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_pipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-model")
    tiny_pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_index_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """An index of 24 procedural images and the 8 photos, built with the tiny model's VAE."""
    from memguard.index.api import FingerprintIndex
    from memguard.index.config import IndexConfig
    from memguard.index.sources import ImageFolderSource
    from memguard.testbed.dataset import TestbedDataConfig, build_training_set, write_image_folder

    items = build_training_set(TestbedDataConfig(num_procedural=24))
    folder = write_image_folder(items, tmp_path_factory.mktemp("tiny-images"))
    out = tmp_path_factory.mktemp("tiny-index") / "index"
    FingerprintIndex.build(out, ImageFolderSource(folder), model_dir=tiny_model_dir, progress=False,
                           cfg=IndexConfig(faces=False))
    return out


@pytest.fixture()
def tiny_index(tiny_index_dir, tiny_model_dir, tmp_path):
    """A private, writable copy of the tiny index (tests may protect items or break it)."""
    from memguard.index.api import FingerprintIndex

    copy = tmp_path / "index"
    shutil.copytree(tiny_index_dir, copy)
    index = FingerprintIndex.open(copy, model_dir=tiny_model_dir)
    yield index
    try:
        index.close()
    except Exception:
        pass


@pytest.fixture(scope="session")
def testbed_pipe():
    from memguard.loading import load_pipeline

    return load_pipeline()


@pytest.fixture()
def testbed_index(tmp_path):
    """A writable copy of the shipped testbed index."""
    from memguard.index.api import FingerprintIndex

    copy = tmp_path / "testbed-index"
    shutil.copytree(TESTBED_INDEX_DIR, copy)
    index = FingerprintIndex.open(copy, model_dir=TESTBED_MODEL_DIR)
    yield index
    index.close()


@pytest.fixture(scope="session")
def testbed_policy():
    from memguard.policy import Policy

    return Policy.load(TESTBED_POLICY)
