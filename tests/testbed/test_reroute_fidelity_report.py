"""memguard.benchmarks.quality.reroute_fidelity on hand-made results: the distinctness and unfaithful counts."""
from __future__ import annotations

import numpy as np

from memguard.benchmarks.quality import Record, reroute_fidelity
from memguard.types import Decision, GuardReport, ImageResult, Reason


def _rec(prompt, seed, image, decision=Decision.ALLOWED, mitigations=()):
    result = ImageResult(0, seed, decision, Reason.MEMORIZATION, image,
                         GuardReport(steps_computed=45, mitigations=list(mitigations)))
    return Record("web", prompt, seed, np.zeros((1, 4)), np.zeros((1, 4)), np.zeros(1), result, copy=False)


def test_near_identical_reroutes_are_counted_with_their_unguarded_pairs():
    rng = np.random.default_rng()
    same = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    prompts = ["a lighthouse", "a puppy", "a teapot", "a boat"]
    # unguarded: the first two prompts already gave one picture; the third its own
    monitor = [_rec(prompts[0], 1, same), _rec(prompts[1], 1, same), _rec(prompts[2], 1, other),
               _rec(prompts[3], 1, other)]
    # rerouted: the first three come back as one picture; the fourth is blocked for losing its prompt
    enforce = [_rec(p, 1, same.copy(), Decision.REROUTED) for p in prompts[:3]] + \
              [_rec(prompts[3], 1, None, Decision.BLOCKED, ["reroute no longer answers the prompt (CLIP ...)"])]
    row = reroute_fidelity({"web": monitor}, {"web": enforce}, steps=30)["web"]
    assert row["rerouted"] == 3 and row["blocked_unfaithful"] == 1 and row["released_copies"] == 0
    assert row["pairs_checked"] == 3 and row["pairs_near_identical"] == 3
    assert row["of_which_unguarded_near_identical_too"] == 1          # only the lighthouse / puppy pair
    assert row["max_pairwise_ssim_same_seed"] > 0.99 and len(set(row["worst_pair"])) == 2
    assert row["unet_evaluations_per_image_vs_plain"] == 1.5
