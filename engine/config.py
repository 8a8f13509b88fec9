"""Configuration: the ENGINE_* variables of the contract and the seed miner's aliases.

Read once, in the process that starts the engine, and handed to every worker as a
frozen dataclass, so all processes agree even if the environment changes later.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

from engine import fences

log = logging.getLogger("engine")


class ConfigError(ValueError):
    pass


def _int(env, name, default, minimum=1):
    raw = env.get(name, "").strip()
    if not raw or (name == "ENGINE_MAX_FRAMES" and raw.lower() == "all"):
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
    fetchers: int = 2
    connections: int = 4
    range_mb: float = 2.0
    http2: str = "0"                 # "0", "1" or "auto"
    keepalive_s: float = 120.0
    prewarm: tuple[str, ...] = ()
    decoder: str = "auto"            # auto, pyav, decord
    decoders: int = 2                # decoder processes (jobs decoded at once)
    sws_threads: int = 1             # swscale threads per RGB conversion (0: one per CPU)
    device: str = "auto"
    batch: int = 16
    ring_mb: float = 200.0           # a job's frame ring at most: two batches of 1080p
    ring_slots: int | None = None    # ENGINE_RING_SLOTS: a fixed slot count instead
    max_bytes: int = 512 * 1024 * 1024
    max_frames: int | None = None
    max_selected: int | None = None  # ENGINE_MAX_SELECTED: most frames one job may select
    partial_mb: float | None = None  # seed alias: only frames within the first N MB
    job_timeout_s: float = 60.0
    pooling: bool = True             # USE_CONNECTION_POOL=0 turns it off
    head_kb: int = 128               # first range: learns the size and the box layout
    processor: str = "engine.processors:stats"
    log_level: str = "INFO"
    max_rss_mb: int = 0              # ENGINE_MAX_RSS_MB: recycle a worker past it (0: never)
    report_sha256: bool = False      # ENGINE_REPORT_SHA256=1: hash of the fetched bytes
    # The supervisor's grace periods and timeouts (ENGINE_* overrides for the shortest).
    heartbeat_timeout_s: float = 10.0   # no heartbeat at all: stopped or gone (SIGSTOP)
    stall_timeout_s: float = 30.0       # busy without progress: stuck in C code or a loop
    stop_grace_s: float = 4.0           # stop request: in-flight jobs may finish this long
    worker_exit_s: float = 2.0          # a worker asked to exit, then it is killed
    quick_death_s: float = 2.0          # a death this soon after start counts as quick
    restart_backoff_s: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 5.0)   # by quick deaths
    max_clients: int = 64            # serve mode: more connections get "engine busy"
    cluster: str = ""                # ENGINE_CLUSTER: Ray address ("" : this machine only)
    cluster_jobs_per_engine: int = 2  # ENGINE_CLUSTER_JOBS_PER_ENGINE
    # Fences for untrusted URLs (engine.fences); off by default.
    allow_hosts: tuple[str, ...] = ()   # ENGINE_ALLOW_HOSTS: exact hosts or *.suffix
    deny_private: bool = False          # ENGINE_DENY_PRIVATE=1
    max_pixels: int | None = None       # ENGINE_MAX_PIXELS: width x height at most
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
        notes = []
        max_frames = _int(env, "ENGINE_MAX_FRAMES", None)
        partial_mb = None
        if env.get("PARTIAL_DOWNLOAD", "").strip() in ("1", "true", "True"):
            partial_mb = _float(env, "PARTIAL_DOWNLOAD_MB", 4.0)
        for name in ("CHUNKED_STREAMING", "STREAM_MIN_START_BYTES", "STREAM_BUFFER_TIMEOUT_S"):
            if name in env:
                notes.append(f"{name} is accepted and ignored: decoding always starts as soon "
                             "as the first frame's bytes are in")
        http2 = _choice(env, "ENGINE_HTTP2", "0", ("0", "1", "auto"))
        batch = _int(env, "ENGINE_BATCH", 16)
        return cls(
            fetchers=_int(env, "ENGINE_FETCHERS", 2),
            connections=_int(env, "ENGINE_CONNECTIONS", 4),
            range_mb=_float(env, "ENGINE_RANGE_MB", 2.0),
            http2=http2,
            keepalive_s=_float(env, "ENGINE_KEEPALIVE_S", 120.0),
            prewarm=tuple(o.strip() for o in env.get("ENGINE_PREWARM", "").split(",") if o.strip()),
            decoder=_choice(env, "ENGINE_DECODER", "auto", ("auto", "pyav", "decord")),
            decoders=_int(env, "ENGINE_DECODERS", 2),
            sws_threads=_int(env, "ENGINE_SWS_THREADS", 1, minimum=0),
            device=check_device(env.get("ENGINE_DEVICE", "auto") or "auto"),
            batch=batch,
            ring_mb=_float(env, "ENGINE_RING_MB", 200.0),
            ring_slots=_int(env, "ENGINE_RING_SLOTS", None, minimum=2),
            max_bytes=_int(env, "ENGINE_MAX_BYTES", 512 * 1024 * 1024),
            max_frames=max_frames,
            max_selected=_int(env, "ENGINE_MAX_SELECTED", None),
            partial_mb=partial_mb,
            job_timeout_s=_float(env, "ENGINE_JOB_TIMEOUT_S", 60.0),
            heartbeat_timeout_s=_float(env, "ENGINE_HEARTBEAT_TIMEOUT_S", 10.0),
            stall_timeout_s=_float(env, "ENGINE_STALL_TIMEOUT_S", 30.0),
            max_clients=_int(env, "ENGINE_MAX_CLIENTS", 64),
            pooling=env.get("USE_CONNECTION_POOL", "1").strip() not in ("0", "false", "False"),
            processor=env.get("ENGINE_PROCESSOR", "engine.processors:stats"),
            max_rss_mb=_int(env, "ENGINE_MAX_RSS_MB", 0, minimum=0),
            report_sha256=env.get("ENGINE_REPORT_SHA256", "0").strip() == "1",
            cluster=env.get("ENGINE_CLUSTER", "").strip(),
            cluster_jobs_per_engine=_int(env, "ENGINE_CLUSTER_JOBS_PER_ENGINE", 2),
            allow_hosts=env.get("ENGINE_ALLOW_HOSTS", ""),
            deny_private=_choice(env, "ENGINE_DENY_PRIVATE", "0", ("0", "1")) == "1",
            max_pixels=_int(env, "ENGINE_MAX_PIXELS", None),
            log_level=_choice(env, "ENGINE_LOG_LEVEL", "info",
                              ("debug", "info", "warning", "error")).upper(),
            notes=tuple(notes),
        )
