"""One import name (issue 31): what is installed is `memguard` and its subpackages, nothing else.

The repository keeps its top-level folders (guard/, kernels/, server/, proto/, benchmarks/);
pyproject.toml maps them to memguard, memguard.kernels, memguard.server, memguard.proto and
memguard.benchmarks. None of those folder names may be importable from an install."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"guard": "memguard", "kernels": "memguard.kernels", "server": "memguard.server",
           "proto": "memguard.proto", "benchmarks": "memguard.benchmarks"}


def _repo_packages() -> set[str]:
    """Every package in the repository's folders, under its installed (dotted) name."""
    names = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            names.add(".".join([package, *rel.parts]))
    return names


def _source_copy(dest: Path) -> Path:
    """The files a clean clone has (git's index when there is one), without build leftovers."""
    dest.mkdir()
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", "pyproject.toml", "README.md", *FOLDERS],
                                cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
        files = [f for f in listed.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if files:
        for rel in files:
            if (ROOT / rel).is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
    else:
        for rel in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / rel, dest / rel)
        for folder in FOLDERS:
            shutil.copytree(ROOT / folder, dest / folder,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.sqlite-wal", "*.sqlite-shm"))
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "-w", str(tmp / "dist"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    (whl,) = (tmp / "dist").glob("memguard-*.whl")
    with zipfile.ZipFile(whl) as z:
        yield z


def test_wheel_installs_only_memguard(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"memguard"}, sorted(top)
    (info,) = [t for t in top if t.endswith(".dist-info")]
    assert wheel.read(f"{info}/top_level.txt").decode().split() == ["memguard"]
    assert "memguard = memguard.cli:main" in wheel.read(f"{info}/entry_points.txt").decode()
    # Every package of the repository is there, under its memguard name.
    for package in sorted(_repo_packages()):
        assert package.replace(".", "/") + "/__init__.py" in names, package
    # Package data moved with its package.
    for data in ("memguard/proto/memguard/v1/memguard.proto", "memguard/proto/memguard/v1/admin_pb2.pyi",
                 "memguard/testbed/policy.json", "memguard/testbed/demo-data.key", "memguard/testbed/REPORT.md",
                 "memguard/testbed/contact_sheet.png", "memguard/testbed/prompts/memorized.txt",
                 "memguard/testbed/model/model_index.json"):
        assert data in names, data


def test_installed_distribution_names_one_top_level() -> None:
    dist = metadata.distribution("memguard")
    assert (dist.read_text("top_level.txt") or "").split() == ["memguard"]
    (script,) = [ep for ep in dist.entry_points if ep.group == "console_scripts" and ep.name == "memguard"]
    assert script.value == "memguard.cli:main"


def test_installed_package_imports_from_outside_the_repository(tmp_path: Path) -> None:
    code = f"""
import importlib.util, json, sys
from pathlib import Path
import memguard, memguard.cli, memguard.index.backends, memguard.testbed
import memguard.kernels, memguard.server.client, memguard.benchmarks
import memguard.proto.memguard.v1.memguard_pb2_grpc, memguard.proto.memguard.v1.admin_pb2_grpc
root = Path({str(ROOT)!r})
def shadowed(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    where = list(spec.submodule_search_locations or []) + [spec.origin or ""]
    return [w for w in where if w and Path(w).resolve().is_relative_to(root / name)]
print(json.dumps({{
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in {sorted(FOLDERS)!r}),
    "shadowed": {{name: shadowed(name) for name in {sorted(FOLDERS)!r}}},
    "kernels": memguard.kernels.__name__,
}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [], out["loaded"]
    # None of the repository's folders is importable under its own name (a PyPI `kernels` may be).
    assert all(not where for where in out["shadowed"].values()), out["shadowed"]
    assert out["kernels"] == "memguard.kernels"


def test_the_suite_does_not_see_the_repository_folders_as_top_level_packages() -> None:
    # scripts/test.sh runs pytest's script, so the repository root is not on sys.path: `kernels`
    # (the PyPI distribution transformers>=5.25 imports) is never shadowed by our kernels/.
    import memguard.kernels

    assert Path(memguard.kernels.__file__).resolve().parent == ROOT / "kernels"
    for name in FOLDERS:
        assert name not in sys.modules or not Path(getattr(sys.modules[name], "__file__", None) or "/") \
            .resolve().is_relative_to(ROOT / name), name
        spec = importlib.util.find_spec(name)
        assert spec is None or not spec.origin or not Path(spec.origin).resolve().is_relative_to(ROOT / name), \
            f"`import {name}` would load the repository's {name}/ folder"
