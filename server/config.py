"""Server configuration: dataclasses with defaults, loaded from a TOML file and overridden by flags.

    [server]                          [batching]
    host = "127.0.0.1"                max_batch_images = 8
    port = 50051                      max_queue_delay_ms = 10.0
    metrics_port = 9464               max_queue = 64
    auth_file = "keys.toml"
    tls_cert = "…" / tls_key = "…"    [engine]
    tls_client_ca = "…"   # mTLS      engine = "memguard.guarded_engine:GuardedEngine"
    insecure = false                  model = "guard/testbed/model"
    drain_delay_s = 5.0               index = "…"
    grace_s = 30.0                    [limits]
    default_mode = "enforce"          max_steps = 150 …
    allow_mode_override = false       [rate_limits]   # per key; on by default
    audit_log = "audit.jsonl"         generate_per_s = 1.0 / generate_burst = 20 …
    face_match_scope = "protected"    [admission]
                                      max_latent_factor = 2 / max_request_cost = 400 / key_queue_share = 0.25
                                      [uploads]
                                      max_queue = 16 / workers = 2 / max_aspect_ratio = 8 …

An unknown key is an error naming it (`config: server.prot is not a setting`).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memguard.engine import DEFAULT_ENGINE, EngineConfig
from memguard.errors import InvalidInput, MissingResource
from memguard.types import FaceAction, GuardMode, RequestLimits


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
class RateLimitConfig:
    """Per-key token buckets (rate per second, burst); on by default (issue 29). 0 rate: unlimited.
    They apply to API keys: with auth off (loopback only) the one local developer is not limited."""
    generate_per_s: float = 1.0        # images per second, sustained
    generate_burst: int = 20
    screen_per_s: float = 5.0
    screen_burst: int = 50

    def validate(self) -> None:
        for name in ("generate_per_s", "screen_per_s"):
            if getattr(self, name) < 0:
                raise InvalidInput(f"rate_limits.{name}", "must not be negative")
        for name in ("generate_burst", "screen_burst"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"rate_limits.{name}", "must be at least 1")


@dataclass(frozen=True)
class AdmissionConfig:
    """What one Generate request may cost, and how much of the admission queue one key may hold.

    The model's native side is its UNet's sample size × the VAE's scale factor (512 px for SD 1.x)."""
    max_latent_factor: float = 2.0      # height and width ≤ this × the model's native side
    max_request_cost: float = 400.0     # height × width × steps × num_images, in native images × steps
    key_queue_share: float = 0.25       # of batching.max_queue one API key may hold waiting (at least 1)

    def validate(self) -> None:
        if self.max_latent_factor < 1:
            raise InvalidInput("admission.max_latent_factor", "must be at least 1")
        if self.max_request_cost <= 0:
            raise InvalidInput("admission.max_request_cost", "must be positive")
        if not 0 < self.key_queue_share <= 1:
            raise InvalidInput("admission.key_queue_share", "must be in (0, 1]")

    def max_side(self, native: int) -> int:
        return int(self.max_latent_factor * native)

    def key_queue_slots(self, max_queue: int) -> int:
        return max(1, int(self.key_queue_share * max_queue))


@dataclass(frozen=True)
class UploadConfig:
    """Screen / Protect uploads: decoded and screened off the event loop behind a bounded queue."""
    max_queue: int = 16                 # uploads waiting or running; more → RESOURCE_EXHAUSTED
    workers: int = 2                    # threads that decode and screen
    max_pixels: int = 4096 * 4096       # decoded size
    min_side: int = 16
    max_aspect_ratio: float = 8.0       # long side / short side
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")

    def validate(self) -> None:
        if self.max_queue < 1 or self.workers < 1:
            raise InvalidInput("uploads.max_queue", "max_queue and workers must be at least 1")
        if self.min_side < 1 or self.max_aspect_ratio < 1 or self.max_pixels < self.min_side ** 2:
            raise InvalidInput("uploads.min_side", "need min_side >= 1, max_aspect_ratio >= 1, "
                                                    "max_pixels >= min_side²")
        bad = [f for f in self.formats if f not in ("PNG", "JPEG", "WEBP")]
        if bad:
            raise InvalidInput("uploads.formats", f"{bad} not among PNG, JPEG, WEBP")


