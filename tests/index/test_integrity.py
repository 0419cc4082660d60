"""A corrupted, truncated or unfinished index is never loaded; the error names the file or collection."""
import json

import pytest

from memguard.errors import CorruptData
from memguard.index.api import FingerprintIndex
from memguard.index.config import IndexConfig
from memguard.index.sources import ImageFolderSource
from tests.index.conftest import on

# files every index directory holds whatever the backend, and the faiss backend's vector files
SHARED_FILES = ["items.sqlite", "align.npy"]
FAISS_FILES = ["latent.npy", "latent.faiss", "pdq.npy", "face.faiss"]


def _flip_byte(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", SHARED_FILES)
def test_a_flipped_byte_is_caught_by_the_checksum(index_dir, name):
    _flip_byte(index_dir / name)
    with pytest.raises(CorruptData, match=name.replace(".", r"\.")):
        FingerprintIndex.open(index_dir)


@pytest.mark.parametrize("name", FAISS_FILES)
def test_a_flipped_byte_in_a_faiss_file_is_caught_by_the_checksum(faiss_index_dir, name):
    _flip_byte(faiss_index_dir / name)
    with pytest.raises(CorruptData, match=name.replace(".", r"\.")):
        FingerprintIndex.open(faiss_index_dir)


@pytest.mark.parametrize("name", ["latent.npy", "latent.faiss", "pdq.faiss"])
def test_a_truncated_file_is_caught_even_without_checksums(faiss_index_dir, name):
    index_dir = faiss_index_dir
    path = index_dir / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptData, match=name.replace(".", r"\.")) as err:
        FingerprintIndex.open(index_dir, verify_checksums=False)
    assert "truncated" in str(err.value)


def test_a_garbled_faiss_file_is_reported_by_name_when_checksums_are_skipped(faiss_index_dir):
    index_dir = faiss_index_dir
    path = index_dir / "latent.faiss"
    data = bytearray(path.read_bytes())
    data[:8] = b"GARBAGE!"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptData, match=r"latent\.faiss"):
        FingerprintIndex.open(index_dir, verify_checksums=False)


def test_missing_or_mangled_manifest(index_dir):
    manifest = index_dir / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    with pytest.raises(CorruptData, match=r"manifest\.json"):
        FingerprintIndex.open(index_dir)
    del data["signals"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(CorruptData, match=r"manifest\.json.*signals"):
        FingerprintIndex.open(index_dir)
    manifest.unlink()
    with pytest.raises(CorruptData, match=r"manifest\.json: missing"):
        FingerprintIndex.open(index_dir)


def test_a_corrupt_registry_names_the_database(index_dir):
    (index_dir / "registry.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(CorruptData, match=r"registry\.sqlite"):
        FingerprintIndex.open(index_dir)


def test_an_unfinished_build_is_not_loadable(tmp_path, image_folder, vae_dir, backend):
    out = tmp_path / "partial"
    report = FingerprintIndex.build(out, ImageFolderSource(image_folder), model_dir=vae_dir, progress=False,
                                    stop_after=10, cfg=on(backend))
    assert not report.finished and report.items == 10
    with pytest.raises(CorruptData, match="unfinished build"):
        FingerprintIndex.open(out)


def _milvus_collection(built_index, signal):
    manifest = json.loads((built_index / "manifest.json").read_text())
    return manifest["signals"][signal]["backend"]


def test_a_milvus_collection_that_lost_rows_or_vanished_is_named(tmp_path, image_folder, vae_dir, milvus_uri):
    from pymilvus import MilvusClient
    out = tmp_path / "ix"
    FingerprintIndex.build(out, ImageFolderSource(image_folder), model_dir=vae_dir, progress=False,
                           cfg=on(milvus_uri, IndexConfig(faces=False, align_maps=False)))
    info = _milvus_collection(out, "pdq")
    client = MilvusClient(uri=milvus_uri)
    client.delete(info["collection"], ids=[3])
    with pytest.raises(CorruptData, match=rf"{info['collection']}.*holds \d+ rows, manifest says"):
        FingerprintIndex.open(out)
    client.drop_collection(info["collection"])
    with pytest.raises(CorruptData, match=rf"{info['collection']}.*missing"):
        FingerprintIndex.open(out)


def test_index_files_are_private(built_index):
    """Fingerprints and face descriptors: owner read/write only (issue 14)."""
    modes = {p.name: p.stat().st_mode & 0o777 for p in built_index.iterdir() if p.is_file()}
    assert modes and all(m == 0o600 for m in modes.values()), modes
