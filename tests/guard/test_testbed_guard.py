"""The guard on the trained testbed: memorized prompts are caught and rerouted or blocked, novel ones
pass, per sample inside one batch. Copies are judged by the independent pixel-space measure."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from memguard.pipeline import GuardConfig, GuardedPipeline
from memguard.signals import SIGNALS
from memguard.testbed import copies
from memguard.testbed.dataset import PHOTOS, build_training_set, heldout_prompts
from memguard.types import Decision, GenerationRequest, GuardMode, Reason
from tests.guard.conftest import needs_testbed

pytestmark = needs_testbed


@pytest.fixture(scope="module")
def training_images():
    items = build_training_set()
    return copies.References.of(np.stack([it.image for it in items]))   # prepared once for every judgement


# memorized captions whose generations the testbed's policy flags at step 1 in every seed we have seen
STRONG = [p.caption for p in PHOTOS if p.key in ("grace_hopper", "cameraman", "coins", "motorcycle")]


def _pick(rng, n_memorized: int, n_novel: int, strong: bool = False):
    pool = STRONG if strong else [p.caption for p in PHOTOS]
    memorized = [pool[int(i)] for i in rng.choice(len(pool), n_memorized, replace=False)]
    novel = [heldout_prompts()[int(i)] for i in rng.choice(48, n_novel, replace=False)]
    return memorized, novel


def _outcome(r):
    return r.decision, r.reason, r.report.first_flagged_step, r.report.steps_computed


def test_mixed_batch_gets_per_sample_decisions(testbed_pipe, testbed_index, testbed_policy, training_images):
    rng = np.random.default_rng()
    memorized, novel = _pick(rng, 3, 3)
    prompts = [p for pair in zip(memorized, novel) for p in pair]      # interleaved in one batch
    seeds = [int(s) for s in rng.integers(0, 2**31, len(prompts))]
    guard = GuardedPipeline(testbed_pipe, index=testbed_index, policy=testbed_policy)
    mixed = [rs[0] for rs in guard.generate([GenerationRequest(p, seed=s) for p, s in zip(prompts, seeds)]).results]
    # each sample's decision is its own: the same as in a batch of its own kind
    alone = {}
    for subset in (memorized, novel):
        idx = [k for k, p in enumerate(prompts) if p in subset]
        batch = guard.generate([GenerationRequest(prompts[k], seed=seeds[k]) for k in idx])
        alone.update({k: rs[0] for k, rs in zip(idx, batch.results)})
    assert [_outcome(r) for r in mixed] == [_outcome(alone[k]) for k in range(len(prompts))]
    mem = [r for p, r in zip(prompts, mixed) if p in memorized]
    nov = [r for p, r in zip(prompts, mixed) if p in novel]
    assert sum(r.report.first_flagged_step is not None for r in mem) >= 2
    for r in mem:
        if r.report.first_flagged_step is not None:
            assert r.report.first_flagged_step < testbed_policy.detect_steps
            assert r.decision in (Decision.REROUTED, Decision.FACE_OBFUSCATED, Decision.BLOCKED)
            assert r.reason in (Reason.MEMORIZATION, Reason.PROTECTED_FACE) and r.report.mitigations
    assert all(r.decision != Decision.BLOCKED for r in nov)
    assert sum(r.decision == Decision.ALLOWED and r.report.first_flagged_step is None for r in nov) >= 2
    assert all(r.report.steps_computed == 30 for r in nov)
    for r in mixed:
        if r.image is not None:   # nothing released is a near copy of a memorized photo
            j, score = copies.nearest(r.image, training_images)
            assert not (score.is_copy and j >= len(training_images.images) - len(PHOTOS))
        # membership information only in the audit dict, never in the coarse outcome
        assert "photo-" not in json.dumps([r.decision.value, r.reason.value, r.report.scores])


def test_blocked_sample_leaves_the_batch_at_once(testbed_pipe, testbed_index, testbed_policy):
    rng = np.random.default_rng()
    memorized, novel = _pick(rng, 2, 2, strong=True)
    seeds = [int(s) for s in rng.integers(0, 2**31, 4)]
    guard = GuardedPipeline(testbed_pipe, index=testbed_index, policy=testbed_policy,
                            config=GuardConfig(on_flag="block"))
    batch = guard.generate([GenerationRequest(p, seed=s) for p, s in zip(memorized + novel, seeds)])
    results = [rs[0] for rs in batch.results]
    assert all(r.decision == Decision.BLOCKED and r.image is None for r in results[:2])
    blocked = [r for r in results if r.decision == Decision.BLOCKED]
    assert all(r.report.steps_computed <= testbed_policy.detect_steps for r in blocked)
    assert batch.stats.sample_steps == sum(r.report.steps_computed for r in results)
    assert batch.stats.steps_saved["blocked"] == sum(30 - r.report.steps_computed for r in blocked)
    for r in results[2:]:          # novel prompts: full generations unless (rarely) flagged
        assert r.report.first_flagged_step is not None or (r.decision == Decision.ALLOWED
                                                             and r.report.steps_computed == 30)


def test_a_copy_caught_only_at_the_final_screen_gets_a_second_pass(testbed_pipe, testbed_index, testbed_policy,
                                                                   training_images):
    """With detection switched off (threshold +inf) only the final screen sees the copies: the second
    pass regenerates each from fresh noise, rerouted from step 0, at twice a plain run's steps at
    most; without it the copy is blocked after the full compute."""
    from dataclasses import replace
    rng = np.random.default_rng()
    memorized, _ = _pick(rng, 3, 0, strong=True)
    seeds = [int(s) for s in rng.integers(0, 2**31, 3)]
    blind = replace(testbed_policy, threshold=float("inf"))
    reqs = [GenerationRequest(p, seed=s) for p, s in zip(memorized, seeds)]
    plain = [rs[0] for rs in GuardedPipeline(testbed_pipe, index=testbed_index, policy=blind,
                                             config=GuardConfig(second_pass=False)).generate(reqs).results]
    copied = [i for i, r in enumerate(plain) if r.decision == Decision.BLOCKED]
    assert copied, "the strong memorized prompts copy: the final screen blocks at least one"
    assert all(plain[i].report.steps_computed == 30 and plain[i].report.first_flagged_step is None for i in copied)
    batch = GuardedPipeline(testbed_pipe, index=testbed_index, policy=blind).generate(reqs)
    again = [rs[0] for rs in batch.results]
    assert batch.stats.second_passes == len(copied)
    for i in copied:
        r = again[i]
        assert r.seed == seeds[i] and r.report.steps_computed <= 60
        assert any(m.startswith("second pass") for m in r.report.mitigations), r.report.mitigations
        assert r.decision in (Decision.REROUTED, Decision.BLOCKED)
        if r.decision == Decision.REROUTED:      # a new image, and not a copy of anything indexed
            assert r.image is not None and not copies.nearest(r.image, training_images)[1].is_copy
    assert batch.stats.sample_steps == sum(r.report.steps_computed for r in again)
    assert sum(batch.stats.decisions.values()) == len(reqs)


def test_monitor_flags_but_releases(testbed_pipe, testbed_index, testbed_policy):
    rng = np.random.default_rng()
    memorized, _ = _pick(rng, 1, 0, strong=True)
    seed = int(rng.integers(2**31))
    guard = GuardedPipeline(testbed_pipe, index=testbed_index, policy=testbed_policy)
    r = guard.generate([GenerationRequest(memorized[0], seed=seed, mode=GuardMode.MONITOR)]).results[0][0]
    assert r.decision == Decision.ALLOWED and r.image is not None and r.reason == Reason.MEMORIZATION
    assert r.report.first_flagged_step is not None and not r.report.mitigations


def test_guarded_engine_serves_the_protocol(testbed_policy):
    from memguard.engine import EngineConfig, GenerationEngine
    from memguard.guarded_engine import GuardedEngine

    engine = GuardedEngine.from_config(EngineConfig())
    assert isinstance(engine, GenerationEngine) and engine.guarded
    rng = np.random.default_rng()
    memorized, novel = _pick(rng, 1, 1, strong=True)
    events = []
    results = engine.generate([GenerationRequest(memorized[0], seed=int(rng.integers(2**31)), steps=12),
                               GenerationRequest(novel[0], seed=int(rng.integers(2**31)), steps=12)],
                              on_step=lambda i, e: events.append((i, e)))
    assert results[0][0].report.first_flagged_step is not None and results[1][0].decision == Decision.ALLOWED
    assert any(e.action in ("reroute", "block") for i, e in events if i == 0)
    stats = engine.stats()
    # the batch's stats carry no per-sample signal value or flagged step (they reach /metrics)
    assert len(stats.batches) == 1 and stats.batches[0].sample_steps > 0
    assert not hasattr(stats.batches[0], "first_flagged_steps") and not hasattr(stats.batches[0], "signals")
    assert engine.stats().batches == []          # drained
    engine.close()


def test_cli_generate_writes_images_traces_and_json(tmp_path):
    rng = np.random.default_rng()
    memorized, novel = _pick(rng, 1, 1, strong=True)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "memguard.cli", "generate", "--prompt", memorized[0], "--prompt", novel[0],
                           "--seed", str(int(rng.integers(2**31))), "--steps", "30", "--out", str(out), "--trace",
                           "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    first, second = doc["results"]
    # the novel prompt's image is released; a random seed may, rarely, be rerouted (memguard.benchmarks.quality
    # at 30 steps: 0 of 192 novel generations acted on; this test at 10 steps saw 1 in 64)
    assert first["first_flagged_step"] is not None and second["decision"] in ("ALLOWED", "REROUTED")
    assert (out / second["image"].split("/")[-1]).is_file()
    assert json.loads((tmp_path / "out" / second["trace_json"].split("/")[-1]).read_text())["trace"]
    assert "audit" not in first                  # membership information needs --audit


def test_calibrate_writes_a_policy_with_its_provenance(tmp_path):
    from memguard.calibrate import TESTBED_INDEX_DIR, CalibrationConfig, calibrate, model_hash, sha256_file
    from memguard.loading import TESTBED_MODEL_DIR
    from memguard.policy import Policy

    out = tmp_path / "policy.json"
    cfg = CalibrationConfig(prompts=8, steps=4, batch_size=8, detect_steps=2)
    calibrate(cfg=cfg, out=out, progress=False, signals_out=tmp_path / "signals.npz")
    policy = Policy.load(out)
    prov = policy.provenance
    assert prov["model"]["sha256"] == model_hash(TESTBED_MODEL_DIR)
    assert prov["index"]["manifest_sha256"] == sha256_file(TESTBED_INDEX_DIR / "manifest.json")
    assert prov["data"]["generations"] == 8 and prov["data"]["seeds"][0] >= 900_000
    assert prov["data"]["benign_screened_out"]["generations"] == 0
    assert 0 <= prov["rates"]["flag_rate_in_sample"] <= 1 / 8
    assert policy.calibrated and np.isfinite(policy.threshold) and policy.final_pdq_distance is not None
    assert len(policy.signals["divergence"].timesteps) == 4
    signals = np.load(tmp_path / "signals.npz")
    assert signals["raw"].shape == (8, 4, len(SIGNALS))


def test_a_benign_prompt_whose_image_copies_is_no_negative(tmp_path):
    """A "benign" prompt file that holds a memorized caption: its generations copy a photo, so the final
    screen finds them, and calibration leaves them out of the benign standard (and says so)."""
    from memguard.calibrate import CalibrationConfig, benign_testbed_prompts, calibrate
    from memguard.testbed.registry import get_testbed

    memorized = get_testbed().prompts("memorized")[0]
    prompts = tmp_path / "benign.txt"
    prompts.write_text("\n".join([memorized, *benign_testbed_prompts(5, seed=7)]) + "\n")
    cfg = CalibrationConfig(prompts=6, seeds_per_prompt=2, steps=30, batch_size=12, positive_clusters=2,
                            captions_per_cluster=1, positive_seeds=1)
    policy = calibrate(cfg=cfg, out=tmp_path / "policy.json", progress=False, prompt_file=prompts,
                       signals_out=tmp_path / "signals.npz")
    dropped = policy.provenance["data"]["benign_screened_out"]
    assert memorized in dropped["prompts"] and dropped["generations"] >= 1
    signals = np.load(tmp_path / "signals.npz")
    assert len(signals["raw"]) == 12 - dropped["generations"]          # the benign standard left them out
    assert len(signals["prompts"]) == len(signals["raw"])
    assert len(signals["positive_raw"]) == 2                             # not made positives


def test_the_shipped_index_finds_cropped_and_rotated_photos(testbed_index):
    """The aligned re-score with its calibrated threshold: crops and small rotations of the
    memorized photos, which the plain fingerprint misses, are found; unseen images are not flagged.

    The index holds the training set as scraped. A photo whose crop or banner variant stayed a
    cluster of its own has a rival in the standout (the photo and its variant both score high):
    measured 7 of these 24 trials found (17 of 24 with the unique-only training set). Known limit,
    guard/index/clusters.py."""
    from memguard.index.calibrate import aug_crop, aug_rotate
    from memguard.testbed.dataset import heldout_images

    rng = np.random.default_rng(2024)
    photos = {it.item_id: it.image for it in build_training_set() if it.kind == "photo"}
    found = plain = trials = 0
    for item_id, image in photos.items():
        for augment in (aug_crop, aug_crop, aug_rotate):
            matches = testbed_index.screen(augment(image, rng)).matches
            trials += 1
            # a cluster's match carries its closest member's id: the photo or one of its near duplicates
            mine = [m for m in matches if m.item_id.split("~")[0] == item_id]
            found += any("aligned" in m.signals and m.signals["aligned"].crossed for m in mine)
            plain += any(m.signals["latent"].crossed for m in mine)
    assert found >= trials / 4 and plain < found, (trials, found, plain)
    assert not any(testbed_index.screen(h.image).is_copy for h in heldout_images(count=40))


def test_a_reroute_that_loses_the_prompt_is_blocked(tmp_path):
    """REROUTED is a promise to answer the prompt: a rerouted image under the policy's fidelity floor is
    blocked (REASON_MEMORIZATION, counted), and the audit carries its fidelity (guard/fidelity.py).
    On the ε-testbed's meaningful memorized captions, which reroute to a non-copy (13 of 16 measured)."""
    import shutil
    from dataclasses import replace

    from memguard.fidelity import PromptFidelity
    from memguard.index.api import FingerprintIndex
    from memguard.loading import load_pipeline
    from memguard.policy import Policy
    from memguard.testbed.dataset import caption_for
    from memguard.testbed.registry import EPS_COMBOS, get_testbed

    tb = get_testbed("eps")
    policy = Policy.load(tb.policy_path)
    assert policy.reroute_min_fidelity is not None, "the testbed index has a CLIP: calibration sets a floor"
    shutil.copytree(tb.index_dir, tmp_path / "index")
    index = FingerprintIndex.open(tmp_path / "index", model_dir=tb.model_dir)
    pipe = load_pipeline(tb.model_dir)
    rng = np.random.default_rng()
    reqs = [GenerationRequest(caption_for(*c), seed=int(s)) for c, s in zip(EPS_COMBOS, rng.integers(0, 2**31, 4))]
    config = GuardConfig(second_pass=False)
    lax = GuardedPipeline(pipe, index=index, policy=replace(policy, reroute_min_fidelity=-1e9),
                          config=config).generate(reqs)
    rerouted = [(k, rs[0]) for k, rs in enumerate(lax.results) if rs[0].decision == Decision.REROUTED]
    assert rerouted, [rs[0].report.mitigations for rs in lax.results]
    training = copies.References.of(np.stack([it.image for it in build_training_set(tb.data)]))
    fidelity = PromptFidelity(index.clip_encoder(), policy.reroute_references)
    for k, r in rerouted:
        want = float(fidelity.zscores([r.image], [reqs[k].prompt])[0])
        assert r.report.audit["reroute_fidelity"] == pytest.approx(want, abs=1e-3)
        assert not copies.nearest(r.image, training)[1].is_copy
    strict = GuardedPipeline(pipe, index=index, policy=replace(policy, reroute_min_fidelity=1e9),
                             config=config).generate(reqs)
    for k, _ in rerouted:
        r = strict.results[k][0]
        assert (r.decision, r.reason, r.image) == (Decision.BLOCKED, Reason.MEMORIZATION, None)
        assert any("no longer answers the prompt" in m for m in r.report.mitigations), r.report.mitigations
    assert strict.stats.reroutes_unfaithful == len(rerouted)
    assert all(rs[0].decision != Decision.REROUTED for rs in strict.results)
    index.close()


