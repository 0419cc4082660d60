"""MemGuard's per-step guard kernels: Triton kernels, each beside its PyTorch reference.

Public API (shapes and dtypes in each function's docstring):

* ``cross_attention_with_stats(q, k, v, *, scale, key_logit_scale, key_mask) -> (out, token_mass)``
* ``cfg_with_divergence(eps_uncond, eps_cond, x_t, guidance_scale, alpha_bar) -> (eps, divergence, x0_hat)``
* ``fingerprint_similarity(queries, candidates, *, candidate_mask) -> (best_sim, best_idx)``
* ``latent_fingerprint(latents, grid)`` - the one fingerprint definition
* ``fingerprint_match(latents, candidates, *, candidate_mask, grid) -> (best_sim, best_idx, fingerprints)``
  - latent_fingerprint + fingerprint_similarity fused in one kernel
* ``attention_entropy(token_mass, key_mask)`` - entropy and BOS share of the token mass
* ``kernel_stats()`` / ``reset_kernel_stats()`` - per-kernel Triton / reference / fallback counts

Names resolve lazily (PEP 562): ``import memguard.kernels`` imports nothing else; Triton is imported, and
the kernels decorated, when a kernel is first used. Backend choice: see :mod:`memguard.kernels.dispatch`.
Only torch and triton are imported here, never diffusers or the guard.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "cross_attention_with_stats": "memguard.kernels.cross_attention",
    "attention_entropy": "memguard.kernels.cross_attention",
    "cfg_with_divergence": "memguard.kernels.cfg_divergence",
    "fingerprint_similarity": "memguard.kernels.similarity",
    "fingerprint_match": "memguard.kernels.fused_fingerprint",
    "latent_fingerprint": "memguard.kernels.fingerprint",
    "fingerprint_dim": "memguard.kernels.fingerprint",
    "FINGERPRINT_GRID": "memguard.kernels.fingerprint",
    "kernel_stats": "memguard.kernels.dispatch",
    "reset_kernel_stats": "memguard.kernels.dispatch",
    "KernelStats": "memguard.kernels.dispatch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memguard.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover
    from memguard.kernels.cfg_divergence import cfg_with_divergence
    from memguard.kernels.cross_attention import attention_entropy, cross_attention_with_stats
    from memguard.kernels.dispatch import KernelStats, kernel_stats, reset_kernel_stats
    from memguard.kernels.fingerprint import FINGERPRINT_GRID, fingerprint_dim, latent_fingerprint
    from memguard.kernels.fused_fingerprint import fingerprint_match
    from memguard.kernels.similarity import fingerprint_similarity