FACE_MATCH_SCOPES = ("any", "protected")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051                   # 0: pick a free port
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464            # 0: pick a free port; -1: no metrics endpoint
    auth_file: str | None = None        # None: auth disabled (allowed on loopback only)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None    # mTLS: client certificates signed by this CA are required
    insecure: bool = False              # allow plaintext off loopback with an auth file
    audit_log: str | None = None        # append-only hash-chained JSONL (guard/audit.py); None: off
    allow_mode_override: bool = False   # True: any generate key may ask for MONITOR / OFF
    # which matched faces count, for Screen (faces_matched, PROTECTED_FACE) and guarded generation
    # (FACE_OBFUSCATED) alike: "protected" identities only (default), or "any" indexed face (training-set
    # people too: tells every caller that a face is in the training set). The engine takes it from here.
    face_match_scope: str = "protected"
    max_receive_bytes: int = 16 << 20   # uploads (Screen, Protect)
    max_send_bytes: int = 64 << 20
    max_concurrent_rpcs: int = 256      # RPCs in progress at once, all connections; more → RESOURCE_EXHAUSTED
    max_connection_age_s: float = 1800.0   # then the server asks the client to reconnect (GOAWAY)...
    max_connection_age_grace_s: float = 300.0   # ...and closes the connection this much later
    drain_delay_s: float = 0.0          # NOT_SERVING but still accepting, so balancers move away
    grace_s: float = 30.0               # then in-flight RPCs get this long to finish
    default_mode: GuardMode = GuardMode.ENFORCE
    default_face_action: FaceAction = FaceAction.BLUR
    default_steps: int = 30
    engine_spec: str = DEFAULT_ENGINE
    engine: EngineConfig = EngineConfig()
    batching: BatchingConfig = BatchingConfig()
    limits: RequestLimits = RequestLimits()   # num_images is also capped at batching.max_batch_images
    rate_limits: RateLimitConfig = RateLimitConfig()
    admission: AdmissionConfig = AdmissionConfig()
    uploads: UploadConfig = UploadConfig()

    def validate(self) -> None:
        self.batching.validate()
        self.rate_limits.validate()
        self.admission.validate()
        self.uploads.validate()
        if self.max_concurrent_rpcs < 1:
            raise InvalidInput("max_concurrent_rpcs", "must be at least 1")
        if self.max_connection_age_s <= 0 or self.max_connection_age_grace_s < 0:
            raise InvalidInput("max_connection_age_s", "must be positive (and its grace not negative)")
        if self.face_match_scope not in FACE_MATCH_SCOPES:
            raise InvalidInput("face_match_scope", f"{self.face_match_scope!r} is not one of {FACE_MATCH_SCOPES}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInput("tls_cert", "tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidInput("tls_client_ca", "mTLS needs the server's own tls_cert and tls_key")
        if (self.auth_file is not None and self.tls_cert is None and not self.insecure
                and not is_loopback(self.host)):
            raise InvalidInput("host", f"{self.host} is not a loopback address: API keys would cross the network "
                                       "in plaintext; give tls_cert/tls_key (or --insecure to accept that)")
        for name in ("auth_file", "tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise MissingResource(f"{name}: file {value} does not exist")
        if self.auth_file is None and not is_loopback(self.host):
            raise InvalidInput("host", f"{self.host} is not a loopback address: serving beyond this "
                                       "machine needs an auth_file (see `memguard apikey`)")


def is_loopback(host: str) -> bool:
    """A loopback listen address: an IP address in 127.0.0.0/8 or ::1 (parsed, not prefix-matched:
    `127.attacker.example` is a name that resolves anywhere), or the name `localhost`."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_SECTIONS = {"server": None, "engine": "engine", "batching": "batching", "limits": "limits",
             "rate_limits": "rate_limits", "admission": "admission", "uploads": "uploads"}
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
    """Read a TOML file over `base`; sections [server] [engine] [batching] [limits] [rate_limits] [admission]
    [uploads]."""
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
    if "face_match_scope" in engine:   # one setting for Screen and generation (issue 29)
        raise InvalidInput("config", "engine.face_match_scope is set once, as server.face_match_scope "
                                     "(Screen and generation)")
    if "engine" in engine:
        config = dataclasses.replace(config, engine_spec=engine.pop("engine"))
    for section, attr in (("engine", "engine"), ("batching", "batching"), ("limits", "limits"),
                          ("rate_limits", "rate_limits"), ("admission", "admission"), ("uploads", "uploads")):
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
