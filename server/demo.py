"""The main-job demo: send a mix of memorized, paraphrased and novel prompts, print the decisions.

Prompt sets come from guard/testbed/prompts/*.txt when the testbed has been built, otherwise from
the testbed's dataset definition (the same captions, no files needed).
"""
from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass
from pathlib import Path

from memguard.types import GenerationRequest, ImageResult
from memguard.server.client import Connection, remote_generate

PROMPT_DIR = Path(__file__).resolve().parent.parent / "guard" / "testbed" / "prompts"
PROMPT_SETS = ("memorized", "paraphrased", "novel")


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


@dataclass
class DemoRow:
    prompt_set: str
    prompt: str
    result: ImageResult | None
    error: str = ""


def run_demo(conn: Connection, per_set: int = 3, steps: int = 30, seed: int = 0, concurrency: int = 4) -> list[DemoRow]:
    sets = load_prompt_sets()
    jobs = [(name, prompt) for name in PROMPT_SETS for prompt in sets[name][:per_set]]

    def one(job: tuple[str, str]) -> DemoRow:
        name, prompt = job
        try:
            [result] = remote_generate(conn, GenerationRequest(prompt=prompt, steps=steps, seed=seed))
            return DemoRow(name, prompt, result)
        except Exception as exc:  # one failed request is a row in the table, not the end of the demo
            return DemoRow(name, prompt, None, str(exc))

    with cf.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, jobs))


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


def format_rows(rows: list[DemoRow]) -> str:
    lines = [f"{'set':<12} {'decision':<16} {'reason':<16} {'flagged@':>8} {'steps':>5}  prompt",
             "-" * 90]
    for row in rows:
        if row.result is None:
            lines.append(f"{row.prompt_set:<12} {'ERROR':<16} {row.error[:60]}")
            continue
        r = row.result
        flagged = "-" if r.report.first_flagged_step is None else str(r.report.first_flagged_step)
        lines.append(f"{row.prompt_set:<12} {r.decision.value:<16} {r.reason.value:<16} {flagged:>8} "
                     f"{r.report.steps_computed:>5}  {row.prompt[:60]}")
    return "\n".join(lines)
