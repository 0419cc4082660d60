"""Prometheus export: the only module that imports prometheus_client.

Everything else hands over plain data (RPC outcomes, ImageResults, the engine's EngineStats) and
this module turns it into series. Names sit under `memguard_`, in base units (seconds, images);
counters end in `_total`; every histogram has explicit buckets; labels take bounded values only
(RPC and status-code names, decisions, reasons): never prompts or request ids. Each Metrics owns its
registry, so several servers can share a process.

No per-sample guard value is exported (issue 29, finding 3): no signal-score histogram and no
first-flagged-step histogram, since `_sum` diffed around one request gives back that request's
values. What remains (counts of decisions, steps, latencies) is still audit scope: on an idle server
a diff around one request shows its decision and its steps computed, so /metrics listens on
127.0.0.1 unless configured otherwise and is never published without authentication.
"""
from __future__ import annotations

import logging
from importlib import metadata

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics,
                               start_http_server)

from memguard.engine import EngineStats, IndexStats
from memguard.types import Decision, ImageResult, Reason

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
OVERHEAD_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1)
SEARCH_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

RPCS = ("Generate", "GenerateStream", "Screen", "Protect", "Unprotect", "GetIndexStats")


def _version() -> str:
    try:
        return metadata.version("memguard")
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """All MemGuard series; implements memguard.server.batcher.BatchObserver."""

    def __init__(self, *, queue_capacity: int = 0):
        disable_created_metrics()   # *_created series double the scrape and no query here uses them
        r = self.registry = CollectorRegistry()
        self.requests = Counter("memguard_requests", "RPCs served, by method and gRPC status code",
                                ["rpc", "code"], registry=r)
        self.request_seconds = Histogram("memguard_request_duration_seconds", "RPC latency, admission to reply",
                                         ["rpc"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("memguard_queue_wait_seconds", "Time a request waited for its batch",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth_g = Gauge("memguard_queue_depth", "Requests waiting in the admission queue", registry=r)
        self.queue_capacity = Gauge("memguard_queue_capacity", "Admission queue size limit", registry=r)
        self.batch_images = Histogram("memguard_batch_size_images", "Images per engine batch",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("memguard_batch_size_requests", "Requests per engine batch",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("memguard_step_duration_seconds", "Wall time of one denoising step of a batch",
                                      buckets=STEP_BUCKETS, registry=r)
        self.guard_seconds = Histogram("memguard_guard_overhead_seconds", "Guard work (signals, policy) per step",
                                       buckets=OVERHEAD_BUCKETS, registry=r)
        self.decode_seconds = Histogram("memguard_decode_duration_seconds", "VAE decoding of a batch's survivors",
                                        buckets=STEP_BUCKETS, registry=r)
        self.denoise_steps = Counter("memguard_denoise_steps", "Denoising steps computed, summed over samples",
                                     registry=r)
        self.images_c = Counter("memguard_images", "Images by decision and coarse reason",
                                ["decision", "reason"], registry=r)
        self.steps_saved = Counter("memguard_steps_saved", "Denoising steps not computed: early block or cancel",
                                   ["cause"], registry=r)
        self.second_passes = Counter("memguard_second_passes", "Images blocked as copies and generated once more "
                                     "from fresh noise, rerouted from step 0", registry=r)
        self.reroutes_unfaithful = Counter("memguard_reroutes_unfaithful", "Rerouted images blocked because they no "
                                           "longer answered the prompt (guidance share, CLIP floor)", registry=r)
        self.index_items = Gauge("memguard_index_items", "Items in the fingerprint index", ["set"], registry=r)
        self.index_search_seconds = Histogram("memguard_index_search_duration_seconds", "Index screening latency",
                                              buckets=SEARCH_BUCKETS, registry=r)
        self.screening_failures = Counter("memguard_screening_failures", "Screens that failed closed (UNAVAILABLE)",
                                          registry=r)
        self.protect_ops = Counter("memguard_protect_operations", "Protected-registry operations",
                                   ["operation", "outcome"], registry=r)
        self.rejections = Counter("memguard_rejections", "Requests refused or downgraded before work, by cause "
                                  "(rate_limited, queue_full, key_queue_share, cost, upload_queue_full, invalid_image, "
                                  "request_id, mode_override, unauthenticated, permission_denied)", ["rpc", "cause"], registry=r)
        self.upload_depth = Gauge("memguard_upload_queue_depth", "Screen/Protect uploads waiting or running",
                                  registry=r)
        self.audit_entries = Counter("memguard_audit_entries", "Entries appended to the audit log", registry=r)
        self.audit_failures = Counter("memguard_audit_failures", "Audit entries that could not be written "
                                      "(the RPC answered UNAVAILABLE)", registry=r)
        self.audit_sequence = Gauge("memguard_audit_sequence", "Sequence number of the newest audit log entry "
                                    "(its hash is logged; compare with the file to detect a cut tail)", registry=r)
        self.reloads = Counter("memguard_reloads", "SIGHUP reloads of keys and certificates",
                               ["what", "outcome"], registry=r)
        self.batch_retries = Counter("memguard_batch_retries", "Requests re-run alone after their batch's engine "
                                     "call failed", ["outcome"], registry=r)
        self.ready = Gauge("memguard_ready", "1 while serving: warmed up and not draining", registry=r)
        self.build = Info("memguard_build", "Build and engine of this server", registry=r)
        self.uncalibrated = Gauge("memguard_uncalibrated", "1 while a component runs on uncalibrated defaults "
                                  "(policy: per-step signals flag nothing; index: default screen thresholds)",
                                  ["component"], registry=r)
        self.set_build(engine_name="loading", guarded=False)
        self.queue_capacity.set(queue_capacity)
        self._http = None
        for d in Decision:        # known label values start at 0, so rate() sees them from the start
            for reason in Reason:
                self.images_c.labels(d.value, reason.value)
        for rpc in RPCS:
            self.requests.labels(rpc, "OK")

    # -- RPCs (interceptor) -------------------------------------------------------------------
    def rpc(self, rpc: str, code: str, seconds: float) -> None:
        rpc = rpc if rpc in RPCS else "other"
        self.requests.labels(rpc, code).inc()
        self.request_seconds.labels(rpc).observe(seconds)

    def reject(self, rpc: str, cause: str) -> None:
        self.rejections.labels(rpc if rpc in RPCS else "other", cause).inc()

    def upload_queue_depth(self, depth: int) -> None:
        self.upload_depth.set(depth)

    def audited(self, ok: bool) -> None:
        (self.audit_entries if ok else self.audit_failures).inc()

    def audit_head(self, seq: int) -> None:
        self.audit_sequence.set(seq)

    def reloaded(self, what: str, ok: bool) -> None:
        self.reloads.labels(what, "ok" if ok else "error").inc()

    def batch_retry(self, outcome: str) -> None:
        self.batch_retries.labels(outcome).inc()

    # -- BatchObserver --------------------------------------------------------------------------
    def queue_depth(self, depth: int) -> None:
        self.queue_depth_g.set(depth)

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(seconds)

    def batch(self, requests: int, images: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_images.observe(images)

    def images(self, results: list[ImageResult]) -> None:
        for result in results:
            self.images_c.labels(result.decision.value, result.reason.value).inc()

    def engine_stats(self, stats: EngineStats) -> None:
        for b in stats.batches:
            self.denoise_steps.inc(b.sample_steps)
            for s in b.step_seconds:
                self.step_seconds.observe(s)
            for s in b.guard_seconds:
                self.guard_seconds.observe(s)
            if b.sample_steps:
                self.decode_seconds.observe(b.decode_seconds)
            for cause, n in b.steps_saved.items():
                self.steps_saved.labels(cause if cause in ("blocked", "cancelled") else "other").inc(n)
            if b.second_passes:
                self.second_passes.inc(b.second_passes)
            if b.reroutes_unfaithful:
                self.reroutes_unfaithful.inc(b.reroutes_unfaithful)
        for s in stats.screen_seconds:
            self.index_search_seconds.observe(s)
        if stats.screen_failures:
            self.screening_failures.inc(stats.screen_failures)

    # -- index and registry -----------------------------------------------------------------------
    def index_stats(self, stats: IndexStats) -> None:
        self.index_items.labels("training").set(stats.items)
        self.index_items.labels("protected").set(stats.protected_items)

    def protect_op(self, operation: str, outcome: str) -> None:
        self.protect_ops.labels(operation, outcome).inc()

    def set_uncalibrated(self, components: dict[str, bool]) -> None:
        for name, flag in components.items():
            self.uncalibrated.labels(component=name).set(1 if flag else 0)

    def set_build(self, *, engine_name: str, guarded: bool) -> None:
        self.build.info({"version": _version(), "engine": engine_name, "guarded": str(guarded).lower()})

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    # -- HTTP endpoint ----------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a thread; return the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
