"""Encryption at rest for biometric data (face descriptors, identity names): AES-256-GCM.

The data key is 32 random bytes, given as base64 or hex text, from (first found):
  1. the `data_key=` argument (bytes or text),
  2. the environment variable MEMGUARD_DATA_KEY,
  3. the file named by MEMGUARD_DATA_KEY_FILE (keep it 0600, outside the index directory).
`python -m memguard.crypto FILE` writes a new one (0600). Two sub-keys are derived from it with HKDF-SHA256:
one encrypts (AES-GCM, a fresh 96-bit nonce per value, associated data binding each ciphertext to
its row), one keys the HMAC that stands in for an identity name where a lookup needs one (the
mutation log, unprotect by name), so the name cannot be recovered from the registry without the key.

    sealed = key.seal(b"...", aad="prot-1/face")   # b"\\x01" + nonce + ciphertext + tag
    key.open(sealed, aad="prot-1/face")
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from memguard.errors import CorruptData, InvalidInput, MissingResource

log = logging.getLogger(__name__)

ENV_KEY = "MEMGUARD_DATA_KEY"
# the shipped testbeds' public key (guard/testbed/): it opens their indexes and seals nothing else
DEMO_KEY_FILE = Path(__file__).resolve().parent / "testbed" / "demo-data.key"
ENV_KEY_FILE = "MEMGUARD_DATA_KEY_FILE"
VERSION = b"\x01"
NONCE_BYTES = 12


def parse_key(text: str, where: str, maker: str = "`python -m memguard.crypto FILE`") -> bytes:
    """A 32-byte key written as 64 hex digits or base64; InvalidInput names `where` and how to make one."""
    text = text.strip()
    for decode in (bytes.fromhex, base64.urlsafe_b64decode, base64.b64decode):
        try:
            raw = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(raw) == 32:
            return raw
    raise InvalidInput(where, f"must be 32 bytes as 64 hex digits or base64 (see {maker})")


@dataclass(frozen=True)
class DataKey:
    """One data key and its two derived sub-keys. repr() never shows key bytes."""
    _enc: bytes
    _mac: bytes
    key_id: str         # sha256 of the derived MAC key, first 16 hex digits: which key sealed the data

    def __repr__(self) -> str:
        return f"DataKey(key_id={self.key_id!r}{', PUBLIC DEMO KEY' if self.is_demo else ''})"

    @property
    def is_demo(self) -> bool:
        """The public demo key of the shipped testbeds (anyone can read it: it protects nothing)."""
        return self.key_id == demo_key_id()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "DataKey":
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        if len(raw) != 32:
            raise InvalidInput("data_key", f"must be 32 bytes, got {len(raw)}")
        derived = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=b"memguard data key v1").derive(raw)
        return cls(derived[:32], derived[32:], hashlib.sha256(derived[32:]).hexdigest()[:16])

    @classmethod
    def resolve(cls, data_key: "bytes | str | DataKey | None" = None) -> "DataKey | None":
        """The configured key, or None when none is configured (see the module docstring)."""
        if isinstance(data_key, DataKey):
            return data_key
        if isinstance(data_key, bytes):
            return cls.from_bytes(data_key)
        if isinstance(data_key, str):
            return cls.from_bytes(parse_key(data_key, "data_key"))
        if os.environ.get(ENV_KEY):
            return _warn_demo(cls.from_bytes(parse_key(os.environ[ENV_KEY], ENV_KEY)), ENV_KEY)
        if os.environ.get(ENV_KEY_FILE):
            path = Path(os.environ[ENV_KEY_FILE])
            if not path.is_file():
                raise MissingResource(f"{ENV_KEY_FILE}: {path} does not exist")
            warn_if_readable(path, "data key file")
            return _warn_demo(cls.from_bytes(parse_key(path.read_text(), str(path))), str(path))
        return None

    def seal(self, plaintext: bytes, aad: str) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = secrets.token_bytes(NONCE_BYTES)
        return VERSION + nonce + AESGCM(self._enc).encrypt(nonce, plaintext, aad.encode())

    def open(self, sealed: bytes, aad: str) -> bytes:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if sealed[:1] != VERSION or len(sealed) < 1 + NONCE_BYTES + 16:
            raise CorruptData(f"{aad}: not a sealed value (unknown format)")
        try:
            return AESGCM(self._enc).decrypt(sealed[1:1 + NONCE_BYTES], sealed[1 + NONCE_BYTES:], aad.encode())
        except InvalidTag as exc:
            raise CorruptData(f"{aad}: cannot decrypt: a different data key sealed it, or it was altered") from exc

    def tag(self, text: str) -> str:
        """A keyed hash that stands in for `text` (an identity name) where the name must not be stored."""
        return "hmac:" + hmac.new(self._mac, text.encode(), hashlib.sha256).hexdigest()[:40]


@lru_cache(maxsize=1)
def demo_key_id() -> str | None:
    try:
        return DataKey.from_bytes(bytes.fromhex(DEMO_KEY_FILE.read_text().strip())).key_id
    except (OSError, ValueError):
        return None


_warned_demo: set[str] = set()
_warned_mode: set[str] = set()


def _warn_demo(key: DataKey, where: str) -> DataKey:
    if key.is_demo and where not in _warned_demo:
        _warned_demo.add(where)
        log.warning("%s is the testbeds' PUBLIC demo data key: it opens only the shipped testbeds' indexes, "
                    "and the protected registry refuses to seal with it; make a key of your own "
                    "(`python -m memguard.crypto FILE`)", where)
    return key


def warn_if_readable(path: Path, what: str) -> None:
    """Log a warning (once per file) when a key file is readable by its group or by others."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077 and str(path) not in _warned_mode:
        _warned_mode.add(str(path))
        log.warning("%s %s is readable by %s (mode %03o): chmod 600 it", what, path,
                    "others" if mode & 0o007 else "its group", mode)


def require_key(key: DataKey | None, what: str) -> DataKey:
    if key is None:
        raise MissingResource(f"{ENV_KEY}: no data key is configured, so cannot {what}: face descriptors and "
                              f"identity names are stored only encrypted (set {ENV_KEY} or {ENV_KEY_FILE}; "
                              "`python -m memguard.crypto FILE` makes one)")
    return key


def new_key_text() -> str:
    return secrets.token_bytes(32).hex()


def write_key_file(path: Path) -> Path:
    """A new key in a file created 0600 (refuses to overwrite one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_key_text() + "\n")
    return path


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m memguard.crypto KEYFILE   (writes a new data key, 0600; then MEMGUARD_DATA_KEY_FILE=KEYFILE)")
    print(f"data key written to {write_key_file(Path(sys.argv[1]))}", file=sys.stderr)
