"""Regenerate the committed Python stubs from proto/memguard/v1/*.proto.

    python -m memguard.server.protogen            # write proto/memguard/v1/*_pb2*.py(i) in place
    python -m memguard.server.protogen --check    # exit 1 if the committed stubs are stale

The repository's proto/ folder is installed as the package `memguard.proto` (pyproject.toml maps
it), so protoc runs on a copy of the .proto files laid out as `memguard/proto/memguard/v1/` in a
temporary include root: the stubs import each other as `memguard.proto.memguard.v1.*`.
"""
from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("proto/memguard/v1")              # where the sources and stubs live in the repository
PACKAGE_DIR = Path("memguard/proto/memguard/v1")   # the same folder under its installed package name
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The .proto sources, relative to the repository root, sorted."""
    return sorted(p.relative_to(ROOT) for p in (ROOT / PROTO_DIR).glob("*.proto"))


def generated_names() -> list[str]:
    return sorted(p.stem + suffix for p in proto_files() for suffix in GENERATED_SUFFIXES)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpc_tools) on the .proto files; write the stubs into `out_dir`; return them."""
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        include, gen = Path(tmp) / "include", Path(tmp) / "gen"
        (include / PACKAGE_DIR).mkdir(parents=True)
        gen.mkdir()
        for p in proto_files():
            shutil.copyfile(ROOT / p, include / PACKAGE_DIR / p.name)
        args = ["protoc", f"-I{include}", f"-I{well_known}", f"--python_out={gen}",
                f"--pyi_out={gen}", f"--grpc_python_out={gen}"]
        args += [str(include / PACKAGE_DIR / p.name) for p in proto_files()]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in generated_names():
            shutil.copyfile(gen / PACKAGE_DIR / name, out_dir / name)
    return [out_dir / name for name in generated_names()]


def stale_files() -> list[str]:
    """Generated files whose committed copy is missing or differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        committed = ROOT / PROTO_DIR
        return [name for name in generated_names()
                if not (committed / name).is_file()
                or not filecmp.cmp(fresh / name, committed / name, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memguard.server.protogen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {PROTO_DIR / name}", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(ROOT / PROTO_DIR):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