@pytest.mark.parametrize("name", ["vpred", "eps", "sdxl"])
def test_standout_marks_memorized_photos_at_the_first_step(name):
    """On every testbed: at step 0 the nearest training image of a memorized photo's
    generation stands out (Lowe's ratio, guard/signals.py) far more than a novel prompt's does.
    Measured over 4 seeds (2026-12-04, unique-only indexes): photos' median 2.1 (eps) / 3.7 (vpred),
    novel max 1.28 / 0.37. With the scraped eps index (2026-12-07) a photo's crop or banner variant
    that stayed a cluster of its own can be the runner-up: 4 fresh seed sets gave photos' median
    0.82-1.32 against novel median 0.03-0.05 and max 0.25-0.97, ROC AUC 0.969-1.0; a fifth, in a
    clean-clone CI run, gave photo-coffee 0.0014 (AUC 0.883), and 5 seeds a photo gave coffee
    0.22-0.56 (2026-12-07). That tail is the regression the README reports for eps; so that it fails
    the suite only when it grows, the seeds are one fixed draw (two a photo, not chosen by result)."""
    from memguard.index.api import FingerprintIndex
    from memguard.loading import load_pipeline
    from memguard.policy import Policy
    from memguard.testbed.dataset import prompt_set_members
    from memguard.testbed.registry import get_testbed

    tb = get_testbed(name)
    photos = [p for p, target in prompt_set_members(tb.data)["memorized"] if target.startswith("photo-")]
    novel = tb.prompts("novel")[:16]
    rng = np.random.default_rng(20261207)
    photos = photos * 2
    reqs = [GenerationRequest(p, seed=int(s), mode=GuardMode.MONITOR)
            for p, s in zip(photos + novel, rng.integers(0, 2**31, len(photos) + len(novel)))]
    index = FingerprintIndex.open(tb.index_dir, model_dir=tb.model_dir)
    guard = GuardedPipeline(load_pipeline(tb.model_dir), index=index, policy=Policy.load(tb.policy_path))
    first = [rs[0].report.trace[0]["standout"] for rs in guard.generate(reqs).results]
    photo_scores, novel_scores = first[:len(photos)], first[len(photos):]
    auc = np.mean([[p > q for q in novel_scores] for p in photo_scores])
    assert len(photos) == 16 and auc >= 0.9, (auc, photo_scores, novel_scores)
    assert np.median(photo_scores) > 5 * max(np.median(novel_scores), 0.01), (photo_scores, novel_scores)
