"""A milvus-lite server process on a loopback port: the shared Milvus endpoint of tests, the
single-host demo and the benchmark (several processes can use it at once, unlike a .db file,
which one process holds).

What milvus-lite 3.2.2 is (checked against its source and by trying each type): a Python engine
over Parquet segments of at most 100,000 rows, each with its own faiss index, built in the
background after a flush (until then, and for the memtable, a segment is searched brute force).
Vector index types built: FLAT/BRUTE_FORCE, HNSW, HNSW_SQ, IVF_FLAT, IVF_SQ8 (AUTOINDEX = HNSW).
IVF_PQ and DISKANN are accepted at create time, then fail in the background build ("reserved for a
future phase" / "unknown index_type"), so those collections are searched brute force. Every search
call also walks every row of every segment in Python (a cross-segment dedup map and a tombstone
mask), so a call costs O(rows) whatever the index type. Build parameters: milvus-lite reads them
only from a JSON "params" key, while pymilvus 3.0.2 sends M / efConstruction / nlist as separate
keys, so they would be dropped and its defaults apply (HNSW M=16, efConstruction=200): the
backend sends them also as that JSON key (milvus_store.create_collection);
`wait_for_lite_indexes` and the index_scale benchmark report what the engine recorded."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from memguard.errors import MissingResource


@dataclass
class LiteServer:
    proc: subprocess.Popen
    uri: str
    data_dir: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the process that started it dies (no orphan servers
    after a killed test run)."""
    import ctypes
    import signal
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass   # not glibc Linux: stop() is still called on a clean exit


def start_lite_server(data_dir: Path, port: int | None = None, timeout_s: float = 120.0) -> LiteServer:
    """Start `milvus-lite server` on 127.0.0.1 and wait until it accepts connections."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cli = Path(sys.executable).with_name("milvus-lite")
    log = open(data_dir / "server.log", "wb")
    proc = subprocess.Popen([str(cli), "server", "--data-dir", str(data_dir / "db"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return LiteServer(proc, f"http://127.0.0.1:{port}", data_dir)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                tail = (data_dir / "server.log").read_text(errors="replace")[-2000:]
                raise MissingResource(f"milvus-lite server did not start on port {port}: {tail}")
            time.sleep(0.2)


def lite_segments(lite_dir: Path) -> tuple[int, int]:
    """(sealed data files, those with a vector index file) over the collections of a milvus-lite data dir."""
    data = {p.name.removesuffix(".parquet") for p in lite_dir.glob("collections/*/partitions/*/data/data_*.parquet")}
    indexed = {p.name.split(".")[0] for p in lite_dir.glob("collections/*/partitions/*/indexes/data_*.idx")}
    return len(data), len(data & indexed)


def wait_for_lite_indexes(lite_dir: Path, timeout_s: float = 3600.0) -> float:
    """milvus-lite builds segment indexes (and compacts) in the background after a flush, and searches
    brute-force a segment until its index exists: wait until every sealed segment has its index file
    (the same three times over 3 s), so the searches measure the index. Returns the seconds waited."""
    t0, stable, last = time.perf_counter(), 0, None
    while time.perf_counter() - t0 < timeout_s:
        state = lite_segments(lite_dir)
        stable = stable + 1 if state == last and state[0] == state[1] else 0
        if stable >= 3:
            break
        last = state
        time.sleep(1.0)
    print(f"milvus-lite: {last[1]}/{last[0]} sealed segments indexed after {time.perf_counter() - t0:.1f} s "
          "of background build", flush=True)
    return time.perf_counter() - t0
