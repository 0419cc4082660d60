"""The Milvus backend (pymilvus.MilvusClient): one collection per signal of an index.

Schema: row INT64 (primary key: the row in items.sqlite), vector, item_id VARCHAR, protected BOOL,
meta JSON. PDQ hashes are stored as 256 ±1 floats under inner product (Hamming = (256 − IP) / 2,
exact): milvus-lite, which tests and the single-host demo use, has no BINARY_VECTOR type; a Milvus
cluster could hold them as BINARY_VECTOR/HAMMING at 32 bytes instead of 1 KiB (deploy/SCALING.md).
Searches ask for the stored vectors and re-score them exactly (memguard.index.scores), so scores do
not depend on Milvus's distance conventions; structures that store lossy codes (HNSW_SQ, IVF_SQ8,
IVF_PQ) fetch rerank_factor·k candidates first. Collections are created with the configured
consistency level (Strong by default: a read sees every acknowledged write).

Authentication (a Milvus server with `common.security.authorizationEnabled`): the token comes from
the environment only, never the command line or a URI: $MEMGUARD_MILVUS_TOKEN, or the file named by
$MEMGUARD_MILVUS_TOKEN_FILE (keep it 0600; a group/other-readable file is warned about). The token is
what MilvusClient takes: "USER:PASSWORD" or an API key. A milvus-lite file has no authentication.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from memguard.crypto import warn_if_readable
from memguard.errors import CorruptData, InvalidInput, MissingResource
from memguard.index import factory as fx
from memguard.index.backends.base import BackendURI, VectorCollection
from memguard.index.config import IndexConfig
from memguard.index.manifest import SignalInfo
from memguard.index.pdq import PDQ_BITS, PDQ_BYTES
from memguard.index.scores import empty_hits, rank_candidates
from memguard.index.vectors import pack_bits

log = logging.getLogger(__name__)


INDEX_TYPES = ("FLAT", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8", "IVF_PQ")
LOSSY = ("HNSW_SQ", "IVF_SQ8", "IVF_PQ")      # codes, not the floats: re-rank a wider shortlist
CONSISTENCY = "Strong"
CACHE_ROWS = 4096     # stored vectors of recent hits: a screen re-scores its candidates right after searching
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")

ENV_TOKEN = "MEMGUARD_MILVUS_TOKEN"
ENV_TOKEN_FILE = "MEMGUARD_MILVUS_TOKEN_FILE"

_clients: dict[tuple[str, str], object] = {}
_clients_lock = threading.Lock()


def milvus_token() -> str:
    """The Milvus token from the environment ("" when none): $MEMGUARD_MILVUS_TOKEN or the contents
    of the file $MEMGUARD_MILVUS_TOKEN_FILE names (not both)."""
    value, path = os.environ.get(ENV_TOKEN, ""), os.environ.get(ENV_TOKEN_FILE, "")
    if value and path:
        raise InvalidInput(ENV_TOKEN, f"set {ENV_TOKEN} or {ENV_TOKEN_FILE}, not both")
    if not path:
        return value.strip()
    file = Path(path)
    if not file.is_file():
        raise MissingResource(f"{ENV_TOKEN_FILE}: {file} does not exist")
    warn_if_readable(file, "Milvus token file")
    token = file.read_text().strip()
    if not token:
        raise InvalidInput(ENV_TOKEN_FILE, f"{file} is empty")
    return token


CONNECT_ATTEMPTS = 3


def client(backend: BackendURI):
    """One MilvusClient per URI, token and process (a milvus-lite .db path starts its engine once).
    A server URI gets the environment's token (milvus_token); a milvus-lite file none."""
    token = "" if backend.lite_file else milvus_token()
    with _clients_lock:
        if (backend.uri, token) not in _clients:
            from pymilvus import MilvusClient
            from pymilvus.exceptions import MilvusException
            # a connect can fail transiently (a server that just sent GOAWAY "too many pings" to
            # another channel of this process): CONNECT_ATTEMPTS tries, each failure logged
            for attempt in range(1, CONNECT_ATTEMPTS + 1):
                try:
                    _clients[backend.uri, token] = (MilvusClient(uri=backend.uri, token=token) if token
                                                    else MilvusClient(uri=backend.uri))
                    break
                except MilvusException as exc:
                    if attempt == CONNECT_ATTEMPTS:
                        raise MissingResource(f"Milvus at {backend.uri}: cannot connect ({exc.message})") from exc
                    log.warning("Milvus at %s: connect attempt %d of %d failed (%s); retrying", backend.uri,
                                attempt, CONNECT_ATTEMPTS, exc.message)
                    time.sleep(0.5 * attempt)
        return _clients[backend.uri, token]


def metric_of(signal: str) -> str:
    return "L2" if signal == "face" else "IP"    # fingerprints are unit vectors; pdq is ±1


def to_engine(signal: str, vectors: np.ndarray) -> np.ndarray:
    """Stored form → what Milvus holds: pdq's 32 packed bytes become 256 ±1 floats."""
    if signal != "pdq":
        return np.ascontiguousarray(vectors, np.float32)
    bits = np.unpackbits(np.asarray(vectors, np.uint8), axis=1, bitorder="little")
    return bits.astype(np.float32) * 2 - 1


