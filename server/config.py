"""Server configuration: dataclasses with defaults, loaded from a TOML file and overridden by flags.

    [server]                          [batching]
    host = "127.0.0.1"                max_batch_images = 8
    port = 50051                      max_queue_delay_ms = 10.0
    metrics_port = 9464               max_queue = 64
    auth_file = "keys.toml"
    tls_cert = "…" / tls_key = "…"    [engine]
    drain_delay_s = 5.0               engine = "guard.guarded_engine:GuardedEngine"
    grace_s = 30.0                    model = "guard/testbed/model"
    default_mode = "enforce"          index = "…"
                                      [limits]
                                      max_steps = 150 …

An unknown key is an error naming it (`config: server.prot is not a setting`).
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guard.engine import DEFAULT_ENGINE, EngineConfig
from guard.errors import InvalidInput, MissingResource
from guard.types import FaceAction, GuardMode, RequestLimits


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_images: int = 8          # images per engine call (Triton: max_batch_size)
    max_queue_delay_ms: float = 10.0   # how long the oldest request waits for the batch to fill
    max_queue: int = 64                # waiting requests; more → RESOURCE_EXHAUSTED

    def validate(self) -> None:
        if self.max_batch_images < 1:
            raise InvalidInput("batching.max_batch_images", "must be at least 1")
        if self.max_queue_delay_ms < 0:
            raise InvalidInput("batching.max_queue_delay_ms", "must not be negative")
        if self.max_queue < 1:
            raise InvalidInput("batching.max_queue", "must be at least 1")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051                   # 0: pick a free port
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464            # 0: pick a free port; -1: no metrics endpoint
    auth_file: str | None = None        # None: auth disabled (allowed on loopback only)
    tls_cert: str | None = None
    tls_key: str | None = None
    max_receive_bytes: int = 16 << 20   # uploads (Screen, Protect)
    max_send_bytes: int = 64 << 20
    drain_delay_s: float = 0.0          # NOT_SERVING but still accepting, so balancers move away
    grace_s: float = 30.0               # then in-flight RPCs get this long to finish
    default_mode: GuardMode = GuardMode.ENFORCE
    default_face_action: FaceAction = FaceAction.BLUR
    default_steps: int = 30
    engine_spec: str = DEFAULT_ENGINE
    engine: EngineConfig = EngineConfig()
    batching: BatchingConfig = BatchingConfig()
    limits: RequestLimits = RequestLimits()

    def validate(self) -> None:
        self.batching.validate()
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInput("tls_cert", "tls_cert and tls_key go together")
        for name in ("auth_file", "tls_cert", "tls_key"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise MissingResource(f"{name}: file {value} does not exist")
        if self.auth_file is None and not is_loopback(self.host):
            raise InvalidInput("host", f"{self.host} is not a loopback address: serving beyond this "
                                       "machine needs an auth_file (see `memguard apikey`)")


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


_SECTIONS = {"server": None, "engine": "engine", "batching": "batching", "limits": "limits"}
_ENUMS = {"default_mode": GuardMode, "default_face_action": FaceAction}


def _apply(obj: Any, values: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in names or (where == "server" and key in _SECTIONS.values()):
            raise InvalidInput("config", f"{where}.{key} is not a setting")
        if key in _ENUMS:
            try:
                value = _ENUMS[key](value)
            except ValueError as exc:
                raise InvalidInput("config", f"{where}.{key}: {exc}") from exc
        elif isinstance(getattr(obj, key), tuple):
            value = tuple(value)
        changes[key] = value
    return dataclasses.replace(obj, **changes)


def load_config(path: str | Path | None = None, base: ServerConfig = ServerConfig()) -> ServerConfig:
    """Read a TOML file over `base`; sections [server] [engine] [batching] [limits]."""
    if path is None:
        return base
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise MissingResource(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput("config", f"{path} is not valid TOML: {exc}") from exc
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise InvalidInput("config", f"unknown section(s) {sorted(unknown)} in {path}")
    config = _apply(base, data.get("server", {}), "server")
    engine = data.get("engine", {})
    if "engine" in engine:
        config = dataclasses.replace(config, engine_spec=engine.pop("engine"))
    for section, attr in (("engine", "engine"), ("batching", "batching"), ("limits", "limits")):
        config = dataclasses.replace(config, **{attr: _apply(getattr(config, attr), engine if section == "engine"
                                                            else data.get(section, {}), section)})
    return config


def override(config: ServerConfig, **flags: Any) -> ServerConfig:
    """Apply command-line flags (None means "not given"); dotted keys reach sections."""
    top, nested = {}, {}
    for key, value in flags.items():
        if value is None:
            continue
        if "." in key:
            section, name = key.split(".", 1)
            nested.setdefault(section, {})[name] = value
        else:
            top[key] = value
    for section, values in nested.items():
        top[section] = dataclasses.replace(getattr(config, section), **values)
    return dataclasses.replace(config, **top)
