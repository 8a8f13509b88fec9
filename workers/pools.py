"""The fetcher's HTTP side: one pooled ``httpx.Client`` per origin, the protocol chosen
by measurement (``ENGINE_HTTP2=auto``), and what a server's answer means: network errors
as one line, ``Content-Range``, ``Content-Encoding``.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import statistics
import threading
import time
from urllib.parse import urlsplit

import httpx
from httpx._decoders import SUPPORTED_DECODERS

from engine.config import Config
from engine.errors import ErrorKind, first_line
from engine.messages import FetchStats
from engine.workers.guard import Guard, Refused

log = logging.getLogger("engine.fetcher")

KEEP_WARM_EVERY_S = 20.0
AUTO_SAMPLES = 4               # ENGINE_HTTP2=auto: ranges timed on each protocol
AUTO_MIN_BYTES = 256 * 1024    # smaller ranges time the round trip, not the protocol
READ_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 15.0


class RangeError(Exception):
    def __init__(self, message: str, retryable: bool, kind: ErrorKind = ErrorKind.FETCH):
        super().__init__(message)
        self.retryable = retryable
        self.kind = kind


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def ssl_context() -> ssl.SSLContext:
    """TLS is always verified; SSL_CERT_FILE (tests, private CAs) replaces the system store."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    return ssl.create_default_context(cafile=cafile)


def _root(exc: BaseException) -> BaseException:
    """The OS-level error under httpx's and httpcore's wrappers."""
    seen = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc


# By class, as httpcore's map_exceptions does: (httpx class, message, retryable)
_NETWORK = [
    (httpx.ReadTimeout, "read timed out", True),
    (httpx.TooManyRedirects, "too many redirects (more than 5)", False),
    (httpx.UnsupportedProtocol, "unsupported URL scheme ({})", False),
    ((httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.PoolTimeout,
      httpx.WriteTimeout), "connection dropped ({})", True),
]
# What a ConnectError stands on
_CONNECT = [
    (ssl.SSLError, "TLS failed ({})"),
    (socket.gaierror, "DNS lookup failed ({})"),
]


def describe(exc: Exception) -> tuple[str, bool]:
    """One line for a network error, and whether another attempt may succeed."""
    text = first_line(exc)
    if isinstance(exc, Refused):
        return text, False
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect timed out", False
    if isinstance(exc, httpx.ConnectError):
        root = _root(exc)
        for cls, message in _CONNECT:
            if isinstance(root, cls):
                return message.format(text), False
        return f"cannot connect ({text})", False
    for cls, message, retryable in _NETWORK:
        if isinstance(exc, cls):
            return message.format(text), retryable
    return f"{type(exc).__name__}: {text}", False


class Tracer:
    """httpcore trace hook: tells whether a request opened a new connection, and when."""

    def __init__(self, stats: FetchStats):
        self.stats = stats

    def __call__(self, event: str, info: dict) -> None:
        if event == "connection.connect_tcp.started":
            self.stats.new_connection = True
        elif event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            self.stats.connected = time.monotonic()