def from_engine(signal: str, vectors: np.ndarray) -> np.ndarray:
    if signal != "pdq":
        return np.asarray(vectors, np.float32)
    return pack_bits((np.asarray(vectors) > 0).astype(np.uint8))


def index_spec(signal: str, n: int, dim: int, cfg: IndexConfig) -> dict:
    """Index type, metric, build and search parameters for one collection (recorded in the manifest)."""
    chosen = "FLAT" if signal == "pdq" else cfg.milvus_index or ("FLAT" if n <= cfg.exact_max_items else "HNSW")
    if chosen not in INDEX_TYPES:
        raise InvalidInput("milvus_index", f"{chosen!r}: expected one of {', '.join(INDEX_TYPES)}")
    build, search = {}, {}
    if chosen.startswith("HNSW"):
        build, search = {"M": cfg.hnsw_m, "efConstruction": cfg.hnsw_ef_construction}, {"ef": cfg.hnsw_ef}
    elif chosen.startswith("IVF"):
        nlist = fx._ivf_lists(n)
        build, search = {"nlist": nlist}, {"nprobe": min(cfg.nprobe, nlist)}
        if chosen == "IVF_PQ":
            build |= {"m": max(dim // 4, 1), "nbits": 8}
    return {"index_type": chosen, "metric_type": metric_of(signal), "build_params": build, "search_params": search}


class MilvusCollection(VectorCollection):
    def __init__(self, signal: str, info: SignalInfo, cfg: IndexConfig, backend: BackendURI):
        self.signal, self.info, self.cfg, self.backend, self.dim = signal, info, cfg, backend, info.dim
        self.width, self.dtype = (PDQ_BYTES, np.dtype(np.uint8)) if signal == "pdq" else (info.dim, np.dtype(np.float32))
        spec = info.backend
        self.name, self.spec = spec["collection"], spec
        self.client = client(backend)
        if not self.client.has_collection(self.name):
            raise CorruptData(f"Milvus collection {self.name} at {backend.uri}: missing (dropped, or another server)")
        found = self.count()
        if found != info.count:
            raise CorruptData(f"Milvus collection {self.name} at {backend.uri}: holds {found} rows, "
                              f"manifest says {info.count}")
        self.search_params = self._search_params()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()

    def _remember(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        with self._cache_lock:
            for r, v in zip(rows.tolist(), vectors):
                self._cache[r] = v
                self._cache.move_to_end(r)
            while len(self._cache) > CACHE_ROWS:
                self._cache.popitem(last=False)

    def _forget(self, rows) -> None:
        with self._cache_lock:
            for r in rows:
                self._cache.pop(int(r), None)

    def _search_params(self) -> dict:
        params = dict(self.spec["search_params"])
        if "ef" in params:
            params["ef"] = self.cfg.hnsw_ef
        if "nprobe" in params:
            params["nprobe"] = min(self.cfg.nprobe, self.spec["build_params"]["nlist"])
        return {"metric_type": self.spec["metric_type"], "params": params}

    def count(self) -> int:
        res = self.client.query(self.name, filter="", output_fields=["count(*)"], consistency_level=CONSISTENCY)
        return int(res[0]["count(*)"])

    def fetch(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64).reshape(-1)
        with self._cache_lock:
            got = {int(r): self._cache[int(r)] for r in rows if int(r) in self._cache}
        wanted = sorted({int(r) for r in rows} - set(got))
        for start in range(0, len(wanted), 1000):
            for hit in self.client.get(self.name, ids=wanted[start:start + 1000], output_fields=["vector"]):
                got[int(hit["row"])] = from_engine(self.signal, np.asarray([hit["vector"]], np.float32))[0]
        missing = [int(r) for r in rows if int(r) not in got]
        if missing:
            raise InvalidInput("rows", f"Milvus collection {self.name} has no rows {missing[:5]}")
        if rows.size == 0:
            return np.zeros((0, self.width), self.dtype)
        return np.stack([got[int(r)] for r in rows]).astype(self.dtype, copy=False)

    def search(self, queries: np.ndarray, k: int):
        b = len(queries)
        rows, scores, vecs = empty_hits(self.signal, b, k, self.width, self.dtype)
        if k == 0 or b == 0:
            return rows, scores, vecs
        limit = k * self.cfg.rerank_factor if self.spec["index_type"] in LOSSY else k
        params = self.search_params
        if "ef" in params["params"]:      # Milvus requires ef ≥ limit
            params = {**params, "params": {**params["params"], "ef": max(params["params"]["ef"], limit)}}
        found = self.client.search(self.name, data=to_engine(self.signal, queries).tolist(), limit=limit,
                                   search_params=params, output_fields=["vector"])
        for i, hits in enumerate(found):
            if not hits:
                continue
            cand = np.array([int(h["row"]) for h in hits], np.int64)
            stored = from_engine(self.signal, np.array([h["entity"]["vector"] for h in hits], np.float32))
            self._remember(cand, stored)
            r, s, v = rank_candidates(self.signal, queries[i], cand, stored, k)
            rows[i, :len(r)], scores[i, :len(r)], vecs[i, :len(r)] = r, s, v
        return rows, scores, vecs

    def add(self, rows, vectors, item_ids, meta, protected: bool = False) -> None:
        self._forget(np.asarray(rows).reshape(-1))
        insert(self.client, self.name, self.signal, np.asarray(rows, np.int64), vectors, item_ids, meta, protected)

    def remove(self, rows) -> int:
        ids = [int(r) for r in np.asarray(rows).reshape(-1)]
        self._forget(ids)
        present = len(self.client.get(self.name, ids=ids, output_fields=["row"])) if ids else 0
        if ids:
            self.client.delete(self.name, ids=ids)
            self._forget(ids)   # again: a search in between may have cached a row being deleted
        return present

    def describe(self) -> dict:
        return {"kind": "milvus", "uri": self.backend.uri, "collection": self.name, "count": self.count(),
                "index_type": self.spec["index_type"], "metric_type": self.spec["metric_type"],
                "build_params": self.spec["build_params"], "search": self.search_params["params"],
                "consistency_level": CONSISTENCY}


def insert(cl, name: str, signal: str, rows: np.ndarray, vectors: np.ndarray, item_ids: list[str],
           meta: list[dict], protected: bool = False) -> None:
    if not (len(rows) == len(vectors) == len(item_ids) == len(meta)):
        raise InvalidInput("rows", f"{len(rows)} rows, {len(vectors)} vectors, {len(item_ids)} ids, {len(meta)} meta")
    engine = to_engine(signal, vectors)
    cl.insert(name, [{"row": int(r), "vector": v, "item_id": i, "protected": protected, "meta": m}
                     for r, v, i, m in zip(rows, engine, item_ids, meta)])


def create_collection(cl, name: str, signal: str, dim: int, spec: dict) -> None:
    from pymilvus import DataType, MilvusClient
    if not NAME.match(name):
        raise InvalidInput("milvus_prefix", f"{name!r}: a collection name takes letters, digits and _")
    if cl.has_collection(name):
        raise InvalidInput("milvus_prefix", f"Milvus collection {name} already exists; choose another prefix")
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("row", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=PDQ_BITS if signal == "pdq" else dim)
    schema.add_field("item_id", DataType.VARCHAR, max_length=1024)
    schema.add_field("protected", DataType.BOOL)
    schema.add_field("meta", DataType.JSON)
    params = cl.prepare_index_params()
    # the build parameters twice: as separate keys (what pymilvus sends) and as the JSON "params" key,
    # the wire format Milvus also accepts and the only one milvus-lite 3.2.2 reads (else it builds
    # with its defaults, HNSW M=16, whatever the manifest records)
    build = spec["build_params"]
    params.add_index(field_name="vector", index_type=spec["index_type"], metric_type=spec["metric_type"],
                     params={**build, "params": json.dumps(build)} if build else build)
    cl.create_collection(name, schema=schema, index_params=params, consistency_level=CONSISTENCY)


def write_milvus_signal(backend: BackendURI, prefix: str, signal: str, array: np.ndarray, cfg: IndexConfig,
                        labels: Callable[[int, int], tuple[list[str], list[dict]]], progress: bool) -> SignalInfo:
    """Stream rows `array` [N, W] into a new collection {prefix}_{signal} in batches, with progress.
    labels(start, stop) gives the item ids and metadata of rows start..stop-1."""
    from pymilvus.exceptions import MilvusException
    from tqdm import tqdm

    n = len(array)
    dim = PDQ_BITS if signal == "pdq" else int(array.shape[1])
    spec = index_spec(signal, n, dim, cfg)
    name = f"{prefix}_{signal}"
    cl = client(backend)
    try:
        create_collection(cl, name, signal, dim, spec)
        with tqdm(total=n, unit="row", desc=f"milvus {signal}", disable=not progress) as bar:
            for start in range(0, n, cfg.milvus_batch_size):
                stop = min(n, start + cfg.milvus_batch_size)
                ids, meta = labels(start, stop)
                insert(cl, name, signal, np.arange(start, stop), np.asarray(array[start:stop]), ids, meta)
                bar.update(stop - start)
        cl.flush(name)
    except MilvusException as exc:
        raise InvalidInput("backend", f"Milvus at {backend.uri} refused {name} ({spec['index_type']}): "
                                      f"{exc.message}") from exc
    info = SignalInfo(dim, n, f"milvus:{spec['index_type']}", "", "",
                      backend={"kind": "milvus", "uri": backend.uri, "collection": name} | spec)
    MilvusCollection(signal, info, cfg, backend)   # reopen: the collection must hold exactly n rows
    return info


def new_prefix(cfg: IndexConfig) -> str:
    return cfg.milvus_prefix or f"mg_{uuid.uuid4().hex[:12]}"
