"""API keys with scopes. The key file holds only sha256 hashes of keys, never the keys.

    # keys.toml                                  # or keys.json: {"keys": [{...}, ...]}
    [[keys]]
    name = "web-frontend"
    sha256 = "9f86d08…"                          # sha256 hex of the key
    scopes = ["generate", "screen"]

Clients send `authorization: Bearer <key>` or `x-api-key: <key>`. `memguard apikey` makes a key
and prints the entry. Without a key file the server runs with auth disabled, which the config only
allows on a loopback address; every caller then has every scope (a local developer).

Scopes: `generate`, `screen`, `admin` (the RPCs in METHOD_SCOPES), `audit` (membership details:
matched items, continuous scores, per-step signals) and `guard_override` (may ask for MONITOR or OFF;
without it a request runs in ENFORCE). `KeyRing` holds the current KeyStore; SIGHUP reloads it.
"""
from __future__ import annotations

import contextvars
import hashlib
import json
import secrets
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from memguard.errors import CorruptData, InvalidInput, MissingResource

SCOPES = ("generate", "screen", "admin", "audit", "guard_override")
KEY_PREFIX = "mg_"

# Scope each RPC needs; methods not listed (health, reflection) are public.
METHOD_SCOPES = {
    "/memguard.v1.MemGuard/Generate": "generate",
    "/memguard.v1.MemGuard/GenerateStream": "generate",
    "/memguard.v1.MemGuard/Screen": "screen",
    "/memguard.v1.IndexAdmin/Protect": "admin",
    "/memguard.v1.IndexAdmin/Unprotect": "admin",
    "/memguard.v1.IndexAdmin/GetIndexStats": "admin",
}


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]

    def can(self, scope: str) -> bool:
        return scope in self.scopes


ANONYMOUS_DEV = Principal("local developer (auth disabled)", frozenset(SCOPES))

# The authenticated caller of the RPC being served; set by the auth interceptor.
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def caller_can(scope: str) -> bool:
    principal = current_principal.get()
    return principal is not None and principal.can(scope)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_entry(name: str, key: str, scopes: Iterable[str]) -> dict:
    scopes = sorted(set(scopes))
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise InvalidInput("scopes", f"{bad} not among {list(SCOPES)}")
    return {"name": name, "sha256": hash_key(key), "scopes": scopes}


def key_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for name, value in metadata or ():
        value = value.decode() if isinstance(value, bytes) else value
        if name == "x-api-key":
            return value.strip()
        if name == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip()
    return None


class KeyStore:
    """sha256(key) → Principal."""

    def __init__(self, principals: dict[str, Principal]):
        self._by_hash = principals

    @classmethod
    def load(cls, path: str | Path) -> "KeyStore":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError as exc:
            raise MissingResource(f"auth file {path} does not exist") from exc
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise CorruptData(f"auth file {path} does not parse: {exc}") from exc
        principals = {}
        for i, entry in enumerate(data.get("keys", [])):
            digest = str(entry.get("sha256", "")).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise CorruptData(f"auth file {path}: keys[{i}].sha256 is not a sha256 hex digest")
            scopes = entry.get("scopes", [])
            bad = [s for s in scopes if s not in SCOPES]
            if bad:
                raise CorruptData(f"auth file {path}: keys[{i}].scopes has unknown {bad}")
            principals[digest] = Principal(str(entry.get("name", f"key {i}")), frozenset(scopes))
        if not principals:
            raise CorruptData(f"auth file {path} lists no keys")
        return cls(principals)

    def authenticate(self, key: str | None) -> Principal | None:
        if not key:
            return None
        return self._by_hash.get(hash_key(key))


class KeyRing:
    """The KeyStore in use (None: auth disabled); `reload()` swaps in a fresh load of the file, atomically.

    A reload that fails keeps the previous keys (and raises): a typo in keys.toml must not open the door."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._store = KeyStore.load(self.path) if self.path else None

    @property
    def enabled(self) -> bool:
        return self._store is not None

    def reload(self) -> int:
        """Re-read the key file; return how many keys it holds."""
        if self.path is None:
            return 0
        store = KeyStore.load(self.path)
        with self._lock:
            self._store = store
        return len(store._by_hash)

    def authenticate(self, key: str | None) -> Principal | None:
        with self._lock:
            store = self._store
        return ANONYMOUS_DEV if store is None else store.authenticate(key)
