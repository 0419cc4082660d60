"""The main-job demo: prompts chosen to show every decision the guard makes, through the gRPC API.

    memguard demo                      # the eps testbed: ALLOWED, REROUTED, BLOCKED, FACE_OBFUSCATED
    memguard demo --testbed vpred      # the v-prediction testbed: the same four (REROUTED: one paraphrase
                                       # at seed 0; its photos' captions mean nothing but the photo)
    memguard demo --testbed sdxl       # the SDXL-format testbed: the same four

The sets, on a shipped testbed (guard/testbed/registry.py, prompts/*.txt):

- novel: compositional captions never trained on → expected ALLOWED;
- composition: captions of the compositional renderings the eps testbed memorized ("a red circle on a
  blue striped background"): ordinary prompts the model can also draw otherwise → expected REROUTED
  (a new image for the same prompt);
- memorized / paraphrased: captions of memorized photos without a face, and light rewordings →
  BLOCKED when no reroute both leaves the photo and still answers the caption (for a caption that
  means nothing to the model but the photo, the usual case), else REROUTED;
- face: a memorized portrait's caption at 128 px. The testbeds were trained at 64 px; at 128 px they
  tile the portrait into a new picture, not a copy of any training image, that still shows the
  person's face, several times. The final screen blurs each face it matches to a person in the
  index (within the index's calibrated face distance) → expected FACE_OBFUSCATED. Faces it does
  not match stay as they are (on eps at seed 3, one of the tiles is matched and blurred; the others,
  at distances just above the threshold, are not; other seeds match none: ALLOWED). The row's seed
  is chosen per testbed (`FACE_SEED_OFFSET`) among those that show a matched face.

The table prints what the guard decided, and marks a row whose decision is not among those its set
is there to show (EXPECTED). Decisions depend on the seed (`--seed`, default 0) and on the testbed's
index and calibrated policy.

`load_prompt_sets` (memorized, paraphrased, novel) stays for callers that draw prompt mixes
(benchmarks/load.py).
"""
from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, replace
from pathlib import Path

from memguard.server.client import Connection, remote_generate
from memguard.types import Decision, GenerationRequest, ImageResult

PROMPT_DIR = Path(__file__).resolve().parent.parent / "guard" / "testbed" / "prompts"
PROMPT_SETS = ("memorized", "paraphrased", "novel")
DEMO_TESTBED = "eps"          # the one testbed whose memorized items include ordinary (reroutable) captions
DEMO_SETS = ("novel", "composition", "memorized", "paraphrased", "face")
# what each set is there to show; the table marks a row whose decision is none of these
EXPECTED = {"novel": (Decision.ALLOWED,), "composition": (Decision.REROUTED,),
            "memorized": (Decision.BLOCKED, Decision.REROUTED), "paraphrased": (Decision.BLOCKED, Decision.REROUTED),
            "face": (Decision.FACE_OBFUSCATED,)}
DEMO_PHOTOS = ("chelsea", "cameraman", "coffee", "rocket", "coins", "motorcycle")   # faceless photos, in row order
FACE_SIZE = 128               # px: twice the testbeds' training size (see the module docstring)
FACE_PHOTO = "grace_hopper"   # the portrait whose tiling the face row shows
# The face row's seed, as an offset from --seed, per testbed: the first seed at which the 128-px
# tiling shows a face within the index's calibrated face distance (memguard.guard, 30 steps, the
# caption below at 128 px, seeds scanned 2026-12-07): eps 3 (of 0-8), vpred 18 (the only one of
# 0-32), sdxl 0 (0, 1, 4, 5, 7, 8 and 12 of 0-12). At the others no tile is matched: ALLOWED.
FACE_SEED_OFFSET = {"eps": 3, "vpred": 18, "sdxl": 0}


def load_prompt_sets(directory: Path = PROMPT_DIR) -> dict[str, list[str]]:
    """{set name: prompts}; falls back to the testbed dataset definition when files are absent."""
    sets = {}
    for name in PROMPT_SETS:
        path = directory / f"{name}.txt"
        if path.is_file():
            sets[name] = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(sets) == len(PROMPT_SETS):
        return sets
    from memguard.testbed.dataset import PHOTOS, TestbedDataConfig, heldout_prompts
    return {"memorized": [p.caption for p in PHOTOS],
            "paraphrased": [q for p in PHOTOS for q in p.paraphrases],
            "novel": heldout_prompts(TestbedDataConfig())}


@dataclass(frozen=True)
class DemoCase:
    prompt_set: str
    prompt: str
    expect: tuple[Decision, ...]
    seed: int = 0
    size: int = 64


