"""Regenerate the committed Python stubs from proto/memguard/v1/*.proto.

    python -m server.protogen            # write proto/memguard/v1/*_pb2*.py(i) in place
    python -m server.protogen --check    # exit 1 if the committed stubs are stale

Stubs are generated with the repository root on the include path, so they import each other as
`proto.memguard.v1.*` and the package `proto` is importable from an installed checkout.
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("proto/memguard/v1")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The .proto sources, relative to the repository root, sorted."""
    return sorted(p.relative_to(ROOT) for p in (ROOT / PROTO_DIR).glob("*.proto"))


def generated_names() -> list[str]:
    return sorted(p.stem + suffix for p in proto_files() for suffix in GENERATED_SUFFIXES)


def generate(out_root: Path) -> list[Path]:
    """Run protoc (grpc_tools) into `out_root`; return the generated files."""
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    args = ["protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}"]
    args += [str(ROOT / p) for p in proto_files()]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return [out_root / PROTO_DIR / name for name in generated_names()]


def stale_files() -> list[str]:
    """Generated files whose committed copy is missing or differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / PROTO_DIR
        committed = ROOT / PROTO_DIR
        return [name for name in generated_names()
                if not (committed / name).is_file()
                or not filecmp.cmp(fresh / name, committed / name, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.protogen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {PROTO_DIR / name}", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(ROOT):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
