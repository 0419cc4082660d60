"""MemGuard: a generation-time memorization guard for text-to-image diffusion models.

    import memguard
    guarded = memguard.guard(pipe, index=..., policy=...)   # called like the diffusers pipeline
    out = guarded(prompt, generator=torch.Generator().manual_seed(0))
    out.images, out.decisions, out.reasons

The names below load on first use, so `import memguard` (and the CLI) stays light."""
from __future__ import annotations

_EXPORTS = {"guard": "memguard.wrap", "GuardedDiffusionPipeline": "memguard.wrap",
            "MemGuardPipelineOutput": "memguard.wrap", "GuardedPipeline": "memguard.pipeline",
            "GuardConfig": "memguard.pipeline", "GenerationRequest": "memguard.types",
            "Decision": "memguard.types", "Reason": "memguard.types", "GuardMode": "memguard.types",
            "FaceAction": "memguard.types"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memguard' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
