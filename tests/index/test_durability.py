"""kill -9 during a protect loop: every acknowledged protection is there after reopen."""
import os
import signal
import subprocess
import sys
import textwrap
import time

from memguard.index.api import FingerprintIndex

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from memguard.index.api import FingerprintIndex

    index = FingerprintIndex.open(sys.argv[1], verify_checksums=False)
    rng = np.random.default_rng(int(sys.argv[2]))
    i = 0
    while True:
        vec = rng.standard_normal(256).astype(np.float32)
        code = rng.integers(0, 256, 32, dtype=np.uint8)
        receipt = index.protect_vectors("durability test", item_id=f"kill-{i}", latent=vec, pdq=code)
        if i % 3 == 2:
            index.unprotect(f"kill-{i - 1}", "durability test")
            print("UNPROTECTED", f"kill-{i - 1}", flush=True)
        print("ACK", receipt.pid, receipt.subject, flush=True)   # printed only after protect returned
        i += 1
""")


def test_acknowledged_protections_survive_sigkill(index_dir, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # the installed memguard
    proc = subprocess.Popen([sys.executable, str(script), str(index_dir), str(time.time_ns() % 1000)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    acked, unprotected = {}, set()
    deadline = time.monotonic() + 120
    try:
        while len(acked) < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            kind, *rest = line.split()
            if kind == "ACK":
                acked[rest[0]] = rest[1]
            elif kind == "UNPROTECTED":
                unprotected.add(rest[0])
    finally:
        proc.send_signal(signal.SIGKILL)   # mid-loop: possibly inside a transaction
        proc.wait(timeout=30)
    assert len(acked) >= 40, proc.stderr.read()[-2000:]
    with FingerprintIndex.open(index_dir) as index:
        assert index.verify()["ok"]
        _, active = index.registry.active()
        active_pids = {p.pid for p in active}
        for pid, subject in acked.items():
            assert (pid in active_pids) == (subject not in unprotected), (pid, subject)
        assert all(set(p.vectors) == {"latent", "pdq"} for p in active)
        # nothing beyond what was acknowledged, except possibly the one protect in flight at the kill
        assert len(active_pids - set(acked)) <= 1
        assert index.snapshot().count("latent") == len(active_pids)
