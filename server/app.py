"""Assemble and run the server: engine, batcher, servicers, interceptors, health, reflection, metrics.

Lifecycle: start listening with health NOT_SERVING → load/warm up the engine off the loop → start
the batcher → SERVING. Shutdown (SIGTERM/SIGINT): NOT_SERVING → wait `drain_delay_s` (still
accepting, so load balancers move away) → stop accepting and give in-flight RPCs `grace_s` →
stop the batcher, the metrics endpoint and the engine. SIGHUP reloads the API keys and the TLS
certificates (and the mTLS client CA) with no restart; a reload that fails keeps the old ones.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memguard.engine import GenerationEngine, load_engine
from memguard.proto.memguard.v1 import admin_pb2, admin_pb2_grpc, memguard_pb2, memguard_pb2_grpc
from memguard.audit import AuditLog
from memguard.errors import MemGuardError
from memguard.server.audit_trail import ServerAudit
from memguard.server.auth import KeyRing
from memguard.server.batcher import Batcher
from memguard.server.config import ServerConfig, is_loopback
from memguard.server.convert import RequestDefaults
from memguard.server.interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor
from memguard.server.metrics import Metrics
from memguard.server.registry_health import RegistryHealth
from memguard.server.ratelimit import RateLimiter
from memguard.server.service import IndexAdminService, MemGuardService, Shared
from memguard.server.uploads import UploadPool

log = logging.getLogger(__name__)

SERVICE_NAMES = (memguard_pb2.DESCRIPTOR.services_by_name["MemGuard"].full_name,
                 admin_pb2.DESCRIPTOR.services_by_name["IndexAdmin"].full_name)
CALIBRATION_SERVICE = "memguard.v1.Calibration"   # a health-only name: SERVING once policy and index are calibrated


@dataclass
class Endpoints:
    port: int
    metrics_port: int | None


class Certificates:
    """The server's TLS identity (and mTLS client CA), swapped in on reload for new connections."""

    def __init__(self, cert: str, key: str, client_ca: str | None):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._pending = None
        self.current = self._load()

    def _load(self) -> grpc.ServerCertificateConfiguration:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)  # pair matches?
        roots = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_certificate_configuration(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())], root_certificates=roots)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.current, self._fetch,
                                                   require_client_authentication=self.client_ca is not None)

    def reload(self) -> None:
        config = self._load()          # raises on a bad file: the old identity stays
        with self._lock:
            self._pending = config

    def _fetch(self):
        """Called by gRPC at each handshake: the new configuration once after a reload, else None."""
        with self._lock:
            config, self._pending = self._pending, None
        return config


