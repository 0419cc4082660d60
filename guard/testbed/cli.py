"""`memguard testbed build|report|verify|export`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from memguard.errors import CorruptData, MissingResource

TESTBED_DIR = Path(__file__).resolve().parent


def register(sub: argparse._SubParsersAction) -> None:
    tb = sub.add_parser("testbed", help="the memorizing testbed model").add_subparsers(
        dest="testbed_command", required=True, metavar="ACTION")

    p = tb.add_parser("build", help="generate the data, train the model, write the report (~40 min on 2 cores)")
    _testbed_arg(p)
    p.add_argument("--out", type=Path, help="output directory (default: the shipped testbed's)")
    p.add_argument("--quick", action="store_true", help="a few training steps only: checks the pipeline, not a model")
    p.add_argument("--seeds", type=int, help="seeds per prompt in the report (default: report.REPORT_SEEDS)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="run only the recipe's next restart cycle on the model already built in the output directory")
    p.set_defaults(func=_build)

    p = tb.add_parser("report", help="re-measure memorization of a built testbed")
    _testbed_arg(p)
    p.add_argument("--dir", type=Path, help="testbed directory (default: the named testbed's)")
    p.add_argument("--seeds", type=int, help="seeds per prompt (default: report.REPORT_SEEDS)")
    p.set_defaults(func=_report)

    p = tb.add_parser("verify", help="check every file against MANIFEST.json")
    _testbed_arg(p)
    p.add_argument("--dir", type=Path, help="testbed directory (default: the named testbed's)")
    p.set_defaults(func=_verify)

    p = tb.add_parser("export", help="write the training set as an image folder with captions.jsonl")
    _testbed_arg(p)
    p.add_argument("out", type=Path)
    p.add_argument("--unique", action="store_true", help="one file per distinct image (default: every duplicate, "
                                                         "as the model was trained)")
    p.add_argument("--near-duplicates", type=int, default=None, metavar="N",
                   help="near duplicates (re-encodes, resizes, crops, banners, watermarks) among each duplicated "
                        "item's copies, as a scraper holds them (default: the shipped indexes' count)")
    p.set_defaults(func=_export)


def _testbed_arg(p) -> None:
    from memguard.testbed.registry import BUILDABLE, DEFAULT_TESTBED, TESTBEDS
    p.add_argument("--testbed", choices=tuple(TESTBEDS) + tuple(BUILDABLE), default=DEFAULT_TESTBED,
                   help=f"which shipped testbed (default {DEFAULT_TESTBED}: v-prediction; eps: ε-prediction)")


def _dir(args) -> Path:
    from memguard.testbed.registry import get_testbed
    return getattr(args, "dir", None) or getattr(args, "out", None) or get_testbed(args.testbed).dir


def _build(args) -> int:
    from memguard.testbed.build import BuildConfig, build
    from memguard.testbed.registry import get_testbed

    tb = get_testbed(args.testbed)
    cfg = BuildConfig(data=tb.data, model=tb.model, train=tb.train)
    if args.seeds:
        cfg = dataclasses.replace(cfg, report_seeds=args.seeds)
    if args.quick:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(tb.train, vae_steps=4, unet_steps=4, warmup=1,
                                                                 restart_steps=min(tb.train.restart_steps, 4),
                                                                 vae_batch=8, unet_batch=8))
    out = _dir(args)
    t = time.time()
    manifest = build(out, cfg, report=not args.no_report, resume=args.resume)
    print(f"testbed built in {time.time() - t:.0f} s: {out} (manifest {manifest})")
    return 0


def _report(args) -> int:
    from memguard.testbed.build import refresh_manifest
    from memguard.testbed.report import REPORT_SEEDS, write_report

    from memguard.testbed.registry import get_testbed

    directory, timings = _dir(args), None
    manifest = directory / "MANIFEST.json"
    if manifest.is_file():
        timings = json.loads(manifest.read_text()).get("timings_s")
    t = time.time()
    fig = write_report(directory, get_testbed(args.testbed).data, seeds=args.seeds or REPORT_SEEDS, timings=timings)
    if manifest.is_file():
        refresh_manifest(directory, {"report": round(time.time() - t, 1)}, report_seeds=len(fig.seeds))
    copied, photos = fig.photos_copying()
    print(f"memorized captions copying in most seeds: {fig.share_memorized_copying():.0%} "
          f"({copied} of {photos} photos); report: {directory / 'REPORT.md'}")
    return 0


def _verify(args) -> int:
    from memguard.testbed.build import MANIFEST, verify_manifest

    directory = _dir(args)
    if not (directory / MANIFEST).is_file():
        raise MissingResource(f"{directory / MANIFEST} does not exist")
    bad = verify_manifest(directory)
    if bad:
        raise CorruptData(f"{len(bad)} file(s) differ from {directory / MANIFEST}: {', '.join(bad)}")
    print(f"ok: every file under {directory} matches its manifest")
    return 0


def _export(args) -> int:
    from memguard.testbed.build import check_output_dir
    from memguard.testbed.dataset import build_training_set, write_image_folder
    from memguard.testbed.registry import get_testbed

    check_output_dir(args.out)
    items = build_training_set(get_testbed(args.testbed).data)
    from memguard.testbed.dataset import NEAR_DUPLICATES

    near = 0 if args.unique else (NEAR_DUPLICATES if args.near_duplicates is None else args.near_duplicates)
    write_image_folder(items, args.out, copies=not args.unique, near_duplicates=near)
    records = len(items) if args.unique else sum(it.duplicates for it in items)
    print(f"wrote {records} images ({len(items)} distinct; each duplicated item also as up to {near} near "
          f"duplicates) and captions.jsonl to {args.out}")
    return 0