def demo_cases(testbed: str = DEMO_TESTBED, per_set: int = 2, seed: int = 0) -> list[DemoCase]:
    """The demo's requests on a shipped testbed: `per_set` of each set it has, in DEMO_SETS order.
    The composition set has one row per memorized rendering (they are few, and each reroute is a
    decision of its own), at least `per_set`."""
    from memguard.testbed.dataset import PHOTOS, caption_for
    from memguard.testbed.registry import get_testbed

    tb = get_testbed(testbed)
    by_key = {p.key: p for p in PHOTOS}
    faceless = [by_key[k] for k in DEMO_PHOTOS]
    compositions = [caption_for(*combo) for combo in tb.data.memorized_combos]
    novel = _prompts(tb, "novel") or load_prompt_sets()["novel"]
    face = by_key[FACE_PHOTO]
    sets = {
        "novel": [(p, seed) for p in novel[:per_set]],
        "composition": [(p, seed) for p in compositions[:max(per_set, len(compositions))]],
        "memorized": [(p.caption, seed) for p in faceless[:per_set]],
        "paraphrased": [(p.paraphrases[0], seed) for p in faceless[:per_set]],
        "face": [(face.caption, seed + FACE_SEED_OFFSET.get(testbed, 0))],
    }
    return [DemoCase(name, prompt, EXPECTED[name], s, FACE_SIZE if name == "face" else 64)
            for name in DEMO_SETS for prompt, s in sets[name]]


def _prompts(tb, name: str) -> list[str]:
    path = tb.prompts_dir / f"{name}.txt"
    return [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


@dataclass
class DemoRow:
    prompt_set: str
    prompt: str
    result: ImageResult | None
    error: str = ""
    expect: tuple[Decision, ...] = ()
    seed: int = 0
    size: int = 64


def run_demo(conn: Connection, per_set: int = 2, steps: int = 30, seed: int = 0, concurrency: int = 4,
             testbed: str = DEMO_TESTBED, cases: list[DemoCase] | None = None) -> list[DemoRow]:
    cases = demo_cases(testbed, per_set, seed) if cases is None else cases

    def one(case: DemoCase) -> DemoRow:
        row = DemoRow(case.prompt_set, case.prompt, None, expect=case.expect, seed=case.seed, size=case.size)
        try:
            [result] = remote_generate(conn, GenerationRequest(prompt=case.prompt, steps=steps, seed=case.seed,
                                                               height=case.size, width=case.size))
            return replace(row, result=result)
        except Exception as exc:  # one failed request is a row in the table, not the end of the demo
            return replace(row, error=str(exc))

    with cf.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, cases))


def write_images(rows: list[DemoRow], out: Path) -> list[Path]:
    """Released images as PNGs under `out` (blocked ones have none); row k → k-<set>-<decision>.png."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, row in enumerate(rows):
        if row.result is not None and row.result.image is not None:
            path = out / f"{k:02d}-{row.prompt_set}-{row.result.decision.value.lower()}.png"
            Image.fromarray(row.result.image).save(path)
            paths.append(path)
    return paths


TILE = 128
COLOURS = {Decision.ALLOWED: (46, 125, 50), Decision.REROUTED: (21, 101, 192),
           Decision.FACE_OBFUSCATED: (123, 31, 162), Decision.BLOCKED: (198, 40, 40)}


def contact_sheet(rows: list[DemoRow], path: Path, columns: int = 4) -> Path:
    """One tile per row: the released image (nearest-neighbour to TILE px), or a grey tile saying
    why nothing was released; under it the decision (coloured), the set and the prompt's start."""
    from PIL import Image, ImageDraw

    label_h = 44
    n_rows = max(1, -(-len(rows) // columns))
    sheet = Image.new("RGB", (columns * (TILE + 8) + 8, n_rows * (TILE + label_h + 8) + 8), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    for k, row in enumerate(rows):
        x, y = 8 + (k % columns) * (TILE + 8), 8 + (k // columns) * (TILE + label_h + 8)
        result = row.result
        if result is not None and result.image is not None:
            sheet.paste(Image.fromarray(result.image).resize((TILE, TILE), Image.NEAREST), (x, y))
        else:
            draw.rectangle((x, y, x + TILE - 1, y + TILE - 1), fill=(70, 70, 70))
            why = "error" if result is None else f"no image\n{result.reason.value.lower()}"
            draw.multiline_text((x + 8, y + TILE // 2 - 12), why, fill=(235, 235, 235))
        decision = "ERROR" if result is None else result.decision.value
        colour = (0, 0, 0) if result is None else COLOURS[result.decision]
        draw.text((x, y + TILE + 3), decision, fill=colour)
        draw.text((x, y + TILE + 16), f"{row.prompt_set} {row.size}px seed {row.seed}", fill=(60, 60, 60))
        draw.text((x, y + TILE + 29), row.prompt[:22], fill=(110, 110, 110))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def format_rows(rows: list[DemoRow]) -> str:
    lines = [f"{'set':<12} {'decision':<16} {'reason':<15} {'flagged@':>8} {'steps':>5} {'px':>4}  prompt",
             "-" * 100]
    for row in rows:
        if row.result is None:
            lines.append(f"{row.prompt_set:<12} {'ERROR':<16} {row.error[:70]}")
            continue
        r = row.result
        flagged = "-" if r.report.first_flagged_step is None else str(r.report.first_flagged_step)
        note = "" if not row.expect or r.decision in row.expect else \
            f"   (expected {' or '.join(d.value for d in row.expect)})"
        lines.append(f"{row.prompt_set:<12} {r.decision.value:<16} {r.reason.value:<15} {flagged:>8} "
                     f"{r.report.steps_computed:>5} {row.size:>4}  {row.prompt[:48]}{note}")
    counts = {d: sum(1 for row in rows if row.result is not None and row.result.decision == d) for d in Decision}
    lines.append("-" * 100)
    lines.append("decisions: " + ", ".join(f"{d.value} {n}" for d, n in counts.items()))
    return "\n".join(lines)
