"""`memguard testbed build|report|verify|export`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from guard.errors import CorruptData, MissingResource

TESTBED_DIR = Path(__file__).resolve().parent


def register(sub: argparse._SubParsersAction) -> None:
    tb = sub.add_parser("testbed", help="the memorizing testbed model").add_subparsers(
        dest="testbed_command", required=True, metavar="ACTION")

    p = tb.add_parser("build", help="generate the data, train the model, write the report (~40 min on 2 cores)")
    p.add_argument("--out", type=Path, default=TESTBED_DIR, help="output directory (default: the shipped testbed)")
    p.add_argument("--quick", action="store_true", help="a few training steps only: checks the pipeline, not a model")
    p.add_argument("--seeds", type=int, help="seeds per prompt in the report (default: report.REPORT_SEEDS)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--epsilon", action="store_true",
                   help="SD 1.x's recipe: ε-prediction on its own schedule (memorizes far less; see train.py)")
    p.set_defaults(func=_build)

    p = tb.add_parser("report", help="re-measure memorization of a built testbed")
    p.add_argument("--dir", type=Path, default=TESTBED_DIR)
    p.add_argument("--seeds", type=int, help="seeds per prompt (default: report.REPORT_SEEDS)")
    p.set_defaults(func=_report)

    p = tb.add_parser("verify", help="check every file against MANIFEST.json")
    p.add_argument("--dir", type=Path, default=TESTBED_DIR)
    p.set_defaults(func=_verify)

    p = tb.add_parser("export", help="write the training set as an image folder with captions.jsonl")
    p.add_argument("out", type=Path)
    p.set_defaults(func=_export)


def _build(args) -> int:
    from guard.testbed.build import BuildConfig, build
    from guard.testbed.train import TrainConfig

    cfg = BuildConfig(report_seeds=args.seeds) if args.seeds else BuildConfig()
    if args.quick:
        cfg = dataclasses.replace(cfg, train=TrainConfig(vae_steps=4, unet_steps=4, warmup=1, vae_batch=8,
                                                         unet_batch=8))
    if args.epsilon:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, prediction_type="epsilon",
                                                                 zero_terminal_snr=False))
    t = time.time()
    manifest = build(args.out, cfg, report=not args.no_report)
    print(f"testbed built in {time.time() - t:.0f} s: {args.out} (manifest {manifest})")
    return 0


def _report(args) -> int:
    from guard.testbed.build import refresh_manifest
    from guard.testbed.report import REPORT_SEEDS, write_report

    timings = None
    manifest = args.dir / "MANIFEST.json"
    if manifest.is_file():
        timings = json.loads(manifest.read_text()).get("timings_s")
    t = time.time()
    fig = write_report(args.dir, seeds=args.seeds or REPORT_SEEDS, timings=timings)
    if manifest.is_file():
        refresh_manifest(args.dir, {"report": round(time.time() - t, 1)}, report_seeds=len(fig.seeds))
    print(f"memorized captions copying in most seeds: {fig.share_memorized_copying():.0%}; "
          f"report: {args.dir / 'REPORT.md'}")
    return 0


def _verify(args) -> int:
    from guard.testbed.build import MANIFEST, verify_manifest

    if not (args.dir / MANIFEST).is_file():
        raise MissingResource(f"{args.dir / MANIFEST} does not exist")
    bad = verify_manifest(args.dir)
    if bad:
        raise CorruptData(f"{len(bad)} file(s) differ from {args.dir / MANIFEST}: {', '.join(bad)}")
    print(f"ok: every file under {args.dir} matches its manifest")
    return 0


def _export(args) -> int:
    from guard.testbed.dataset import build_training_set, write_image_folder

    from guard.testbed.build import check_output_dir

    check_output_dir(args.out)
    items = build_training_set()
    write_image_folder(items, args.out)
    print(f"wrote {len(items)} images and captions.jsonl to {args.out}")
    return 0
