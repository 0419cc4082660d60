"""Index scale benchmark: build and search the fingerprint index at 100k / 1M synthetic vectors,
on the faiss backend, the Milvus backend, or both side by side (--backend faiss milvus).

Vectors come from a clustered distribution (`Mixture`: hierarchical clusters of Zipf-like sizes,
low intrinsic dimension), not uniform noise, on which recall means nothing. Two query sets:
fresh draws from the mixture (neighbours at cosine ~0.6-0.75: the hard case) and near-copies of
indexed items (the guard's case). Reported per size and search breadth ("nprobe": IVF nprobe, or
HNSW efSearch for an HNSW factory): build time (the whole builder
path: staging, SQLite metadata, vector files, faiss train+add, manifest), bytes per item (on disk;
resident faiss index), p50/p99 latency of `FingerprintIndex.search_latent` (k=10) for 1 and 64
queries, recall@10 against exact search, and protect latency (durable SQLite commit + swap).

    nice -n 19 python -m memguard.benchmarks.index_scale --sizes 100000 1000000 --threads 1 --backend faiss milvus

faiss is limited to --threads OpenMP threads (default 1, to spare other work on the machine);
the figures are single-thread figures when it is 1. Milvus is a milvus-lite server process started
for the run (OMP_NUM_THREADS=--threads), or --milvus-uri (a real Milvus; bytes per item are then
not measured). Prints a table; writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memguard.index.backends.lite_server import wait_for_lite_indexes
from memguard.index.config import IndexConfig


@dataclass(frozen=True)
class Mixture:
    """Hierarchical clusters: C centres, `sub` sub-centres each, points spread in a `intrinsic`-d
    subspace of their sub-cluster plus a little isotropic noise (data with low intrinsic dimension,
    as real embeddings have; isotropic noise in 256-d would make every neighbour equidistant)."""
    subcentres: np.ndarray       # [C·sub, D]
    bases: np.ndarray            # [C, D, intrinsic]
    sub: int

    @classmethod
    def make(cls, n: int, dim: int, seed: int, sub: int = 16, intrinsic: int = 16) -> "Mixture":
        rng = np.random.default_rng(seed)
        c = max(64, n // 2000)
        top = _unit(rng.standard_normal((c, dim)).astype(np.float32))
        subc = top[:, None, :] + 0.5 * rng.standard_normal((c, sub, dim)).astype(np.float32) / np.sqrt(dim)
        bases = rng.standard_normal((c, dim, intrinsic)).astype(np.float32) / np.sqrt(dim)
        return cls(_unit(subc.reshape(-1, dim)), bases, sub)

    def draw(self, n: int, seed: int) -> np.ndarray:
        """n unit vectors [n, D] float32; sub-cluster sizes are Zipf-like (weights 1/√rank)."""
        rng = np.random.default_rng(seed)
        dim, intrinsic = self.bases.shape[1:]
        w = rng.permutation(1.0 / np.arange(1, len(self.subcentres) + 1) ** 0.5)
        which = rng.choice(len(self.subcentres), size=n, p=w / w.sum())
        out = np.empty((n, dim), np.float32)
        for start in range(0, n, 50_000):
            wb = which[start:start + 50_000]
            coef = rng.standard_normal((len(wb), intrinsic)).astype(np.float32) * 0.35 * np.sqrt(dim / intrinsic)
            x = (self.subcentres[wb] + np.einsum("ndi,ni->nd", self.bases[wb // self.sub], coef)
                 + 0.1 * rng.standard_normal((len(wb), dim)).astype(np.float32) / np.sqrt(dim))
            out[start:start + len(wb)] = _unit(x)
        return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def percentiles(samples: list[float]) -> dict:
    a = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def exact_top(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    import faiss
    flat = faiss.IndexFlatIP(db.shape[1])
    flat.add(db)
    return flat.search(queries, k)[1]


def _recall(index, queries: np.ndarray, truth: np.ndarray) -> float:
    import torch
    ids, _, _ = index.search_latent(torch.from_numpy(queries), 10)
    rows = [{index.items.row_of(i) for i in row} for row in ids]
    return round(float(np.mean([len(r & set(t.tolist())) / 10 for r, t in zip(rows, truth)])), 4)


def _latency(index, queries: np.ndarray, batch: int, repeats: int) -> dict:
    import torch
    times = []
    for i in range(repeats):
        q = torch.from_numpy(np.ascontiguousarray(np.roll(queries, -i * batch, axis=0)[:batch]))
        t = time.perf_counter()
        index.search_latent(q, 10)
        times.append(time.perf_counter() - t)
    return percentiles(times)


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_size(n: int, dim: int, args, work: Path, backend: str, lite_dir: Path | None) -> list[dict]:
    """Build once at size n on `backend`, then measure each nprobe of the sweep (search parameters only)."""
    import torch

    from memguard.index.api import FingerprintIndex
    from memguard.index.sources import EmbeddingSource

    mix = Mixture.make(n, dim, seed=n + dim)
    db = mix.draw(n, seed=1)
    fresh = mix.draw(args.queries, seed=2)                       # new draws: neighbours at cos ~0.6-0.75
    extra = mix.draw(args.protects, seed=4)                      # vectors to protect
    rng = np.random.default_rng(3)
    sources = rng.choice(n, args.queries, replace=False)
    near = _unit(db[sources]                                     # near-copies of items: the guard's case
                 + 0.15 * rng.standard_normal((args.queries, dim)).astype(np.float32) / np.sqrt(dim))
    npy = work / f"db-{n}-{dim}.npy"
    np.save(npy, db)
    cfg = IndexConfig(factory=args.factory, exact_max_items=args.exact_max, rerank_factor=args.rerank,
                      faces=False, train_sample=args.train_sample, backend=backend, milvus_index=args.milvus_index,
                      hnsw_m=args.hnsw_m, hnsw_ef_construction=args.ef_construction)
    out = work / f"index-{n}-{dim}-{'faiss' if backend == 'faiss' else 'milvus'}"
    engine_before = _bytes_under(lite_dir) if lite_dir else 0
    import faiss
    faiss.omp_set_num_threads(args.build_threads or args.threads)
    t0 = time.perf_counter()
    FingerprintIndex.build(out, EmbeddingSource(npy, "latent"), cfg=cfg, progress=False)
    build_s = time.perf_counter() - t0
    index_wait_s = wait_for_lite_indexes(lite_dir) if lite_dir else None   # milvus-lite indexes in the background
    if index_wait_s is not None:
        build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(args.threads)
    engine_bytes = _bytes_under(lite_dir) - engine_before if lite_dir else None
    npy.unlink()
    t = time.perf_counter()
    truth_fresh, truth_near = exact_top(db, fresh, 10), exact_top(db, near, 10)
    exact_ms = (time.perf_counter() - t) / (2 * args.queries) * 1000
    del db
    disk = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) + (engine_bytes or 0)
    rows = []
    with FingerprintIndex.open(out, verify_checksums=False) as probe:
        sweep = args.nprobe if not probe.signals["latent"].exact else [None]
    for nprobe in sweep:
        # one breadth knob for both families: IVF nprobe, HNSW efSearch
        index = FingerprintIndex.open(out, verify_checksums=False,
                                      overrides={"nprobe": nprobe, "hnsw_ef": nprobe} if nprobe else {})
        sig = index.signals["latent"]
        recall_fresh, recall_near = _recall(index, fresh, truth_fresh), _recall(index, near, truth_near)
        top1 = index.search_latent(torch.from_numpy(near), 1)[0]
        source_hit = round(float(np.mean([index.items.row_of(ids[0]) == s for ids, s in zip(top1, sources)])), 4)
        timed = args.queries if backend == "faiss" or not args.milvus_queries else min(args.milvus_queries, args.queries)
        prot = []
        for i, vec in enumerate(extra):   # searches below also scan these protected vectors
            t = time.perf_counter()
            index.protect_vectors("benchmark", item_id=f"bench-{i}", latent=vec)
            prot.append(time.perf_counter() - t)
        described = sig.collection.describe()
        if lite_dir and described.get("collection"):   # what the engine recorded, not what was asked
            specs = json.loads((lite_dir / "collections" / described["collection"] / "manifest.json").read_text())
            described["engine_index_spec"] = specs.get("index_specs", {}).get("vector")
        rows.append({
            "n": n, "dim": dim, "backend": described["kind"], "factory": sig.info.factory, "nprobe": nprobe,
            "rerank_factor": None if sig.exact else args.rerank, "build_s": round(build_s, 1),
            "background_index_wait_s": None if index_wait_s is None else round(index_wait_s, 1),
            "disk_bytes_per_item": round(disk / n, 1) if lite_dir or backend == "faiss" else None,
            "index_bytes_per_item": round(described["index_bytes"] / n, 1) if "index_bytes" in described else None,
            "recall_at_10_fresh": recall_fresh, "recall_at_10_near_copy": recall_near,
            "near_copy_source_at_1": source_hit,
            "recall_queries": args.queries, "search_1_samples": timed, "search_64_samples": max(10, timed // 10),
            "search_1": _latency(index, fresh, 1, timed),
            "search_64": _latency(index, fresh, 64, max(10, timed // 10)),
            "protect": percentiles(prot), "protected_during_search": args.protects,
            "engine_index_spec": described.get("engine_index_spec"),
            "exact_flat_ms_per_query_64batch": round(exact_ms, 3)})
        print(json.dumps(rows[-1]), flush=True)
        index.close()
        for p in out.glob("registry.sqlite*"):   # next sweep point starts with an empty registry
            p.unlink()
        from memguard.index.store import Registry
        Registry(out / "registry.sqlite", create=True).close()
    if backend != "faiss":
        from pymilvus import MilvusClient
        client = MilvusClient(uri=sig.info.backend["uri"])
        for info in FingerprintIndex.open(out, verify_checksums=False).manifest.signals.values():
            client.drop_collection(info.backend["collection"])
    shutil.rmtree(out)
    return rows


def table(results: list[dict], threads: int) -> str:
    head = (f"index scale — faiss {threads} OpenMP thread(s), {platform.processor() or platform.machine()}, "
            "latencies of FingerprintIndex.search_latent (k=10, exact re-rank included)\n")
    cols = ("n", "dim", "backend", "factory", "nprobe", "build_s", "disk B/item", "index B/item", "recall@10 fresh",
            "recall@10 near-copy", "source@1 near-copy",
            "1q p50 ms", "1q p99 ms", "1q samples", "64q p50 ms", "64q p99 ms", "protect p50 ms", "protect p99 ms")
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in results:
        lines.append(" | ".join(str(v) for v in (
            r["n"], r["dim"], r["backend"], r["factory"], r["nprobe"], r["build_s"], r["disk_bytes_per_item"],
            r["index_bytes_per_item"], r["recall_at_10_fresh"], r["recall_at_10_near_copy"], r["near_copy_source_at_1"], r["search_1"]["p50_ms"], r["search_1"]["p99_ms"], r.get("search_1_samples", "-"), r["search_64"]["p50_ms"],
            r["search_64"]["p99_ms"], r["protect"]["p50_ms"], r["protect"]["p99_ms"])))
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[256])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--milvus-queries", type=int,
                   help="timed single-query searches on Milvus (default --queries; recall still uses all "
                        "--queries): milvus-lite spends seconds per search call at 1M rows")
    p.add_argument("--protects", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads for searches")
    p.add_argument("--build-threads", type=int, help="faiss OpenMP threads for builds (default: --threads)")
    p.add_argument("--backend", nargs="+", choices=("faiss", "milvus"), default=["faiss"],
                   help="vector backends to measure, side by side")
    p.add_argument("--milvus-uri", help="a running Milvus (default: a milvus-lite server started for the run)")
    p.add_argument("--milvus-index", help="Milvus index type (default: FLAT when small, HNSW above --exact-max)")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=IndexConfig.hnsw_ef_construction)
    p.add_argument("--factory", help="force a faiss factory string (default: chosen by size)")
    p.add_argument("--exact-max", type=int, default=50_000)
    p.add_argument("--nprobe", type=int, nargs="+", default=[32, 64, 128, 256], help="search breadth sweep: IVF nprobe, HNSW efSearch")
    p.add_argument("--rerank", type=int, default=4)
    p.add_argument("--train-sample", type=int, default=200_000)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/index_scale.json"))
    args = p.parse_args(argv)

    import os

    import faiss
    import torch
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="index_scale-", dir=args.workdir))
    results, server = [], None
    try:
        if "milvus" in args.backend and not args.milvus_uri:
            from memguard.index.backends.lite_server import start_lite_server
            # the server's faiss builds and searches get the threads ours get
            os.environ["OMP_NUM_THREADS"] = str(args.build_threads or args.threads)
            server = start_lite_server(work / "milvus")
        for dim in args.dims:
            for n in args.sizes:
                for backend in args.backend:
                    uri = "faiss" if backend == "faiss" else args.milvus_uri or server.uri
                    results += bench_size(n, dim, args, work, uri, server.data_dir / "db" if server and backend != "faiss" else None)
    finally:
        if server:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = table(results, args.threads)
    if args.milvus_queries and "milvus" in args.backend:
        text += (f"\nMilvus latencies from {args.milvus_queries} single-query searches (1q samples column); "
                 f"recall from all {args.queries} queries on both backends")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "build_threads": args.build_threads or args.threads,
                                    "argv": argv if argv is not None else __import__("sys").argv[1:],
                                    "results": results, "table": text}, indent=2))
    args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
