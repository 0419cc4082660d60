"""Our kernels are `memguard.kernels`: the top-level import name `kernels` belongs to the PyPI
distribution (Hugging Face's, which transformers>=5.25 requires) and is never shadowed by ours."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memguard import kernels


def test_unknown_name_is_a_plain_attribute_error() -> None:
    assert not hasattr(kernels, "CUDAProperties")
    with pytest.raises(ImportError, match="cannot import name 'CUDAProperties' from 'memguard.kernels'"):
        from memguard.kernels import CUDAProperties  # noqa: F401


def test_a_top_level_kernels_package_coexists_with_ours(tmp_path: Path) -> None:
    # Stand-in for the PyPI `kernels`, first on sys.path: it is what `import kernels` gives,
    # and memguard.kernels still resolves to the repository's package.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'pypi'\n")
    code = ("import kernels, memguard.kernels as ours\n"
            "print(kernels.CUDAProperties, ours.__name__, callable(ours.latent_fingerprint))")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["pypi", "memguard.kernels", "True"]
    assert Path(kernels.__file__).resolve().parent == Path(__file__).resolve().parents[2] / "kernels"
