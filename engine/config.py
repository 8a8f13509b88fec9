"""Configuration: the ENGINE_* variables of the contract (the table is engine.settings)
and the seed miner's aliases.

Read once, in the process that starts the engine, and handed to every worker as a
frozen dataclass, so all processes agree even if the environment changes later.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

from engine import fences
from engine.settings import DEFAULTS, SETTINGS

log = logging.getLogger("engine")


class ConfigError(ValueError):
    pass


def _int(env, name, default, minimum=1):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def _float(env, name, default):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"{name}={value} must be > 0")
    return value


def _choice(env, name, default, choices):
    raw = env.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
    return raw


def check_device(device: str) -> str:
    d = device.strip().lower()
    if d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()):
        return d
    raise ConfigError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")


def default_socket_path(env=None) -> str:
    env = os.environ if env is None else env
    if env.get("ENGINE_SOCKET"):
        return env["ENGINE_SOCKET"]
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "engine.sock")
    return f"/tmp/engine-{os.getuid()}.sock"


@dataclass(frozen=True)
class Config:
    """Field names are the code's; each ENGINE_* variable, its default and meaning are in
    engine.settings.SETTINGS."""
    fetchers: int = DEFAULTS["fetchers"]
    connections: int = DEFAULTS["connections"]
    range_mb: float = DEFAULTS["range_mb"]
    http2: str = DEFAULTS["http2"]
    keepalive_s: float = DEFAULTS["keepalive_s"]
    prewarm: tuple[str, ...] = DEFAULTS["prewarm"]
    decoder: str = DEFAULTS["decoder"]
    decoders: int = DEFAULTS["decoders"]
    sws_threads: int = DEFAULTS["sws_threads"]
    decode_lanes: int = DEFAULTS["decode_lanes"]
    device: str = DEFAULTS["device"]
    batch: int = DEFAULTS["batch"]
    ring_mb: float = DEFAULTS["ring_mb"]
    ring_slots: int | None = DEFAULTS["ring_slots"]
    max_bytes: int = DEFAULTS["max_bytes"]
    max_frames: int | None = DEFAULTS["max_frames"]
    max_selected: int | None = DEFAULTS["max_selected"]
    partial_mb: float | None = None  # seed alias: only frames within the first N MB
    job_timeout_s: float = DEFAULTS["job_timeout_s"]
    pooling: bool = True             # USE_CONNECTION_POOL=0 turns it off
    head_kb: int = 128               # first range: learns the size and the box layout
    processor: str = DEFAULTS["processor"]
    log_level: str = DEFAULTS["log_level"]
    max_rss_mb: int = DEFAULTS["max_rss_mb"]
    report_sha256: bool = DEFAULTS["report_sha256"]
    heartbeat_timeout_s: float = DEFAULTS["heartbeat_timeout_s"]
    stall_timeout_s: float = DEFAULTS["stall_timeout_s"]
    # The supervisor's other grace periods, not settable: tests shorten them directly.
    stop_grace_s: float = 4.0           # stop request: in-flight jobs may finish this long
    worker_exit_s: float = 2.0          # a worker asked to exit, then it is killed
    quick_death_s: float = 2.0          # a death this soon after start counts as quick
    restart_backoff_s: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 5.0)   # by quick deaths
    max_clients: int = DEFAULTS["max_clients"]
    cluster: str = DEFAULTS["cluster"]
    cluster_jobs_per_engine: int = DEFAULTS["cluster_jobs_per_engine"]
    # Fences for untrusted URLs (engine.fences); off by default.
    allow_hosts: tuple[str, ...] = DEFAULTS["allow_hosts"]
    deny_private: bool = DEFAULTS["deny_private"]
    max_pixels: int | None = DEFAULTS["max_pixels"]
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        # Engine(allow_hosts=..., max_pixels=...) arrives here unparsed, as the variables do
        try:
            object.__setattr__(self, "allow_hosts", fences.parse_hosts(self.allow_hosts))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ConfigError(f"ENGINE_MAX_PIXELS={self.max_pixels} must be >= 1")

    @property
    def head_bytes(self) -> int:
        return self.head_kb * 1024

    @property
    def ring_bytes(self) -> int:
        return int(self.ring_mb * 1024 * 1024)

    @property
    def range_bytes(self) -> int:
        return max(64 * 1024, int(self.range_mb * 1024 * 1024) // (64 * 1024) * (64 * 1024))

    def with_(self, **changes) -> "Config":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, env=None) -> "Config":
        env = os.environ if env is None else env
        values = {s.field: _READERS[s.kind](env, s) for s in SETTINGS if s.field}
        return cls(**values, pooling=_pooling(env), partial_mb=_partial_mb(env),
                   notes=_ignored(env))


def _pooling(env) -> bool:
    return env.get("USE_CONNECTION_POOL", "1").strip() not in ("0", "false", "False")


def _partial_mb(env) -> float | None:
    if env.get("PARTIAL_DOWNLOAD", "").strip() in ("1", "true", "True"):
        return _float(env, "PARTIAL_DOWNLOAD_MB", 4.0)
    return None


def _ignored(env) -> tuple[str, ...]:
    return tuple(f"{name} is accepted and ignored: decoding always starts as soon as the "
                 "first frame's bytes are in"
                 for name in ("CHUNKED_STREAMING", "STREAM_MIN_START_BYTES",
                              "STREAM_BUFFER_TIMEOUT_S") if name in env)


def _frames(env, s):
    if env.get(s.env, "").strip().lower() == "all":
        return s.default
    return _int(env, s.env, s.default, s.minimum)


# How each kind of engine.settings row is read; every error names the variable.
_READERS = {
    "int": lambda env, s: _int(env, s.env, s.default, s.minimum),
    "frames": _frames,
    "float": lambda env, s: _float(env, s.env, s.default),
    "choice": lambda env, s: _choice(env, s.env, s.default, s.choices),
    "level": lambda env, s: _choice(env, s.env, s.default.lower(), s.choices).upper(),
    "switch": lambda env, s: _choice(env, s.env, "0", ("0", "1")) == "1",
    "flag": lambda env, s: env.get(s.env, "0").strip() == "1",
    "list": lambda env, s: tuple(o.strip() for o in env.get(s.env, "").split(",") if o.strip()),
    "hosts": lambda env, s: env.get(s.env, ""),      # Config.__post_init__ parses them
    "device": lambda env, s: check_device(env.get(s.env, "").strip() or s.default),
    "text": lambda env, s: env.get(s.env, "").strip() or s.default,
}