class MemGuardServer:
    """One server. `engine` may be given (tests share one); otherwise config.engine_spec loads it."""

    def __init__(self, config: ServerConfig, engine: GenerationEngine | None = None):
        config.validate()
        self.config = config
        self.engine = engine
        self.health = health.aio.HealthServicer()
        self.metrics: Metrics | None = None
        self.batcher: Batcher | None = None
        self.server: grpc.aio.Server | None = None
        self.endpoints: Endpoints | None = None
        self.keys: KeyRing | None = None
        self.certificates: Certificates | None = None
        self.audit = ServerAudit(None)
        self.uploads: UploadPool | None = None

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("",) + SERVICE_NAMES:
            await self.health.set(name, status)
        # the health detail for calibration: NOT_SERVING while the policy or the index runs on defaults
        calibrated = serving and not any(getattr(self.engine, "uncalibrated", {}).values())
        await self.health.set(CALIBRATION_SERVICE, health_pb2.HealthCheckResponse.SERVING if calibrated
                              else health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.metrics is not None:
            self.metrics.set_ready(serving)

    def _build_grpc_server(self) -> grpc.aio.Server:
        cfg = self.config
        server = grpc.aio.server(
            interceptors=[MetricsInterceptor(self.metrics), AuthInterceptor(self.keys, self.audit, self.metrics),
                          ErrorInterceptor()],
            options=[("grpc.max_receive_message_length", cfg.max_receive_bytes),
                     ("grpc.max_send_message_length", cfg.max_send_bytes),
                     ("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
                     ("grpc.max_connection_age_grace_ms", int(cfg.max_connection_age_grace_s * 1000))],
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        defaults = RequestDefaults(steps=cfg.default_steps, mode=cfg.default_mode, face_action=cfg.default_face_action)
        self.uploads = UploadPool(cfg.uploads, self.metrics.upload_queue_depth)
        shared = Shared(self.batcher, self.metrics, cfg, self.uploads, RateLimiter(cfg.rate_limits), self.audit)
        self.service = MemGuardService(shared, defaults, cfg.limits)
        memguard_pb2_grpc.add_MemGuardServicer_to_server(self.service, server)
        self.admin = IndexAdminService(shared)
        admin_pb2_grpc.add_IndexAdminServicer_to_server(self.admin, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        return server

    def _bind(self, server: grpc.aio.Server) -> int:
        cfg = self.config
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            self.certificates = Certificates(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
            port = server.add_secure_port(address, self.certificates.credentials())
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        return port

    async def start(self) -> Endpoints:
        """Listen (NOT_SERVING), load and warm up the engine off the loop, then report SERVING."""
        cfg = self.config
        self.keys = KeyRing(cfg.auth_file)
        if not self.keys.enabled:
            log.warning("no auth_file: authentication is DISABLED (allowed on loopback %s only)", cfg.host)
        if cfg.auth_file and not cfg.tls_cert:
            log.warning("API keys travel in plaintext (no TLS)%s", "" if cfg.insecure else " on loopback")
        self.metrics = Metrics(queue_capacity=cfg.batching.max_queue)
        # off loopback the audit chain must be keyed (MEMGUARD_AUDIT_KEY_FILE); on loopback a warning
        self.audit = ServerAudit(AuditLog(cfg.audit_log, require_key=not is_loopback(cfg.host))
                                 if cfg.audit_log else None, self.metrics)
        self.batcher = Batcher(cfg.batching, self.metrics)
        self.server = self._build_grpc_server()
        await self._set_health(False)
        port = self._bind(self.server)
        await self.server.start()
        metrics_port = self.metrics.serve(cfg.metrics_host, cfg.metrics_port) if cfg.metrics_port >= 0 else None
        if metrics_port is not None and not is_loopback(cfg.metrics_host):
            log.warning("/metrics listens on %s without authentication: it is audit scope (SECURITY.md); "
                        "keep that address on a private network", cfg.metrics_host)
        self.endpoints = Endpoints(port, metrics_port)
        log.info("listening on %s:%d (metrics %s); loading the engine", cfg.host, port, metrics_port)
        try:
            await self._load_engine()
        except BaseException:
            await self.server.stop(0)
            self.metrics.stop()
            self.audit.close()     # releases the audit log's lock: a retry in this process may open it
            raise
        self.batcher.start(self.engine)
        await self._refresh_index_stats()
        await self._set_health(True)
        self.registry_health = RegistryHealth(self.engine, self._set_health)   # registry (issue 15)
        self.registry_health.start()
        log.info("serving")
        return self.endpoints

    async def _load_engine(self) -> None:
        cfg = self.config
        if self.engine is None:
            # one face scope for Screen and generation: the server's setting reaches the engine
            engine_config = replace(cfg.engine, face_match_scope=cfg.face_match_scope)
            self.engine = await asyncio.to_thread(load_engine, cfg.engine_spec, engine_config)
        if not self.engine.guarded:
            log.warning("engine %r does not guard: every request runs with mode OFF", self.engine.name)
        self.metrics.set_build(engine_name=self.engine.name, guarded=self.engine.guarded)
        uncalibrated = getattr(self.engine, "uncalibrated", {})
        self.metrics.set_uncalibrated(uncalibrated)
        for warning in getattr(self.engine, "calibration_warnings", []):
            log.warning("%s", warning)
        await asyncio.to_thread(self.engine.warmup)
        size = getattr(self.engine, "default_size", None)   # unset height/width: the model's own size
        if size:
            self.service.defaults = replace(self.service.defaults, size=int(size))

    async def _refresh_index_stats(self) -> None:
        try:
            await self.admin.refresh_stats()
        except Exception as exc:   # no index configured: the gauge stays absent
            log.info("index stats unavailable: %s", exc)

    async def shutdown(self) -> None:
        """Drain and stop; safe to call once the server started."""
        if getattr(self, "registry_health", None) is not None:
            self.registry_health.stop()
        await self._set_health(False)
        if self.config.drain_delay_s > 0:
            log.info("draining: NOT_SERVING for %.1f s before refusing new RPCs", self.config.drain_delay_s)
            await asyncio.sleep(self.config.drain_delay_s)
        if self.server is not None:
            await self.server.stop(self.config.grace_s)
        if self.batcher is not None:
            await self.batcher.close()
        if self.uploads is not None:
            await asyncio.to_thread(self.uploads.close)
        if self.metrics is not None:
            self.metrics.stop()
        if self.engine is not None:
            self.engine.close()
        self.audit.close()
        log.info("stopped")

    def reload(self) -> bool:
        """SIGHUP: re-read the key file and the certificates; what fails to load keeps its old value."""
        ok = True
        for what, target in (("keys", self.keys), ("certificates", self.certificates)):
            if target is None or (what == "keys" and not target.enabled):
                continue
            try:
                target.reload()
            except (MemGuardError, OSError, ssl.SSLError) as exc:
                log.error("reload of %s failed, keeping the old ones: %s", what, exc)
                ok = False
                self.metrics.reloaded(what, False)
            else:
                log.info("reloaded %s", what)
                self.metrics.reloaded(what, True)
        return ok


async def serve_until_signal(config: ServerConfig) -> None:
    """`memguard serve`: run until SIGTERM or SIGINT, then drain."""
    server = MemGuardServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    endpoints = await server.start()
    print(f"memguard serving on {config.host}:{endpoints.port}"
          + (f", metrics on http://{config.metrics_host}:{endpoints.metrics_port}/metrics"
             if endpoints.metrics_port else ""), flush=True)
    await stop.wait()
    await server.shutdown()


class BackgroundServer:
    """A MemGuardServer on its own event loop in a thread (tests, demo, load runs)."""

    def __init__(self, config: ServerConfig, engine: GenerationEngine | None = None):
        self.server = MemGuardServer(config, engine)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="memguard-server", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            await self.server.start()
        except BaseException as exc:
            self._error = exc      # re-raised by start() in the caller's thread
            self._started.set()
            return
        self._started.set()
        await self._stop.wait()
        await self.server.shutdown()

    def start(self, timeout: float = 300.0, wait: bool = True) -> Endpoints | None:
        """Start the thread; with `wait`, return once SERVING (or raise what start() raised)."""
        self._thread.start()
        if not wait:
            return None
        if not self._started.wait(timeout):
            raise TimeoutError(f"server did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self.server.endpoints

    def call(self, coro_fn, timeout: float = 60.0):
        """Run `coro_fn()` on the server's loop and return its result (e.g. a shutdown step)."""
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout)

    def stop(self, timeout: float = 120.0) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    @property
    def target(self) -> str:
        return f"{self.server.config.host}:{self.server.endpoints.port}"
