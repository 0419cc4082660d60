"""Choose the protected registry's store by URI.

    None / "sqlite"           registry.sqlite in the index directory (the embedded default)
    sqlite:///abs/path.sqlite  a SQLite registry elsewhere
    postgresql://…             the registry shared by replicas (memguard.index.registry_pg)

The URI comes from the caller (FingerprintIndex.open(..., registry=URI)), else the environment
variable MEMGUARD_REGISTRY (what `memguard serve --registry` and `[server] registry` set), else
the default.
"""
from __future__ import annotations

import os
from pathlib import Path

from memguard.crypto import DataKey
from memguard.errors import InvalidInput
from memguard.index.manifest import REGISTRY_DB
from memguard.index.registry_sql import SqlRegistry

ENV_REGISTRY = "MEMGUARD_REGISTRY"


def registry_uri(uri: str | None = None) -> str | None:
    return uri or os.environ.get(ENV_REGISTRY) or None


def open_registry(uri: str | None, index_dir: Path, *, key: DataKey | None = None) -> SqlRegistry:
    uri = registry_uri(uri)
    if uri is None or uri == "sqlite":
        from memguard.index.store import Registry
        return Registry(Path(index_dir) / REGISTRY_DB, key=key)
    if uri.startswith("sqlite://"):
        from memguard.index.store import Registry
        path = Path(uri.removeprefix("sqlite://"))
        return Registry(path, create=not path.exists(), key=key)
    if uri.startswith(("postgresql://", "postgres://")):
        from memguard.index.registry_pg import PgRegistry
        return PgRegistry(uri, key=key)
    raise InvalidInput("registry", f"{uri.split(':', 1)[0]}:…: expected postgresql://…, sqlite:///PATH or sqlite")
