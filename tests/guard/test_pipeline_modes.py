"""The guarded loop itself, on the tiny random pipeline: modes, fail-closed screening, batch plumbing."""
from __future__ import annotations

import numpy as np
import pytest

from memguard.calibrate import benign_testbed_prompts
from memguard.loading import sample_plain
from memguard.pipeline import GuardConfig, GuardedPipeline
from memguard.signals import SIGNALS
from memguard.types import Decision, GenerationRequest, GuardMode, Reason, StepEvent

STEPS = 6


def _fresh(n: int):
    rng = np.random.default_rng()
    prompts = list(rng.choice(benign_testbed_prompts(200, seed=int(rng.integers(1000))), size=n, replace=False))
    return prompts, [int(s) for s in rng.integers(0, 2**31, size=n)]


def _requests(prompts, seeds, mode, **kw):
    return [GenerationRequest(p, seed=s, steps=STEPS, mode=mode, **kw) for p, s in zip(prompts, seeds)]


def _images(batch):
    return np.stack([rs[0].image for rs in batch.results])


def test_off_reproduces_diffusers_bit_for_bit(tiny_pipe):
    prompts, seeds = _fresh(3)
    reference = sample_plain(tiny_pipe, prompts, seeds, steps=STEPS)
    guarded = GuardedPipeline(tiny_pipe)
    batch = guarded.generate(_requests(prompts, seeds, GuardMode.OFF))
    assert np.array_equal(_images(batch), reference)
    assert all(rs[0].decision == Decision.ALLOWED and rs[0].report.steps_computed == STEPS for rs in batch.results)
    # and the pipeline's own __call__ is untouched between guarded calls
    assert np.array_equal(sample_plain(tiny_pipe, prompts, seeds, steps=STEPS), reference)


