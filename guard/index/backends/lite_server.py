"""A milvus-lite server process on a loopback port: the shared Milvus endpoint of tests, the
single-host demo and the benchmark (several processes can use it at once, unlike a .db file,
which one process holds)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from guard.errors import MissingResource


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