class Pools:
    """One client per origin (and protocol), created on first use and kept for the
    process' life.

    ``ENGINE_HTTP2=auto`` measures instead of guessing: while undecided for an origin, range
    requests alternate between an HTTP/1.1 and an HTTP/2 client; a server that answers the
    HTTP/2 client in HTTP/1.1 does not offer it; after ``AUTO_SAMPLES`` ranges each, the
    protocol with the higher median per-request throughput is kept for that origin.
    """

    def __init__(self, config: Config):
        self.config = config
        self.mode = config.http2
        if self.mode in ("1", "auto"):
            try:
                import h2  # noqa: F401
                log.info("HTTP/2 support enabled for connection pool")
            except ImportError:
                log.warning("ENGINE_HTTP2=%s but the h2 package is missing: using HTTP/1.1",
                            self.mode)
                self.mode = "0"
        self._clients: dict[tuple[str, bool], httpx.Client] = {}
        self._choice: dict[str, bool] = {}                  # auto: origin -> use HTTP/2
        self._samples: dict[tuple[str, bool], list[float]] = {}
        self._last_url: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._ssl = ssl_context()
        self._guard = Guard.of(config)

    @property
    def http2(self) -> bool:
        return self.mode == "1"

    def _new_client(self, http2: bool) -> httpx.Client:
        n = self.config.connections
        return httpx.Client(
            http1=True, http2=http2, verify=self._ssl, trust_env=False,
            follow_redirects=True, max_redirects=5,
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, pool=60.0),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n,
                                keepalive_expiry=self.config.keepalive_s),
            headers={"Accept-Encoding": "identity", "User-Agent": "engine/0.1"},
            event_hooks={"request": [self._guard] if self._guard else []})

    def _use_http2(self, origin: str) -> bool:
        if self.mode != "auto":
            return self.mode == "1"
        if origin in self._choice:
            return self._choice[origin]
        h1 = len(self._samples.get((origin, False), ()))
        h2 = len(self._samples.get((origin, True), ()))
        return h2 < h1

    def client(self, url: str, http2: bool | None = None) -> tuple[httpx.Client, bool, bool]:
        """(client, throwaway, is HTTP/2) for the URL's origin; with pooling off the
        client is a throwaway one."""
        origin = origin_of(url)
        with self._lock:
            if http2 is None:
                http2 = self._use_http2(origin)
            if not self.config.pooling:
                return self._new_client(http2), True, http2
            self._last_url[origin] = (url, time.monotonic())
            client = self._clients.get((origin, http2))
            if client is None:
                client = self._clients[(origin, http2)] = self._new_client(http2)
                log.info("Connection pool initialized for %s (%d connections, %s)", origin,
                         self.config.connections, "HTTP/2" if http2 else "HTTP/1.1")
            return client, False, http2

    def record(self, url: str, http2: bool, stats: FetchStats, nbytes: int) -> None:
        """A range finished: in auto mode, one more sample for the origin's decision."""
        if self.mode != "auto" or nbytes < AUTO_MIN_BYTES:
            return
        origin = origin_of(url)
        with self._lock:
            if origin in self._choice:
                return
            if http2 and stats.http_version != "HTTP/2":
                self._choice[origin] = False
                log.info("%s does not offer HTTP/2: using HTTP/1.1", origin)
                return
            samples = self._samples.setdefault((origin, http2), [])
            samples.append(nbytes / max(1e-6, time.monotonic() - stats.started))
            h1 = self._samples.get((origin, False), [])
            h2 = self._samples.get((origin, True), [])
            if len(h1) >= AUTO_SAMPLES and len(h2) >= AUTO_SAMPLES:
                faster = statistics.median(h2) > statistics.median(h1)
                self._choice[origin] = faster
                log.info("ENGINE_HTTP2=auto: %s measured %.1f MB/s per range on HTTP/2, %.1f "
                         "on HTTP/1.1: using %s", origin, statistics.median(h2) / 1e6,
                         statistics.median(h1) / 1e6, "HTTP/2" if faster else "HTTP/1.1")

    def prewarm(self, url: str) -> int:
        """Open every pooled connection to the URL's origin (TCP, TLS, one HEAD each).

        The requests are held open together so that each takes its own connection.
        Returns how many new connections were opened.
        """
        http2 = self._use_http2(origin_of(url))
        client, _, _ = self.client(url, http2)
        width = 1 if http2 else self.config.connections
        opened, responses, lock = [], [], threading.Lock()

        def one():
            stats = FetchStats()
            try:
                head = client.build_request("HEAD", url, extensions={"trace": Tracer(stats)})
                r = client.send(head, stream=True)
                with lock:
                    responses.append(r)
                    opened.append(stats.new_connection)
            except httpx.HTTPError as exc:
                log.info("prewarm of %s failed: %s", origin_of(url), describe(exc)[0])

        threads = [threading.Thread(target=one) for _ in range(width)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in responses:
            try:
                r.read()   # an unread response would close its connection instead of pooling it
            except httpx.HTTPError:
                pass
            r.close()
        return sum(opened)

    def keep_warm(self) -> None:
        cutoff = time.monotonic() - self.config.keepalive_s
        with self._lock:
            recent = [url for url, used in self._last_url.values() if used > cutoff]
        for url in recent:
            self.prewarm(url)


def hang_up(response) -> None:
    """Wake a thread blocked reading a response whose job has ended (a stalled server
    would hold it until the read timeout): shut its socket down. It costs nothing: a
    response closed before its end drops its connection anyway. HTTP/1.1 only, since an
    HTTP/2 connection carries other jobs' streams too."""
    if response.http_version != "HTTP/1.1":
        return
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        try:   # the plain-socket shutdown: an SSLSocket's own would drop its TLS state
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


def content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes a-b/N`` as ``(a, b + 1, N)``; N None for ``*``, a total the server does not
    know yet (RFC 9110). None: missing or unusable."""
    m = _CONTENT_RANGE.fullmatch((value or "").strip())
    if m is None:
        return None
    first, end = int(m[1]), int(m[2]) + 1
    total = None if m[3] == "*" else int(m[3])
    if end <= first or (total is not None and end > total):
        return None
    return first, end, total


def codings(response) -> list[str]:
    """The Content-Encoding the server applied, though the engine asked for none
    (``Accept-Encoding: identity``)."""
    named = [c.strip().lower() for c in response.headers.get_list("content-encoding",
                                                                  split_commas=True)]
    return [c for c in named if c not in ("", "identity")]


def body(response, whole: bool):
    """The body's bytes: as sent, or decoded where the server encoded the whole file. An
    encoded part of the file cannot be placed in it: refused."""
    if not codings(response):
        return response.iter_raw()
    named = ", ".join(codings(response))
    if not whole:
        raise RangeError(f"the server encoded a byte range ({named}, Content-Encoding) "
                         "though the engine asked for none: its bytes cannot be placed", False)
    unknown = [c for c in codings(response) if c not in SUPPORTED_DECODERS]
    if unknown:
        raise RangeError(f"unsupported Content-Encoding {unknown[0]!r} (the engine asked "
                         "for none)", False)
    return response.iter_bytes()
