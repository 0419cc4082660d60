"""Assemble and run the server: engine, batcher, servicers, interceptors, health, reflection, metrics.

Lifecycle: start listening with health NOT_SERVING → load/warm up the engine off the loop → start
the batcher → SERVING. Shutdown (SIGTERM/SIGINT): NOT_SERVING → wait `drain_delay_s` (still
accepting, so load balancers move away) → stop accepting and give in-flight RPCs `grace_s` →
stop the batcher, the metrics endpoint and the engine.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from guard.engine import GenerationEngine, load_engine
from proto.memguard.v1 import admin_pb2, admin_pb2_grpc, memguard_pb2, memguard_pb2_grpc
from server.auth import KeyStore
from server.batcher import Batcher
from server.config import ServerConfig
from server.convert import RequestDefaults
from server.interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor
from server.metrics import Metrics
from server.service import IndexAdminService, MemGuardService

log = logging.getLogger(__name__)

SERVICE_NAMES = (memguard_pb2.DESCRIPTOR.services_by_name["MemGuard"].full_name,
                 admin_pb2.DESCRIPTOR.services_by_name["IndexAdmin"].full_name)


@dataclass
class Endpoints:
    port: int
    metrics_port: int | None


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

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("",) + SERVICE_NAMES:
            await self.health.set(name, status)
        if self.metrics is not None:
            self.metrics.set_ready(serving)

    def _build_grpc_server(self, keys: KeyStore | None) -> grpc.aio.Server:
        cfg = self.config
        server = grpc.aio.server(
            interceptors=[MetricsInterceptor(self.metrics), AuthInterceptor(keys), ErrorInterceptor()],
            options=[("grpc.max_receive_message_length", cfg.max_receive_bytes),
                     ("grpc.max_send_message_length", cfg.max_send_bytes)])
        defaults = RequestDefaults(steps=cfg.default_steps, mode=cfg.default_mode, face_action=cfg.default_face_action)
        memguard_pb2_grpc.add_MemGuardServicer_to_server(
            MemGuardService(self.batcher, self.metrics, defaults, cfg.limits), server)
        self.admin = IndexAdminService(self.batcher, self.metrics)
        admin_pb2_grpc.add_IndexAdminServicer_to_server(self.admin, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        return server

    def _bind(self, server: grpc.aio.Server) -> int:
        cfg = self.config
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        return port

    async def start(self) -> Endpoints:
        """Listen (NOT_SERVING), load and warm up the engine off the loop, then report SERVING."""
        cfg = self.config
        keys = KeyStore.load(cfg.auth_file) if cfg.auth_file else None
        if keys is None:
            log.warning("no auth_file: authentication is DISABLED (allowed on loopback %s only)", cfg.host)
        self.metrics = Metrics(queue_capacity=cfg.batching.max_queue)
        self.batcher = Batcher(cfg.batching, self.metrics)
        self.server = self._build_grpc_server(keys)
        await self._set_health(False)
        port = self._bind(self.server)
        await self.server.start()
        metrics_port = self.metrics.serve(cfg.metrics_host, cfg.metrics_port) if cfg.metrics_port >= 0 else None
        self.endpoints = Endpoints(port, metrics_port)
        log.info("listening on %s:%d (metrics %s); loading the engine", cfg.host, port, metrics_port)
        try:
            await self._load_engine()
        except BaseException:
            await self.server.stop(0)
            self.metrics.stop()
            raise
        self.batcher.start(self.engine)
        await self._refresh_index_stats()
        await self._set_health(True)
        log.info("serving")
        return self.endpoints

    async def _load_engine(self) -> None:
        cfg = self.config
        if self.engine is None:
            self.engine = await asyncio.to_thread(load_engine, cfg.engine_spec, cfg.engine)
        if not self.engine.guarded:
            log.warning("engine %r does not guard: every request runs with mode OFF", self.engine.name)
        self.metrics.set_build(engine_name=self.engine.name, guarded=self.engine.guarded)
        await asyncio.to_thread(self.engine.warmup)

    async def _refresh_index_stats(self) -> None:
        try:
            await self.admin.refresh_stats()
        except Exception as exc:   # no index configured: the gauge stays absent
            log.info("index stats unavailable: %s", exc)

    async def shutdown(self) -> None:
        """Drain and stop; safe to call once the server started."""
        await self._set_health(False)
        if self.config.drain_delay_s > 0:
            log.info("draining: NOT_SERVING for %.1f s before refusing new RPCs", self.config.drain_delay_s)
            await asyncio.sleep(self.config.drain_delay_s)
        if self.server is not None:
            await self.server.stop(self.config.grace_s)
        if self.batcher is not None:
            await self.batcher.close()
        if self.metrics is not None:
            self.metrics.stop()
        if self.engine is not None:
            self.engine.close()
        log.info("stopped")


async def serve_until_signal(config: ServerConfig) -> None:
    """`memguard serve`: run until SIGTERM or SIGINT, then drain."""
    server = MemGuardServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
