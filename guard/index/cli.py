"""`memguard index build | migrate | stats | verify | calibrate | screen | protect | unprotect` (all take --json)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from memguard.errors import InvalidInput


def register(sub: argparse._SubParsersAction) -> None:
    ix = sub.add_parser("index", help="the fingerprint index: build, screen, protect").add_subparsers(
        dest="index_command", required=True, metavar="ACTION")

    p = _cmd(ix, "build", _build, "build (or resume building) an index directory")
    p.add_argument("out", type=Path, help="index directory to create")
    _source_args(p)
    p.add_argument("--embeddings", type=Path, help="precomputed vectors: .npy [N, D] or .parquet")
    p.add_argument("--embedding-signal", choices=("latent", "clip"), default="latent")
    p.add_argument("--embedding-meta", type=Path, help="JSONL of per-row metadata for an .npy file")
    p.add_argument("--model", type=Path, help="diffusers pipeline (or VAE) directory: latent fingerprints")
    p.add_argument("--clip-model", help="open_clip model name, e.g. ViT-B-32")
    p.add_argument("--clip-weights", type=Path, help="LOCAL open_clip checkpoint file (never downloaded)")
    p.add_argument("--factory", help="faiss factory string for latent/clip (default: chosen from size)")
    p.add_argument("--face-factory", help="faiss factory string for face descriptors")
    p.add_argument("--exact-max", type=int, help="largest index kept exact when no factory is given")
    _backend_args(p)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--no-faces", action="store_true", help="do not detect or index faces")
    p.add_argument("--restart", action="store_true", help="discard an unfinished build instead of resuming it")
    p.add_argument("--stop-after", type=int, help="stop after this many input records (resume later)")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="index identical images once per record (default: fold them into one item with a count)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="leave the screen thresholds uncalibrated (default: calibrate them after the build)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")

    p = _cmd(ix, "migrate", _migrate, "copy a faiss index into Milvus (a new index directory)")
    p.add_argument("src", type=Path, help="faiss-backed index directory")
    p.add_argument("--out", type=Path, help="new index directory (default: SRC-milvus beside SRC)")
    _backend_args(p, required=True)
    p.add_argument("--no-progress", action="store_true")

    p = _cmd(ix, "seal", _seal, "encrypt the face descriptors and identity names of an older index in place")
    p.add_argument("dir", type=Path)

    p = _cmd(ix, "stats", _stats, "counts, dimensions, factory strings, thresholds")
    p.add_argument("dir", type=Path)

    p = _cmd(ix, "verify", _verify, "check checksums, databases and counts")
    p.add_argument("dir", type=Path)

    p = _cmd(ix, "calibrate", _calibrate, "measure augmented copies, set thresholds for a false-match rate")
    p.add_argument("dir", type=Path)
    _source_args(p)
    p.add_argument("--heldout", type=Path, help="image folder never indexed: reports its false-match rate")
    p.add_argument("--fmr", type=float, default=0.01, help="target false-match rate (default 0.01)")
    p.add_argument("--samples", type=int, default=300, help="indexed items to augment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--face-negatives", type=Path, help="folder of other people's faces (default: skimage LFW)")
    p.add_argument("--dry-run", action="store_true", help="report only; leave the manifest unchanged")
    _open_args(p)

    p = _cmd(ix, "duplicates", _duplicates, "near-duplicate clusters of the training set (size, members, captions)")
    p.add_argument("dir", type=Path)
    p.add_argument("--min-size", type=int, default=2, help="smallest cluster listed, in training records")
    p.add_argument("--neighbours", type=int, default=None,
                   help="recompute the clusters with this many nearest items per signal (default: the stored clusters)")

    p = _cmd(ix, "screen", _screen, "screen image files for copies and faces")
    p.add_argument("dir", type=Path)
    p.add_argument("images", type=Path, nargs="+")
    _open_args(p)

    p = _cmd(ix, "protect", _protect, "protect an image or a person's face (durable when it returns)")
    p.add_argument("dir", type=Path)
    p.add_argument("--image", type=Path, help="image to protect")
    p.add_argument("--item-id", help="id to report for the protected image (default: the protection id)")
    p.add_argument("--face", type=Path, nargs="+", help="photo(s) of the person to protect")
    p.add_argument("--identity", help="name of the protected person (with --face)")
    p.add_argument("--reason", required=True, help="why (goes to the audit log)")
    _open_args(p)

    p = _cmd(ix, "unprotect", _unprotect, "remove a protection by protection id, item id or identity")
    p.add_argument("dir", type=Path)
    p.add_argument("id")
    p.add_argument("--reason", required=True)


def _cmd(ix, name, func, help_text):
    p = ix.add_parser(name, help=help_text)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=func)
    return p


def _source_args(p) -> None:
    p.add_argument("--images", type=Path, help="image folder (optional captions.jsonl)")
    p.add_argument("--shards", type=Path, nargs="+", help="webdataset-style .tar shards")


def _backend_args(p, required: bool = False) -> None:
    p.add_argument("--backend", required=required, help="where vectors live: faiss (default), milvus://HOST:PORT, "
                                                        "http(s)://HOST:PORT, or a milvus-lite FILE.db")
    p.add_argument("--milvus-index", help="Milvus index type: FLAT, HNSW, HNSW_SQ, IVF_FLAT, IVF_SQ8, IVF_PQ "
                                          "(default: FLAT when small, HNSW above --exact-max)")
    p.add_argument("--milvus-prefix", help="collection name prefix (default: mg_<random>)")


def _backend_changes(args) -> dict:
    return {k: v for k, v in (("backend", args.backend), ("milvus_index", args.milvus_index),
                              ("milvus_prefix", args.milvus_prefix)) if v}


def _open_args(p) -> None:
    p.add_argument("--model", type=Path, help="VAE/pipeline directory (default: the one recorded at build)")
    p.add_argument("--device", default="cpu")


def _emit(args, data: dict, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def _source(args):
    from memguard.index.sources import EmbeddingSource, ImageFolderSource, TarShardSource
    given = [x for x in (args.images, args.shards, getattr(args, "embeddings", None)) if x]
    if len(given) != 1:
        raise InvalidInput("source", "give exactly one of --images, --shards" +
                           (", --embeddings" if hasattr(args, "embeddings") else ""))
    if args.images or args.shards:
        source = ImageFolderSource(args.images) if args.images else TarShardSource(args.shards)
        if getattr(args, "keep_duplicates", True):
            return source
        from memguard.index.duplicates import DedupedSource
        return DedupedSource(source)
    return EmbeddingSource(args.embeddings, args.embedding_signal, args.embedding_meta)


def _open(args):
    from memguard.index.api import FingerprintIndex
    return FingerprintIndex.open(args.dir, model_dir=getattr(args, "model", None),
                                 device=getattr(args, "device", "cpu"))


def _build(args) -> int:
    from memguard.index.api import FingerprintIndex
    from memguard.index.config import IndexConfig
    cfg = IndexConfig(faces=not args.no_faces)
    changes = {k: v for k, v in (("factory", args.factory), ("face_factory", args.face_factory),
                                 ("exact_max_items", args.exact_max), ("batch_size", args.batch_size)) if v}
    cfg = replace(cfg, **changes, **_backend_changes(args))
    report = FingerprintIndex.build(args.out, _source(args), model_dir=args.model, clip_model=args.clip_model,
                                    clip_weights=args.clip_weights, cfg=cfg, device=args.device,
                                    progress=not (args.no_progress or args.json), restart=args.restart,
                                    stop_after=args.stop_after)
    state = "built" if report.finished else "stopped (resume with the same command)"
    skipped = "".join(f"\n  skipped {s['ref']}: {s['error']}" for s in report.skipped_examples)
    text = (f"{state}: {report.out}: {report.items} items, {report.faces} faces, "
            f"{report.skipped} skipped in {report.seconds:.1f} s{skipped}")
    doc = report.to_json()
    if report.finished and not args.no_calibrate and (args.images or args.shards):
        # one flow, nothing left uncalibrated: the screen's thresholds come from this training set
        from memguard.index.calibrate import CalibrationConfig, calibrate
        with FingerprintIndex.open(args.out, model_dir=args.model, device=args.device) as index:
            cal = calibrate(index, _source(args), cfg=CalibrationConfig(), progress=not (args.no_progress or args.json))
        doc["calibration"] = {"thresholds": cal.get("thresholds"), "combined_tpr": cal.get("combined_tpr"),
                              "checks": cal.get("checks"), "blind": cal.get("blind")}
        text += f"\nscreen thresholds calibrated (false-match rate 0.01): {cal.get('thresholds')}"
        text += "".join(f"\n{line}" for line in _blind_warning(cal))
    elif report.finished:
        text += "\nWARNING: screen thresholds are uncalibrated defaults; run `memguard index calibrate`"
    _emit(args, doc, text)
    return 0


def _duplicates(args) -> int:
    from memguard.index.duplicates import clusters_table, find_clusters
    with _open(args) as index:
        clusters = find_clusters(index, min_size=args.min_size, neighbours=args.neighbours)
    records = sum(c.size for c in clusters)
    _emit(args, {"clusters": [c.to_json() for c in clusters], "count": len(clusters), "records": records},
          f"{len(clusters)} clusters of ≥ {args.min_size} training records ({records} records in all)\n"
          + clusters_table(clusters))
    return 0


def _migrate(args) -> int:
    from memguard.index.migrate import migrate
    out = args.out or args.src.with_name(f"{args.src.name}-milvus")
    report = migrate(args.src, out, args.backend, changes=_backend_changes(args),
                     progress=not (args.no_progress or args.json))
    lines = [f"migrated {args.src} → {report['out']} on {report['backend']} in {report['seconds']:.1f} s"]
    lines += [f"  {s}: {i['count']} rows in {i['collection']} ({i['index_type']})" for s, i in report["signals"].items()]
    _emit(args, report, "\n".join(lines))
    return 0


def _seal(args) -> int:
    from memguard.crypto import DataKey, require_key
    from memguard.index.sealed import seal_index
    report = seal_index(args.dir, require_key(DataKey.resolve(), "seal faces"))
    _emit(args, report, f"{args.dir}: " + (report.get("note") or
                                         f"sealed {report['sealed']} face descriptors and {report['identities']} "
                                         f"identity names (key id {report['key_id']})"))
    return 0


def _stats(args) -> int:
    with _open(args) as index:
        s = index.stats()
    lines = [f"{s['path']}: {s['counts']['items']} items, {s['counts']['faces']} faces, "
             f"{s['counts']['protected_images']} protected images, {s['counts']['protected_identities']} "
             f"protected identities, {s['bytes_per_item']} bytes/item"]
    lines += [f"  {n}: dim {v['dim']}, {v['count']} rows, factory {v['factory']}" for n, v in s["signals"].items()]
    if s["maps"]:
        lines.append(f"  latent maps (aligned re-score): {s['maps']['count']} rows of {s['maps']['channels']}×"
                     f"{s['maps']['grid']}², {s['maps']['bytes']} bytes")
    th = s["thresholds"]
    lines.append(f"  thresholds ({'calibrated' if th['calibrated'] else 'defaults'}): latent ≥ {th['latent']:.4f}, "
                 f"aligned z ≥ {th['aligned']:.2f}, pdq ≤ {th['pdq']:.0f}, clip ≥ {th['clip']:.4f}, "
                 f"face ≤ {th['face']:.4f}")
    _emit(args, s, "\n".join(lines))
    return 0


def _verify(args) -> int:
    with _open(args) as index:
        result = index.verify()
    _emit(args, result, f"{result['path']}: ok\n" + "\n".join(f"  {c}" for c in result["checks"]))
    return 0


def _blind_warning(report: dict) -> list[str]:
    """The warning of a screen that cannot see JPEG copies or VAE round trips (memguard.index.calibrate.MIN_COPY_TPR)."""
    if not report.get("blind"):
        return []
    return [f"WARNING: the screen catches only {report['blind']} of JPEG copies / VAE round trips of training images "
            "at this false-match rate: it cannot see a copy. Check the model's VAE (the index's encoder), "
            "`memguard index duplicates` (near duplicates that did not join a cluster) and the calibration sample."]


def _calibrate(args) -> int:
    from memguard.index.calibrate import CalibrationConfig, calibrate
    from memguard.index.sources import ImageFolderSource
    cfg = CalibrationConfig(false_match_rate=args.fmr, samples=args.samples, seed=args.seed,
                            face_negatives=args.face_negatives)
    with _open(args) as index:
        report = calibrate(index, _source(args), heldout=ImageFolderSource(args.heldout) if args.heldout else None,
                           cfg=cfg, progress=not args.json, write=not args.dry_run)
    lines = [f"thresholds for false-match rate {args.fmr} ({'not written' if args.dry_run else 'written'}):"]
    for name, sig in report["signals"].items():
        lines.append(f"  {name}: threshold {sig['threshold']:.4f}, fmr {sig['fmr']} on {sig['negatives']} "
                     f"negatives, true-match rate {sig['tpr']}")
    lines.append(f"  any signal: true-match rate {report['combined_tpr']}, checks {report['checks']}")
    lines.append(f"  near-duplicate clusters: {report['clusters']['count']} "
                 f"({report['clusters']['joined_items']} items joined to another; {report['cluster_rounds']} round(s))")
    lines += _blind_warning(report)
    if "faces" in report:
        f = report["faces"]
        lines.append(f"  face: threshold {f['threshold']:.4f}, true-match rate {f['tpr']}, "
                     f"positives {f['positive_distances']}, negatives {f['negative_distances']}")
    if "heldout" in report:
        lines.append(f"  held-out: {report['heldout']['false_matches']} of {report['heldout']['images']} flagged")
    _emit(args, report, "\n".join(lines))
    return 0


def _read_views(path: Path, field_name: str, *, still: bool = False) -> list:
    """A local image as a viewer shows it (memguard.index.decode, the server's decoder): EXIF
    orientation, 16-bit samples scaled, transparency over white (and black), every frame; `still`:
    one picture (Protect), an animation refused. Any format PIL reads; InvalidInput names the field."""
    from memguard.index.decode import LOCAL_LIMITS, decode_views
    if not path.is_file():
        raise InvalidInput(field_name, f"{path}: no such file")
    try:
        return decode_views(path.read_bytes(), field_name, LOCAL_LIMITS, multi_frame=not still)[:1 if still else None]
    except InvalidInput as exc:
        raise InvalidInput(field_name, f"{path}: {str(exc).removeprefix(f'{exc.field}: ')}") from exc


def _read_image(path: Path, field_name: str):
    return _read_views(path, field_name, still=True)[0]


def _worst(results: list):
    """One verdict for the views of one file: a (protected) copy first, then the most matched faces."""
    return max(results, key=lambda r: (r.is_copy, r.protected, sum(1 for f in r.faces if f.matched)))


def _screen(args) -> int:
    results, lines = [], []
    with _open(args) as index:
        for i, path in enumerate(args.images):
            views = _read_views(path, f"images[{i}]")
            r = _worst([index.screen(view) for view in views])
            results.append({"image": str(path)} | r.to_json() | {"views": len(views)})
            best = r.copies[0] if r.copies else None
            lines.append(f"{path}: {'COPY of ' + best.item_id if best else 'no copy'}"
                         f"{' (protected)' if r.protected else ''}; faces: "
                         + (", ".join(f"{f.identity} d={f.distance:.3f}{' MATCH' if f.matched else ''}"
                                      for f in r.faces) or "none"))
    _emit(args, {"results": results}, "\n".join(lines))
    return 0


def _protect(args) -> int:
    if bool(args.image) == bool(args.face):
        raise InvalidInput("image", "give exactly one of --image or --face")
    with _open(args) as index:
        if args.image:
            receipt = index.protect_image(_read_image(args.image, "image"), args.reason, args.item_id)
        else:
            if not args.identity:
                raise InvalidInput("identity", "--face needs --identity")
            images = [_read_image(p, f"face[{i}]") for i, p in enumerate(args.face)]
            receipt = index.protect_face(images, args.identity, args.reason)
    _emit(args, asdict(receipt), f"protected {receipt.kind} {receipt.subject} as {receipt.pid}")
    return 0


def _unprotect(args) -> int:
    with _open(args) as index:
        pids = index.unprotect(args.id, args.reason)
    _emit(args, {"removed": pids}, f"removed {', '.join(pids)}")
    return 0
