"""Suite-wide settings: no hub access, deterministic CPU threads."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Pythons the tests start (often `-m memguard.…` from the repository root) must not put their cwd on
# sys.path: the folder kernels/ would hide the PyPI `kernels` that transformers imports.
os.environ.setdefault("PYTHONSAFEPATH", "1")

# The repository root is not on sys.path either (scripts/test.sh), yet tests share helpers as
# `from tests.index.conftest import ...`: name this folder `tests` (a namespace package, as it was
# from the root) without putting the root's other folders in reach.
import sys  # noqa: E402
import types  # noqa: E402

if "tests" not in sys.modules:
    _tests = types.ModuleType("tests")
    _tests.__path__ = [os.path.dirname(os.path.abspath(__file__))]
    sys.modules["tests"] = _tests

# --- registry (issues 14, 15): a test data key (face protections are sealed with it) and one
# throwaway PostgreSQL server per session, started on first use ---
import pytest  # noqa: E402

os.environ.setdefault("MEMGUARD_DATA_KEY", "5a" * 32)


@pytest.fixture(scope="session")
def postgres():
    from memguard.errors import MissingResource
    from memguard.index.pg_local import LocalPostgres

    try:
        server = LocalPostgres.start()
    except MissingResource as exc:
        pytest.skip(f"no PostgreSQL server binaries: {exc}")
    yield server
    server.stop()
# --- end registry ---
