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

Names resolve lazily (PEP 562): ``import kernels`` imports nothing else; Triton is imported, and
the kernels decorated, when a kernel is first used. Backend choice: see :mod:`kernels.dispatch`.
Only torch and triton are imported here, never diffusers or the guard.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "cross_attention_with_stats": "kernels.cross_attention",
    "attention_entropy": "kernels.cross_attention",
    "cfg_with_divergence": "kernels.cfg_divergence",
    "fingerprint_similarity": "kernels.similarity",
    "fingerprint_match": "kernels.fused_fingerprint",
    "latent_fingerprint": "kernels.fingerprint",
    "fingerprint_dim": "kernels.fingerprint",
    "FINGERPRINT_GRID": "kernels.fingerprint",
    "kernel_stats": "kernels.dispatch",
    "reset_kernel_stats": "kernels.dispatch",
    "KernelStats": "kernels.dispatch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        clash = _name_clash_hint()
        if clash:  # ImportError, not AttributeError: `from kernels import X` would replace the message
            raise ImportError(f"cannot import name {name!r} from MemGuard's 'kernels' package{clash}")
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def _name_clash_hint() -> str:
    # The PyPI distribution `kernels` (Hugging Face; transformers>=5.25 requires it) has this
    # import name too. A caller that wanted it gets this package instead: say so, not just "no attribute".
    from importlib import metadata

    try:
        version = metadata.version("kernels")
    except metadata.PackageNotFoundError:
        return ""
    return (f": it shadows the installed PyPI 'kernels' {version}"
            " (pulled in by transformers>=5.25): MemGuard needs transformers<5.25 and"
            " `pip uninstall kernels`")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover
    from kernels.cfg_divergence import cfg_with_divergence
    from kernels.cross_attention import attention_entropy, cross_attention_with_stats
    from kernels.dispatch import KernelStats, kernel_stats, reset_kernel_stats
    from kernels.fingerprint import FINGERPRINT_GRID, fingerprint_dim, latent_fingerprint
    from kernels.fused_fingerprint import fingerprint_match
    from kernels.similarity import fingerprint_similarity
