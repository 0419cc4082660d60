"""Load generator for `memguard serve`, reporting like ghz.

    # closed loop: 8 clients back to back for 60 s after 10 s of warm-up
    python -m memguard.benchmarks.load --server 127.0.0.1:50051 --concurrency 8 --duration 60 --warmup 10
    # open loop: Poisson arrivals at 2 requests/s (latency counted from the scheduled send time)
    python -m memguard.benchmarks.load --server 127.0.0.1:50051 --rate 2 --duration 60
    # spawn servers with batch size 1 and 8 in turn, same load, one comparison table
    python -m memguard.benchmarks.load --compare-batching 1,8 --spawn-args "--tiny-random" --concurrency 8
    # soak (issue 14): measure capacity, then 2x capacity for 2 minutes; admitted p99 within 1.5x,
    # the excess refused with RESOURCE_EXHAUSTED, no admitted request lost
    python -m memguard.benchmarks.load --soak --duration 120 --spawn-args "--engine memguard.engine:PipelineEngine --tiny-random --no-index --max-queue 8"
    # several replicas behind gRPC's own round_robin policy (one channel over all addresses)
    python -m memguard.benchmarks.load --server 127.0.0.1:50051,127.0.0.1:50052 --concurrency 8
    # spawn 1, then 2 replicas sharing one index and one throwaway PostgreSQL registry; same load, one table
    python -m memguard.benchmarks.load --compare-replicas 1,2 --pg --spawn-args "--tiny-random" --concurrency 8

Reports count, requests/s, latency histogram and p50/p90/p95/p99, status codes, decisions per
prompt set, and goodput (OK replies within the SLO per second); writes JSON and markdown.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from memguard.proto.memguard.v1 import memguard_pb2 as pb, memguard_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Sample:
    start: float            # seconds since the run began (scheduled time in open loop)
    latency: float
    code: str
    prompt_set: str
    decisions: list[str] = field(default_factory=list)


@dataclass
class LoadConfig:
    target: str
    concurrency: int = 4            # closed loop: clients sending back to back
    rate: float | None = None       # open loop: Poisson arrivals per second (overrides concurrency)
    duration: float = 30.0          # measured seconds
    warmup: float = 5.0             # seconds of traffic before measuring
    mix: dict[str, float] = field(default_factory=lambda: {"novel": 1.0})
    steps: int = 20
    size: int = 64
    num_images: int = 1
    timeout: float = 120.0
    slo_s: float = 10.0
    api_key: str | None = None
    max_outstanding: int = 1000     # open loop: bound on in-flight requests
    seed: int = 0


# ----------------------------------------------------------------------------- traffic
class PromptMix:
    def __init__(self, weights: dict[str, float], prompt_file: Path | None, seed: int):
        from memguard.server.demo import load_prompt_sets

        self.sets = {"file": [l.strip() for l in prompt_file.read_text().splitlines() if l.strip()]} \
            if prompt_file else load_prompt_sets()
        weights = {"file": 1.0} if prompt_file else weights
        unknown = set(weights) - set(self.sets)
        if unknown:
            raise SystemExit(f"--mix: unknown prompt set(s) {sorted(unknown)}; known: {sorted(self.sets)}")
        self.names, self.weights = list(weights), list(weights.values())
        self.rng = random.Random(seed)

    def draw(self) -> tuple[str, str]:
        name = self.rng.choices(self.names, self.weights)[0]
        return name, self.rng.choice(self.sets[name])


async def one_call(stub, cfg: LoadConfig, mix: PromptMix, scheduled: float, t0: float, out: list[Sample]) -> None:
    name, prompt = mix.draw()
    request = pb.GenerateRequest(prompt=prompt, steps=cfg.steps, height=cfg.size, width=cfg.size,
                                 num_images=cfg.num_images, seed=mix.rng.randrange(2**31))
    metadata = [("authorization", f"Bearer {cfg.api_key}")] if cfg.api_key else None
    try:
        response = await stub.Generate(request, timeout=cfg.timeout, metadata=metadata)
        code, decisions = "OK", [pb.Decision.Name(im.decision).removeprefix("DECISION_") for im in response.images]
    except grpc.aio.AioRpcError as exc:
        code, decisions = exc.code().name, []
    out.append(Sample(scheduled - t0, time.perf_counter() - scheduled, code, name, decisions))


async def closed_loop(stub, cfg: LoadConfig, mix: PromptMix, t0: float, end: float, out: list[Sample]) -> None:
    async def client() -> None:
        while time.perf_counter() < end:
            await one_call(stub, cfg, mix, time.perf_counter(), t0, out)
    await asyncio.gather(*(client() for _ in range(cfg.concurrency)))


async def open_loop(stub, cfg: LoadConfig, mix: PromptMix, t0: float, end: float, out: list[Sample]) -> None:
    rng, tasks, next_at = random.Random(cfg.seed + 1), set(), time.perf_counter()
    while next_at < end:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        if len(tasks) < cfg.max_outstanding:
            task = asyncio.create_task(one_call(stub, cfg, mix, next_at, t0, out))
        else:   # over the bound: record the drop instead of queueing without limit in the client
            out.append(Sample(next_at - t0, 0.0, "CLIENT_DROPPED", "-"))
            task = None
        if task is not None:
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        next_at += rng.expovariate(cfg.rate)
    if tasks:
        await asyncio.gather(*tasks)


def channel_target(servers: str) -> tuple[str, list[tuple[str, object]]]:
    """"HOST:PORT" → itself; "H1:P1,H2:P2,…" → one ipv4: target over all the addresses with gRPC's
    round_robin load-balancing policy (a subchannel per address; a dead one is skipped)."""
    addresses = [a.strip() for a in servers.split(",") if a.strip()]
    if len(addresses) <= 1:
        return servers, []
    resolved = []
    for a in addresses:
        host, _, port = a.rpartition(":")
        host = "127.0.0.1" if host in ("localhost", "") else host
        try:
            socket.inet_aton(host)
        except OSError:
            raise SystemExit(f"--server {a}: several addresses must be IPv4 literals (ipv4: target)")
        resolved.append(f"{host}:{port}")
    return "ipv4:" + ",".join(resolved), [("grpc.lb_policy_name", "round_robin")]


async def run_load(cfg: LoadConfig, prompt_file: Path | None = None) -> dict:
    mix = PromptMix(cfg.mix, prompt_file, cfg.seed)
    target, balancing = channel_target(cfg.target)
    options = [("grpc.max_receive_message_length", 64 << 20), *balancing]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = memguard_pb2_grpc.MemGuardStub(channel)
        samples: list[Sample] = []
        t0 = time.perf_counter()
        end = t0 + cfg.warmup + cfg.duration
        runner = open_loop if cfg.rate else closed_loop
        await runner(stub, cfg, mix, t0, end, samples)
        wall = time.perf_counter() - t0
    measured = [s for s in samples if s.start >= cfg.warmup]
    return summarize(cfg, measured, wall - cfg.warmup)


# ----------------------------------------------------------------------------- report
def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def histogram(latencies: list[float], bins: int = 10) -> list[dict]:
    if not latencies:
        return []
    lo, hi = min(latencies), max(latencies)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in latencies:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return [{"le_s": lo + width * (i + 1), "count": c} for i, c in enumerate(counts)]


def summarize(cfg: LoadConfig, samples: list[Sample], window_s: float) -> dict:
    ok = sorted(s.latency for s in samples if s.code == "OK")
    codes: dict[str, int] = {}
    decisions: dict[str, dict[str, int]] = {}
    for s in samples:
        codes[s.code] = codes.get(s.code, 0) + 1
        for d in s.decisions:
            per_set = decisions.setdefault(s.prompt_set, {})
            per_set[d] = per_set.get(d, 0) + 1
    good = sum(1 for v in ok if v <= cfg.slo_s)
    window_s = max(window_s, 1e-9)
    return {
        "config": asdict(cfg) | {"api_key": bool(cfg.api_key)},
        "count": len(samples), "window_s": round(window_s, 3),
        "rps": len(samples) / window_s,
        "ok_rps": len(ok) / window_s,
        "images_per_s": sum(len(s.decisions) for s in samples) / window_s,
        "goodput_rps": good / window_s, "slo_s": cfg.slo_s,
        "latency_s": {"fastest": ok[0] if ok else None, "slowest": ok[-1] if ok else None,
                      "mean": statistics.fmean(ok) if ok else None,
                      **{f"p{int(q * 100)}": percentile(ok, q) for q in (0.5, 0.9, 0.95, 0.99)}},
        "histogram": histogram(ok),
        "status_codes": codes,
        "decisions": decisions,
    }


def format_report(r: dict, title: str = "MemGuard load") -> str:
    cfg, lat = r["config"], r["latency_s"]
    mode = f"open loop, {cfg['rate']} req/s" if cfg["rate"] else f"closed loop, concurrency {cfg['concurrency']}"
    fmt = lambda v: "-" if v is None or v != v else f"{v * 1000:.1f} ms"
    lines = [f"## {title}", "", f"{mode}; {cfg['duration']} s measured after {cfg['warmup']} s warm-up; "
             f"{cfg['steps']} steps, {cfg['size']}px, {cfg['num_images']} image(s)/request", "",
             "| metric | value |", "| --- | --- |",
             f"| count | {r['count']} |", f"| requests/s | {r['rps']:.2f} |", f"| images/s | {r['images_per_s']:.2f} |",
             f"| goodput (OK within {r['slo_s']} s)/s | {r['goodput_rps']:.2f} |"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in lat.items()]
    lines += ["", "Latency histogram (OK replies):", "```"]
    peak = max((b["count"] for b in r["histogram"]), default=0) or 1
    lines += [f"{b['le_s'] * 1000:10.1f} ms [{b['count']:5d}] |{'∎' * round(40 * b['count'] / peak)}"
              for b in r["histogram"]]
    per_set = [f"{name}: " + ", ".join(f"{d} {n}" for d, n in sorted(counts.items()))
               for name, counts in sorted(r["decisions"].items())]
    lines += ["```", "", "Status codes: " + ", ".join(f"{k} {v}" for k, v in sorted(r["status_codes"].items())),
              "", "Decisions per prompt set: " + "; ".join(per_set)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- soak
SOAK_P99_RATIO = 1.5


def soak_verdict(capacity: dict, overload: dict) -> dict:
    """Capacity run vs 2x-capacity run: the acceptance figures of issue 14."""
    codes = overload["status_codes"]
    refused = codes.get("RESOURCE_EXHAUSTED", 0)
    admitted = overload["count"] - refused - codes.get("CLIENT_DROPPED", 0)
    lost = admitted - codes.get("OK", 0)      # admitted (acknowledged) but not answered OK
    p99_cap, p99_over = capacity["latency_s"]["p99"], overload["latency_s"]["p99"]
    ratio = p99_over / p99_cap if p99_cap else float("nan")
    return {"capacity_rps": capacity["ok_rps"], "offered_rps": overload["config"]["rate"],
            "p99_capacity_s": p99_cap, "p99_overload_s": p99_over, "p99_ratio": ratio,
            "sent": overload["count"], "refused_resource_exhausted": refused, "admitted": admitted,
            "admitted_ok": codes.get("OK", 0), "lost": lost, "status_codes": codes,
            "pass": bool(refused > 0 and lost == 0 and ratio <= SOAK_P99_RATIO)}


async def soak(cfg: LoadConfig, concurrency: int, capacity_s: float, prompt_file: Path | None = None) -> dict:
    """Closed loop at `concurrency` (the server's batch + queue: full, nothing refused) gives the
    capacity and its p99; then an open loop at twice that rate for cfg.duration."""
    cap_cfg = LoadConfig(**{**asdict(cfg), "rate": None, "concurrency": concurrency, "duration": capacity_s})
    capacity = await run_load(cap_cfg, prompt_file)
    over_cfg = LoadConfig(**{**asdict(cfg), "rate": 2 * capacity["ok_rps"], "warmup": 0.0})
    overload = await run_load(over_cfg, prompt_file)
    return {"capacity": capacity, "overload": overload, "verdict": soak_verdict(capacity, overload)}


def format_soak(result: dict) -> str:
    v = result["verdict"]
    return (f"## Soak: 2x capacity\n\ncapacity {v['capacity_rps']:.2f} req/s (p99 {v['p99_capacity_s'] * 1000:.0f} ms); "
            f"offered {v['offered_rps']:.2f} req/s for {result['overload']['config']['duration']:.0f} s\n"
            f"sent {v['sent']}, refused RESOURCE_EXHAUSTED {v['refused_resource_exhausted']}, admitted {v['admitted']}, "
            f"admitted OK {v['admitted_ok']}, lost {v['lost']}\n"
            f"admitted p99 {v['p99_overload_s'] * 1000:.0f} ms = {v['p99_ratio']:.2f}x the capacity p99 "
            f"(bound {SOAK_P99_RATIO}x); status codes {v['status_codes']}\n"
            f"verdict: {'PASS' if v['pass'] else 'FAIL'}\n")


# ----------------------------------------------------------------------------- spawned servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpawnedServer:
    """`memguard serve` in a subprocess on a free port; SIGTERM on exit."""

    def __init__(self, args: list[str], log: Path | None = None):
        self.port, self.log = free_port(), log
        cmd = [sys.executable, "-m", "memguard.cli", "serve", "--port", str(self.port), "--metrics-port", "-1", *args]
        # a log file, not a pipe nobody reads while the load runs (a full pipe would stall the server);
        # PYTHONSAFEPATH: cwd is the repository root, whose kernels/ would hide the PyPI `kernels`
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, text=True,
                                     stderr=log.open("w") if log else subprocess.PIPE,
                                     env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONSAFEPATH="1"))

    def __enter__(self) -> str:
        from memguard.server.client import wait_until_serving

        target = f"127.0.0.1:{self.port}"
        try:
            wait_until_serving(target, timeout=600, poll=0.5)
        except Exception:
            self.proc.kill()
            tail = self.log.read_text()[-2000:] if self.log else self.proc.communicate()[1][-2000:]
            raise SystemExit(f"spawned server did not come up:\n{tail}")
        return target

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class SpawnedReplicas:
    """N `memguard serve` replicas with the same arguments (so one index, one registry), started
    together; the context gives "127.0.0.1:P1,127.0.0.1:P2,…" for channel_target. With pg=True a
    throwaway PostgreSQL (memguard.index.pg_local) is started and every replica gets --registry on it."""

    def __init__(self, n: int, args: list[str], log_dir: Path, pg: bool = False):
        self.n, self.args, self.log_dir, self.pg, self.postgres, self.servers = n, list(args), log_dir, pg, None, []

    def __enter__(self) -> str:
        import uuid

        try:
            if self.pg:
                from memguard.index.pg_local import LocalPostgres
                self.postgres = LocalPostgres.start()
                self.args += ["--registry", self.postgres.create_database(f"load_{uuid.uuid4().hex[:8]}")]
            self.servers = [SpawnedServer(self.args, self.log_dir / f"replica-{self.n}-{i}.log") for i in range(self.n)]
            return ",".join(server.__enter__() for server in self.servers)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        for server in self.servers:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in self.servers:
            server.__exit__()
        if self.postgres:
            self.postgres.stop()


def replicas_table(runs: list[tuple[int, dict]]) -> str:
    """One row per run (counts may repeat, interleaved: 1,2,1,2), then the ratio of the mean
    throughputs of each count to the smallest count's."""
    lines = ["| run | replicas | requests/s | images/s | p50 | p99 | goodput/s | status codes | load avg (1 min) before → after |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, (n, r) in enumerate(runs, 1):
        lat, la = r["latency_s"], r.get("loadavg", {})
        codes = ", ".join(f"{k} {v}" for k, v in sorted(r["status_codes"].items()))
        lines.append(f"| {i} | {n} | {r['ok_rps']:.2f} | {r['images_per_s']:.2f} | {lat['p50'] * 1000:.0f} ms | "
                     f"{lat['p99'] * 1000:.0f} ms | {r['goodput_rps']:.2f} | {codes} | "
                     f"{la.get('before', float('nan')):.2f} → {la.get('after', float('nan')):.2f} |")
    mean = {n: statistics.fmean(r["ok_rps"] for m, r in runs if m == n) for n in sorted({n for n, _ in runs})}
    base = mean[min(mean)]
    lines += ["", "| replicas | mean requests/s | ratio |", "| --- | --- | --- |"]
    lines += [f"| {n} | {v:.2f} | {v / base if base else float('nan'):.2f}× |" for n, v in mean.items()]
    return "\n".join(lines) + "\n"


def comparison_table(results: dict[int, dict]) -> str:
    base = results[min(results)]
    lines = ["| max batch | requests/s | images/s | p50 | p99 | goodput/s | speed-up (rps) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for batch, r in sorted(results.items()):
        lat = r["latency_s"]
        gain = r["ok_rps"] / base["ok_rps"] if base["ok_rps"] else float("nan")
        lines.append(f"| {batch} | {r['ok_rps']:.2f} | {r['images_per_s']:.2f} | {lat['p50'] * 1000:.0f} ms | "
                     f"{lat['p99'] * 1000:.0f} ms | {r['goodput_rps']:.2f} | {gain:.2f}× |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI
def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        mix[name.strip()] = float(weight or 1.0)
    return mix


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m memguard.benchmarks.load", description=__doc__.splitlines()[0])
    p.add_argument("--server", help="HOST:PORT of a running server, or H1:P1,H2:P2,… of several replicas "
                                    "(one channel, gRPC round_robin); or use --spawn-args / --compare-batching")
    p.add_argument("--api-key", default=os.environ.get("MEMGUARD_API_KEY"))
    p.add_argument("--concurrency", type=int, default=4, help="closed loop: concurrent clients")
    p.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    p.add_argument("--mix", default="novel=1", help="prompt sets and weights, e.g. memorized=0.2,novel=0.8")
    p.add_argument("--prompt-file", type=Path, help="one prompt a line (instead of --mix)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request deadline, seconds")
    p.add_argument("--slo", type=float, default=10.0, help="latency SLO for goodput, seconds")
    p.add_argument("--spawn-args", help="start `memguard serve` with these arguments for the run")
    p.add_argument("--compare-batching", help="comma list of --max-batch-images values to run in turn")
    p.add_argument("--replicas", type=int, default=1, help="spawn this many replicas with --spawn-args (round_robin)")
    p.add_argument("--compare-replicas", help="comma list of replica counts to spawn in turn, e.g. 1,2")
    p.add_argument("--pg", action="store_true",
                   help="with spawned replicas: a throwaway PostgreSQL registry shared by them (--registry)")
    p.add_argument("--out", type=Path, default=Path("runs/load"), help="directory for JSON and markdown")
    p.add_argument("--soak", action="store_true", help="capacity run, then --duration s at 2x capacity (issue 14)")
    p.add_argument("--capacity-duration", type=float, default=30.0, help="--soak: seconds of the capacity run")
    p.add_argument("--capacity-concurrency", type=int, default=16,
                   help="--soak: closed-loop clients of the capacity run (the server's max batch + max queue)")
    args = p.parse_args(argv)
    cfg = LoadConfig(target=args.server or "", concurrency=args.concurrency, rate=args.rate, duration=args.duration,
                     warmup=args.warmup, mix=parse_mix(args.mix), steps=args.steps, size=args.size,
                     num_images=args.num_images, timeout=args.timeout, slo_s=args.slo, api_key=args.api_key)
    args.out.mkdir(parents=True, exist_ok=True)
    spawn = (args.spawn_args or "").split()
    if args.compare_batching:
        results = {}
        for batch in (int(b) for b in args.compare_batching.split(",")):
            with SpawnedServer(spawn + ["--max-batch-images", str(batch)]) as target:
                run_cfg = LoadConfig(**{**asdict(cfg), "target": target})
                results[batch] = asyncio.run(run_load(run_cfg, args.prompt_file))
            print(format_report(results[batch], f"max batch {batch}"))
        table = comparison_table(results)
        (args.out / "batching.json").write_text(json.dumps(results, indent=1))
        (args.out / "batching.md").write_text("\n".join(format_report(r, f"max batch {b}") for b, r in results.items())
                                              + "\n## Comparison\n\n" + table)
        print(table)
        return 0
    if args.compare_replicas:
        runs = []
        for n in (int(x) for x in args.compare_replicas.split(",")):
            with SpawnedReplicas(n, spawn, args.out, pg=args.pg) as target:
                before = os.getloadavg()[0]   # other work on the box bounds what replicas can gain
                report = asyncio.run(run_load(LoadConfig(**{**asdict(cfg), "target": target}), args.prompt_file))
                report["loadavg"] = {"before": before, "after": os.getloadavg()[0]}
            runs.append((n, report))
            print(format_report(report, f"{n} replica(s)"), flush=True)
        table = replicas_table(runs)
        (args.out / "replicas.json").write_text(json.dumps({"spawn_args": spawn, "cpus": os.cpu_count(),
                                                            "runs": [{"replicas": n, **r} for n, r in runs]}, indent=1))
        (args.out / "replicas.md").write_text("\n".join(format_report(r, f"{n} replica(s)") for n, r in runs)
                                              + f"\n## Comparison (spawn args: {' '.join(spawn)}; {os.cpu_count()} CPUs)\n\n"
                                              + table)
        print(table)
        return 0
    if args.soak:
        if spawn:
            with SpawnedServer(spawn) as target:
                result = asyncio.run(soak(LoadConfig(**{**asdict(cfg), "target": target}), args.capacity_concurrency,
                                          args.capacity_duration, args.prompt_file))
        elif args.server:
            result = asyncio.run(soak(cfg, args.capacity_concurrency, args.capacity_duration, args.prompt_file))
        else:
            p.error("give --server or --spawn-args")
        (args.out / "soak.json").write_text(json.dumps(result, indent=1))
        text = format_soak(result)
        (args.out / "soak.md").write_text(text)
        print(text)
        return 0 if result["verdict"]["pass"] else 1
    if spawn and (args.replicas > 1 or args.pg):
        with SpawnedReplicas(args.replicas, spawn, args.out, pg=args.pg) as target:
            report = asyncio.run(run_load(LoadConfig(**{**asdict(cfg), "target": target}), args.prompt_file))
    elif spawn:
        with SpawnedServer(spawn) as target:
            report = asyncio.run(run_load(LoadConfig(**{**asdict(cfg), "target": target}), args.prompt_file))
    elif args.server:
        report = asyncio.run(run_load(cfg, args.prompt_file))
    else:
        p.error("give --server, --spawn-args or --compare-batching")
    text = format_report(report)
    (args.out / "load.json").write_text(json.dumps(report, indent=1))
    (args.out / "load.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
