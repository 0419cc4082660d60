"""`memguard demo` (the README's `bash scripts/demo.sh`): every decision on the shipped testbed, a
contact sheet beside the table, and no warning a demo user cannot act on."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memguard.server.demo import DEMO_SETS, DEMO_TESTBED, demo_cases
from memguard.testbed.registry import TESTBEDS, get_testbed
from memguard.types import Decision

TB = get_testbed(DEMO_TESTBED)


def _in_tree(tb) -> bool:
    """The testbed's model, index and policy are in the tree (the demo serves all three)."""
    return (tb.model_dir / "model_index.json").is_file() and (tb.index_dir / "manifest.json").is_file() \
        and tb.policy_path.is_file()


needs_demo_testbed = pytest.mark.skipif(not _in_tree(TB), reason=f"the {DEMO_TESTBED} testbed (model, index, "
                                                                 "policy) is not in the tree")
# what the README's demo must never print on its normal path (nothing a user can act on)
UNACTIONABLE = ("accelerate", "torch_dtype", "FutureWarning", "DeprecationWarning", "authentication is DISABLED",
                "PUBLIC demo key")


def _demo(*args: str, out: Path) -> subprocess.CompletedProcess:
    memguard = Path(sys.executable).parent / "memguard"   # the installed console script, as demo.sh runs it
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run([str(memguard), "demo", *args, "--out", str(out)], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=1200)


def _rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.split()[:1] and line.split()[0] in DEMO_SETS]


def test_demo_cases_cover_every_set_the_testbed_has():
    eps = demo_cases("eps", per_set=2)
    assert [c.prompt_set for c in eps] == ["novel"] * 2 + ["composition"] * 4 + ["memorized"] * 2 \
        + ["paraphrased"] * 2 + ["face"]
    assert {c.prompt for c in eps if c.prompt_set == "composition"} == set(TB.prompts("memorized")[-4:])
    assert all(c.size == 128 for c in eps if c.prompt_set == "face")
    vpred = demo_cases("vpred", per_set=1)   # memorizes photos only: nothing to reroute faithfully
    assert [c.prompt_set for c in vpred] == ["novel", "memorized", "paraphrased", "face"]
    # the face row runs at its testbed's seed offset from --seed
    assert [c.seed for c in demo_cases("vpred", per_set=1, seed=5) if c.prompt_set == "face"] == [5 + 18]


@needs_demo_testbed
def test_the_readme_demo_shows_every_decision_and_a_contact_sheet(tmp_path):
    out = tmp_path / "demo"
    r = _demo(out=out)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(r.stdout)
    assert [row[0] for row in rows] == [c.prompt_set for c in demo_cases()]
    decisions = {row[1] for row in rows}
    assert decisions == {d.value for d in Decision}, r.stdout
    by_set = {}
    for row in rows:
        by_set.setdefault(row[0], set()).add(row[1])
    # a memorized composition is never released as is: rerouted (the demo's point) or, when a
    # batch's reroute still resembles it, blocked; which one can depend on how the server batched
    assert by_set["novel"] == {"ALLOWED"} and "REROUTED" in by_set["composition"] \
        and by_set["composition"] <= {"REROUTED", "BLOCKED"}, r.stdout
    assert "FACE_OBFUSCATED" in by_set["face"], r.stdout
    # released images beside the table: one PNG per row that was not blocked, and the contact sheet
    released = sorted(p.name.split("-", 1)[1] for p in out.glob("[0-9]*.png"))
    assert released == sorted(f"{row[0]}-{row[1].lower()}.png" for row in rows if row[1] != "BLOCKED")
    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))
    columns, tiles = 4, len(rows)
    assert sheet.shape[1] == columns * 136 + 8 and sheet.shape[0] == -(-tiles // columns) * 180 + 8
    assert f"contact sheet: {(out / 'contact_sheet.png').resolve()}" in r.stdout
    # nothing on stderr that a user could not act on (the loader's progress bars are not warnings)
    for text in UNACTIONABLE:
        assert text not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("name", sorted(set(TESTBEDS) - {DEMO_TESTBED}))
def test_every_shipped_testbeds_demo_shows_every_decision(name, tmp_path):
    """`memguard demo --testbed NAME` on the other shipped testbeds: the same four decisions (the v-testbed
    memorizes photos only, so its REROUTED row is a paraphrase; each face row runs at its testbed's seed)."""
    tb = TESTBEDS[name]
    if not _in_tree(tb):
        pytest.skip(f"the {name} testbed (model, index, policy) is not in the tree")
    r = _demo("--testbed", name, out=tmp_path / "demo")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(r.stdout)
    assert [row[0] for row in rows] == [c.prompt_set for c in demo_cases(name)]
    assert {row[1] for row in rows} == {d.value for d in Decision}, r.stdout
    assert {row[1] for row in rows if row[0] == "novel"} == {"ALLOWED"}, r.stdout
    assert [row[1] for row in rows if row[0] == "face"] == ["FACE_OBFUSCATED"], r.stdout


def test_unknown_testbed_is_one_line_error(tmp_path):
    r = _demo("--testbed", "nope", out=tmp_path / "demo")
    assert r.returncode == 2 and "unknown testbed 'nope'" in r.stderr and "Traceback" not in r.stderr
