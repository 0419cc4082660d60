"""Our `kernels` package shares its import name with the PyPI distribution `kernels`
(transformers>=5.25 requires it). A caller that wanted that one must get an error naming the clash."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import kernels


def _fake_distribution(root: Path, version: str) -> None:
    # A real dist-info directory that importlib.metadata discovers on sys.path.
    info = root / f"kernels-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")


def test_unknown_name_is_a_plain_attribute_error_without_the_clash() -> None:
    assert not hasattr(kernels, "CUDAProperties")
    with pytest.raises(ImportError, match="cannot import name 'CUDAProperties' from 'kernels'"):
        from kernels import CUDAProperties  # noqa: F401


def test_import_from_names_the_shadowed_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_distribution(tmp_path, "0.19.1")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"shadows the installed PyPI 'kernels' 0\.19\.1.*transformers<5\.25"):
        from kernels import CUDAProperties  # noqa: F401
    # Our own exports still resolve.
    assert callable(kernels.latent_fingerprint)
    assert "kernels" in sys.modules


def test_the_environment_holds_no_clashing_distribution() -> None:
    # setup.sh bounds transformers below 5.25 and removes an orphaned `kernels`; CI runs in that venv.
    from importlib import metadata

    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("kernels")