def test_monitor_changes_nothing(tiny_pipe, tiny_index):
    """MONITOR releases every image as OFF computes it in the same (guarded) batch, and within the
    attention kernel's float rounding of an OFF-only (diffusers) batch."""
    prompts, seeds = _fresh(2)
    guarded = GuardedPipeline(tiny_pipe, index=tiny_index)
    mixed = guarded.generate(_requests(prompts, seeds, GuardMode.MONITOR) + _requests(prompts, seeds, GuardMode.OFF))
    monitor, off_same_batch = _images(mixed)[:2], _images(mixed)[2:]
    assert np.array_equal(monitor, off_same_batch)
    assert all(rs[0].decision == Decision.ALLOWED and rs[0].image is not None for rs in mixed.results)
    assert all(not rs[0].report.mitigations for rs in mixed.results[:2])
    plain = _images(guarded.generate(_requests(prompts, seeds, GuardMode.OFF)))
    diff = np.abs(monitor.astype(int) - plain.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 1e-3
    # monitor mode still scores: a full trace of every signal at every step
    trace = mixed.results[0][0].report.trace
    assert len(trace) == STEPS and all(np.isfinite(row[s]) for row in trace for s in SIGNALS)


def test_enforce_fails_closed_when_screening_fails(tiny_pipe, tiny_index):
    prompts, seeds = _fresh(2)
    guarded = GuardedPipeline(tiny_pipe, index=tiny_index)
    tiny_index.close()          # a real failure: the index's databases are gone
    batch = guarded.generate(_requests(prompts, seeds, GuardMode.ENFORCE))
    for rs in batch.results:
        assert rs[0].decision == Decision.BLOCKED and rs[0].reason == Reason.SCREENING_FAILED
        assert rs[0].image is None
    assert batch.stats.screen_failures == 2


def test_enforce_without_an_index_releases_nothing(tiny_pipe):
    prompts, seeds = _fresh(1)
    batch = GuardedPipeline(tiny_pipe, index=None).generate(_requests(prompts, seeds, GuardMode.ENFORCE))
    assert batch.results[0][0].image is None and batch.results[0][0].reason == Reason.SCREENING_FAILED


def test_protected_image_is_not_released_again(tiny_pipe, tiny_index):
    """An opt-out takes effect at once: the image a seed gave is protected, the same request is blocked
    (without a second pass) or comes back as another image that the screen passes (with one)."""
    prompts, seeds = _fresh(2)
    guarded = GuardedPipeline(tiny_pipe, index=tiny_index, config=GuardConfig(second_pass=False))
    first = guarded.generate(_requests(prompts, seeds, GuardMode.ENFORCE))
    assert [rs[0].decision for rs in first.results] == [Decision.ALLOWED, Decision.ALLOWED]
    tiny_index.protect_image(first.results[0][0].image, reason="takedown request (test)")
    again = guarded.generate(_requests(prompts, seeds, GuardMode.ENFORCE))
    blocked, other = again.results[0][0], again.results[1][0]
    assert blocked.decision == Decision.BLOCKED and blocked.reason == Reason.MEMORIZATION and blocked.image is None
    assert blocked.report.audit["screen"]["copies"][0]["protected"]
    assert other.decision == Decision.ALLOWED and np.array_equal(other.image, first.results[1][0].image)
    guarded.config = GuardConfig()
    second = guarded.generate(_requests(prompts, seeds, GuardMode.ENFORCE)).results[0][0]
    assert second.report.audit["first_pass"]["screen"]["copies"][0]["protected"]
    assert second.decision in (Decision.REROUTED, Decision.BLOCKED), second.decision
    if second.image is not None:
        assert not tiny_index.screen(second.image).protected
        assert not np.array_equal(second.image, first.results[0][0].image)


def test_events_cancellation_and_per_request_grouping(tiny_pipe, tiny_index):
    prompts, seeds = _fresh(2)
    events: list[tuple[int, StepEvent]] = []
    reqs = [GenerationRequest(prompts[0], seed=seeds[0], steps=STEPS, num_images=2, mode=GuardMode.MONITOR,
                              request_id="a"),
            GenerationRequest(prompts[1], seed=seeds[1], steps=STEPS, mode=GuardMode.MONITOR, request_id="b")]
    cancel_after = 3
    batch = GuardedPipeline(tiny_pipe, index=tiny_index).generate(
        reqs, on_step=lambda i, e: events.append((i, e)),
        is_cancelled=lambda i: i == 1 and sum(1 for j, _ in events if j == 0) >= 2 * cancel_after)
    assert [len(rs) for rs in batch.results] == [2, 1]
    assert [r.index for r in batch.results[0]] == [0, 1] and [r.seed for r in batch.results[0]] == [seeds[0], seeds[0] + 1]
    cancelled = batch.results[1][0]
    assert cancelled.decision == Decision.BLOCKED and cancelled.reason == Reason.CANCELLED
    assert cancelled.report.steps_computed < STEPS
    assert batch.stats.steps_saved["cancelled"] == STEPS - cancelled.report.steps_computed
    steps_a0 = [e.step for i, e in events if i == 0 and e.image_index == 0]
    assert steps_a0 == list(range(STEPS))
    assert all(e.request_id == "a" and set(SIGNALS) <= set(e.signals) for i, e in events if i == 0)


def test_requests_are_validated_first(tiny_pipe):
    from memguard.errors import InvalidInput

    guarded = GuardedPipeline(tiny_pipe)
    with pytest.raises(InvalidInput, match="steps"):
        guarded.generate([GenerationRequest("x", steps=0)])
    with pytest.raises(InvalidInput, match="requests"):
        guarded.generate([GenerationRequest("x", steps=4), GenerationRequest("y", steps=5)])
    with pytest.raises(InvalidInput):
        GuardConfig(on_flag="explode")


def test_guarded_engine_by_config_fails_closed_without_an_index():
    """The server switches engines by name; with no index configured nothing guarded is released."""
    from memguard.engine import EngineConfig, GenerationEngine, load_engine

    engine = load_engine("memguard.guarded_engine:GuardedEngine", EngineConfig(tiny_random=True))
    assert isinstance(engine, GenerationEngine) and engine.guarded
    prompts, seeds = _fresh(2)
    results = engine.generate([GenerationRequest(prompts[0], seed=seeds[0], steps=3),
                               GenerationRequest(prompts[1], seed=seeds[1], steps=3, mode=GuardMode.OFF)])
    assert results[0][0].decision == Decision.BLOCKED and results[0][0].reason == Reason.SCREENING_FAILED
    assert results[1][0].decision == Decision.ALLOWED and results[1][0].image is not None
    stats = engine.stats()
    assert stats.screen_failures == 1 and stats.batches[0].sample_steps == 6
    assert len(stats.batches[0].guard_seconds) == 3
