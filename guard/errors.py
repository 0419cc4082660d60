"""Expected failures, each with a message meant for the person or client that caused it.

The CLI prints these without a traceback; the gRPC layer maps each class to one status code.
"""
from __future__ import annotations


class MemGuardError(Exception):
    """Base class: an expected failure whose message is safe to show the caller."""


class InvalidInput(MemGuardError):
    """A value supplied by the caller is wrong. `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class MissingResource(MemGuardError):
    """A file, directory or package the operation needs is absent or unusable."""


class CorruptData(MemGuardError):
    """Stored data failed an integrity check. The message names the file."""


class ScreeningUnavailable(MemGuardError):
    """The guard could not screen an output; nothing is released (fail closed)."""


class RegistryUnavailable(ScreeningUnavailable):
    """The protected registry cannot be read or written (unreachable, or out of contact for too long).

    A subclass of ScreeningUnavailable: without a current registry nothing can be screened, so
    Screen and Protect answer UNAVAILABLE and guarded generation releases nothing (fail closed)."""
