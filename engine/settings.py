"""Every environment variable the engine reads, in one table: its name, the `Config` field
it fills, its kind, its default and one line of meaning.

`Config` takes its defaults from here and `Config.from_env` reads each row by its kind, so
a default is written once. The README's configuration tables are printed from this
module (`python -m engine.settings`, or `--write README.md` to replace them in place
between their markers); a test fails when the README differs.

Data only: the parsing (and its error messages) is in `engine.config`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


@dataclass(frozen=True)
class Setting:
    env: str
    field: str | None       # the Config field it fills; None: read where it is used
    kind: str               # a key of engine.config's readers
    default: object
    meaning: str
    choices: tuple[str, ...] = ()
    minimum: int = 1
    shown: str | None = None    # the default as a reader says it, where the value does not

    @property
    def type_text(self) -> str:
        return {"int": f"integer >= {self.minimum}", "frames": "integer >= 1, or all",
                "float": "number > 0", "choice": " \\| ".join(self.choices),
                "level": " \\| ".join(self.choices),
                "switch": "0 \\| 1", "flag": "1: on", "list": "comma-separated",
                "hosts": "comma-separated", "device": "auto \\| cpu \\| cuda[:N]",
                "ms": "number >= 0", "text": "text", "path": "path"}[self.kind]

    @property
    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)


_LEVELS = ("debug", "info", "warning", "error")

SETTINGS: tuple[Setting, ...] = (
    Setting("ENGINE_FETCHERS", "fetchers", "int", 2, "fetcher processes"),
    Setting("ENGINE_CONNECTIONS", "connections", "int", 4,
            "pooled connections per fetcher and host"),
    Setting("ENGINE_RANGE_MB", "range_mb", "float", 2.0,
            "size of a byte range request after the first"),
    Setting("ENGINE_HTTP2", "http2", "choice", "0",
            "HTTP/2 off, on, or auto (measure both per origin, keep the faster)",
            choices=("0", "1", "auto")),
    Setting("ENGINE_KEEPALIVE_S", "keepalive_s", "float", 120.0,
            "how long an idle pooled connection is kept (and kept warm)"),
    Setting("ENGINE_PREWARM", "prewarm", "list", (), "origins to connect to at start",
            shown="(none)"),
    Setting("ENGINE_DECODER", "decoder", "choice", "auto", "decoder backend (auto is PyAV)",
            choices=("auto", "pyav", "decord")),
    Setting("ENGINE_DECODERS", "decoders", "int", 2, "decoder processes (jobs decoded at once)"),
    Setting("ENGINE_DECODE_LANES", "decode_lanes", "int", 2,
            "threads of one decoder decoding a sparse job's GOP spans at once"),
    Setting("ENGINE_SWS_THREADS", "sws_threads", "int", 1,
            "swscale threads per frame's RGB conversion (0: one per CPU, PyAV's default)",
            minimum=0),
    Setting("ENGINE_DEVICE", "device", "device", "auto",
            "the processor's device (auto: cuda:0 when torch sees a GPU, else cpu)"),
    Setting("ENGINE_BATCH", "batch", "int", 16, "frames per batch to the processor"),
    Setting("ENGINE_RING_MB", "ring_mb", "float", 200.0,
            "a job's frame ring at most: two batches of frames, fewer when /dev/shm is tight"),
    Setting("ENGINE_RING_SLOTS", "ring_slots", "int", None,
            "a fixed number of frame slots per job instead (tests)", minimum=2,
            shown="(from ENGINE_RING_MB)"),
    Setting("ENGINE_MAX_BYTES", "max_bytes", "int", 512 * 1024 * 1024,
            "largest video accepted; also what the videos of all jobs in flight may hold "
            "(past it a job waits)"),
    Setting("ENGINE_MAX_FRAMES", "max_frames", "frames", None,
            "process only the first N frames, fetching only the bytes they need", shown="all"),
    Setting("ENGINE_MAX_SELECTED", "max_selected", "int", None,
            "most frames one job may select", shown="(no limit)"),
    Setting("ENGINE_JOB_TIMEOUT_S", "job_timeout_s", "float", 60.0, "a job's deadline"),
    Setting("ENGINE_HEARTBEAT_TIMEOUT_S", "heartbeat_timeout_s", "float", 10.0,
            "a worker with no heartbeat this long (stopped, frozen) is killed and replaced"),
    Setting("ENGINE_STALL_TIMEOUT_S", "stall_timeout_s", "float", 30.0,
            "a worker busy this long without progress is killed and replaced"),
    Setting("ENGINE_MAX_CLIENTS", "max_clients", "int", 64,
            "serve mode: connections at once; past it a new one gets \"engine busy\""),
    Setting("ENGINE_PROCESSOR", "processor", "text", "engine.processors:stats",
            "the engine's default processor (`module:factory`)"),
    Setting("ENGINE_MAX_RSS_MB", "max_rss_mb", "int", 0,
            "recycle a worker whose RSS passes this, between jobs (0: never)", minimum=0),
    Setting("ENGINE_REPORT_SHA256", "report_sha256", "flag", False,
            "put the SHA-256 of the fetched bytes in the report", shown="0"),
    Setting("ENGINE_CLUSTER", "cluster", "text", "",
            "Ray address of a cluster to run on (auto: the cluster this machine is a node of)",
            shown="(none: one machine)"),
    Setting("ENGINE_CLUSTER_JOBS_PER_ENGINE", "cluster_jobs_per_engine", "int", 2,
            "jobs in flight per engine of a cluster"),
    Setting("ENGINE_ALLOW_HOSTS", "allow_hosts", "hosts", (),
            "hosts (exact, or `*.suffix`) jobs may fetch from; others refused before "
            "connecting", shown="(any)"),
    Setting("ENGINE_DENY_PRIVATE", "deny_private", "switch", False,
            "1: refuse non-global addresses (the address connected to, every redirect hop)",
            shown="0"),
    Setting("ENGINE_MAX_PIXELS", "max_pixels", "int", None,
            "largest width x height accepted, refused from the header", shown="(no limit)"),
    Setting("ENGINE_LOG_LEVEL", "log_level", "level", "INFO", "log level", choices=_LEVELS,
            shown="info (warning for the CLI)"),
    Setting("ENGINE_SOCKET", None, "path", None, "serve-mode socket path",
            shown="`$XDG_RUNTIME_DIR/engine.sock`, else `/tmp/engine-$UID.sock`"),
    Setting("ENGINE_WAIT_MS_PER_FRAME", None, "ms", 4.0,
            "what `engine.processors:wait` holds per frame, ms"),
    Setting("SSL_CERT_FILE", None, "path", None,
            "CA bundle for verifying HTTPS (TLS is always verified)", shown="system store"),
)

# The seed miner's variables, read as aliases (engine.config parses them).
ALIASES: tuple[tuple[str, str], ...] = (
    ("`USE_CONNECTION_POOL=0`", "every request on a new connection (for diagnosis)"),
    ("`PARTIAL_DOWNLOAD=1`, `PARTIAL_DOWNLOAD_MB=N` (default 4)",
     "process only the frames whose bytes (from the sample tables) lie in the first N MB"),
    ("`CHUNKED_STREAMING`, `STREAM_MIN_START_BYTES`, `STREAM_BUFFER_TIMEOUT_S`",
     "accepted and ignored, with one log line: decoding always starts as soon as the "
     "first frame's bytes are in"),
)

DEFAULTS = {s.field: s.default for s in SETTINGS if s.field}


def setting(env: str) -> Setting:
    return next(s for s in SETTINGS if s.env == env)


def settings_markdown() -> str:
    """The README's two configuration tables, between their markers."""
    rows = ["| variable | `Engine(...)` | type | default | meaning |", "|---|---|---|---|---|"]
    rows += [f"| `{s.env}` | {f'`{s.field}=`' if s.field else '-'} | {s.type_text} "
             f"| {s.default_text} | {s.meaning} |" for s in SETTINGS]
    rows += ["", "The seed miner's variables are read as aliases:", "",
             "| seed variable | here |", "|---|---|"]
    rows += [f"| {name} | {meaning} |" for name, meaning in ALIASES]
    return "\n".join([BEGIN, *rows, END])


def replace_block(text: str) -> str:
    """text with what stands between the markers replaced by the generated tables."""
    head, _, rest = text.partition(BEGIN)
    _, found, tail = rest.partition(END)
    if not found:
        raise SystemExit(f"no {BEGIN} ... {END} block to replace")
    return head + settings_markdown() + tail


def main(argv: list[str]) -> int:
    if argv[:1] == ["--write"] and len(argv) == 2:
        path = Path(argv[1])
        path.write_text(replace_block(path.read_text()))
        return 0
    if argv:
        print("usage: python -m engine.settings [--write README.md]", file=sys.stderr)
        return 2
    print(settings_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
