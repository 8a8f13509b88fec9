"""``python -m engine diagnose URL``: where the time goes, stage by stage.

Three parts, one screen:

1. The network, measured directly from this process for the URL's host: DNS
   (``getaddrinfo``), TCP connect, TLS handshake (the engine's trust rules:
   ``SSL_CERT_FILE`` else the system store; ALPN offered h2,http/1.1) and the
   first response byte of a one-byte ``Range`` GET over HTTP/1.1. A bad URL fails
   here, naming the stage, before any engine is started.
2. The engine: one job on a freshly started engine (cold: the fetchers open their
   connections) and the same job again (warm: pooled connections, all of them opened
   by a prewarm first, as a running miner's engine has them), side by side, as
   seconds since submit with the wait since the previous event.
3. The verdict: the dominant stage (largest wait in the warm waterfall, or the
   connection set-up that the cold job pays) and the setting to change.

The engine runs the ``engine.processors:null`` processor on the CPU, so the
figures are the pipeline's own (network, decode), not a model's.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import ssl
import sys
import textwrap
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 15.0
WIDTH = 100

# (report key, label, what waiting on it means)
STAGES = [
    ("connect", "connect", "setup"),
    ("first_byte", "first byte", "rtt"),
    ("moov_ready", "moov located", "moov"),
    ("first_frame", "first frame decoded", "decode"),
    ("first_result", "first result", "processor"),
    ("download_done", "all bytes (download)", "transfer"),
    ("decode_done", "all frames (decode)", "decode"),
    ("total", "total (all results)", "processor"),
]
LABEL = {key: label for key, label, _ in STAGES}
# How the verdict names a stage whose wait dominates.
CAUSE = {"connect": "connection set-up", "first_byte": "first byte (request round trip)",
         "moov_ready": "moov located", "first_frame": "first frame decoded (decoder start)",
         "first_result": "first result (processor start)",
         "download_done": "transfer (all bytes)", "decode_done": "decode (all frames)",
         "total": "processor (results after the last frame)"}
KIND = {key: kind for key, _, kind in STAGES}


class ProbeError(Exception):
    """A network stage failed; the message is one line naming the stage."""


@dataclass
class Probe:
    scheme: str
    host: str
    port: int
    address: str = ""
    family: str = ""
    dns_s: float | None = None
    tcp_s: float | None = None
    tls_s: float | None = None
    tls_version: str | None = None
    alpn: str | None = None
    first_byte_s: float | None = None
    first_byte_note: str = ""
    status: int | None = None
    reason: str = ""
    size: int | None = None
    location: str | None = None
    notes: list = field(default_factory=list)

    @property
    def setup_s(self) -> float:
        return sum(x for x in (self.dns_s, self.tcp_s, self.tls_s) if x)


# ---------------------------------------------------------------------- network probe
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, (socket.timeout, TimeoutError)) and not text:
        text = "timed out"
    return text or type(exc).__name__


def ssl_context(alpn: list[str]) -> ssl.SSLContext:
    """The engine's trust rules (workers.fetcher.ssl_context), plus ALPN."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    try:
        ctx = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ProbeError(f"TLS: cannot load SSL_CERT_FILE={cafile} ({_one_line(exc)})") from None
    ctx.set_alpn_protocols(alpn)
    return ctx


def _connect(addrs, port: int) -> tuple[socket.socket, str]:
    last = None
    for *_, sockaddr in addrs:
        try:
            sock = socket.create_connection((sockaddr[0], port), timeout=PROBE_TIMEOUT_S)
            return sock, sockaddr[0]
        except OSError as exc:
            last = exc
    raise last or OSError("no address")


def _tls(sock: socket.socket, host: str, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    tls = ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    tls.settimeout(PROBE_TIMEOUT_S)
    tls.do_handshake()
    return tls


def probe(url: str) -> Probe:
    """Time DNS, TCP, TLS and the first byte for the URL; raise ProbeError on failure."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ProbeError(f"unsupported URL scheme {parts.scheme or '(none)'!r} in {url} "
                         "(expected http or https)")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ProbeError(f"bad URL {url}: {exc}") from None
    if not host:
        raise ProbeError(f"no host in URL {url}")
    port = port or (443 if scheme == "https" else 80)
    p = Probe(scheme, host, port)

    t = time.perf_counter()
    try:
        addrs = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ProbeError(f"DNS lookup of {host!r} failed ({_one_line(exc)})") from None
    p.dns_s = time.perf_counter() - t
    p.address = addrs[0][4][0]
    p.family = "IPv6" if addrs[0][0] == socket.AF_INET6 else "IPv4"

    t = time.perf_counter()
    try:
        sock, p.address = _connect(addrs, port)
    except OSError as exc:
        why = "connection refused" if isinstance(exc, ConnectionRefusedError) else _one_line(exc)
        raise ProbeError(f"TCP connect to {host}:{port} failed ({why})") from None
    p.tcp_s = time.perf_counter() - t
    p.family = "IPv6" if sock.family == socket.AF_INET6 else "IPv4"

    try:
        if scheme == "https":
            ctx = ssl_context(["h2", "http/1.1"])   # loading the CA store is not the handshake
            t = time.perf_counter()
            try:
                sock = _tls(sock, host, ctx)
            except (ssl.SSLError, OSError) as exc:
                raise ProbeError(f"TLS handshake with {host}:{port} failed "
                                 f"({_one_line(exc)})") from None
            p.tls_s = time.perf_counter() - t
            p.tls_version = sock.version()
            p.alpn = sock.selected_alpn_protocol()
            if p.alpn == "h2":
                # The server would expect HTTP/2 frames on this connection: ask again
                # for HTTP/1.1 only, on a fresh connection (not timed: set-up is above).
                sock.close()
                p.first_byte_note = "2nd connection, http/1.1 only"
                try:
                    sock = _tls(_connect(addrs, port)[0], host, ssl_context(["http/1.1"]))
                except (ssl.SSLError, OSError) as exc:
                    raise ProbeError(f"TLS handshake (http/1.1) with {host}:{port} failed "
                                     f"({_one_line(exc)})") from None
        _first_byte(sock, parts, p)
    finally:
        sock.close()
    return p


def _first_byte(sock: socket.socket, parts, p: Probe) -> None:
    netloc = parts.netloc.rsplit("@", 1)[-1]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = (f"GET {target} HTTP/1.1\r\nHost: {netloc}\r\nRange: bytes=0-0\r\n"
               "User-Agent: engine-diagnose/0.1\r\nAccept-Encoding: identity\r\n"
               "Connection: close\r\n\r\n").encode("latin-1", "replace")
    sock.settimeout(PROBE_TIMEOUT_S)
    try:
        t = time.perf_counter()
        sock.sendall(request)
        data = sock.recv(65536)
        p.first_byte_s = time.perf_counter() - t
        if not data:
            raise ProbeError(f"first byte: {p.host} closed the connection without answering")
        while b"\r\n\r\n" not in data and len(data) < 65536:
            more = sock.recv(65536)
            if not more:
                break
            data += more
    except (OSError, ssl.SSLError) as exc:
        raise ProbeError(f"first byte from {p.host}:{p.port} failed ({_one_line(exc)})") from None
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = head[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/") or not status[1].isdigit():
        raise ProbeError(f"first byte: not an HTTP response from {p.host}:{p.port} "
                         f"({head[0][:60]!r})")
    p.status, p.reason = int(status[1]), (status[2] if len(status) > 2 else "")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    total = headers.get("content-range", "").rsplit("/", 1)[-1]
    if total.isdigit():
        p.size = int(total)
    elif p.status == 200 and headers.get("content-length", "").isdigit():
        p.size = int(headers["content-length"])
    p.location = headers.get("location")
    if p.status >= 400:
        url = f"{parts.scheme}://{parts.netloc}{parts.path}"
        raise ProbeError(f"first byte: HTTP {p.status} {p.reason}".rstrip() + f" for {url}")


# ---------------------------------------------------------------------- formatting
def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "      -"
    return f"{seconds * 1000:7.1f} ms" if seconds < 10 else f"{seconds:7.2f} s "


def _short(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


def _mb(n) -> str:
    return f"{n / 1e6:.2f} MB" if n is not None else "? MB"


def increments(timings: dict) -> dict:
    """Each event's wait since the event before it in time (the waterfall's steps)."""
    events = sorted((t, key) for key, t in timings.items() if t is not None)
    out, prev = {}, 0.0
    for at, key in events:
        out[key] = max(0.0, at - prev)
        prev = at
    return out


def dominant(timings: dict) -> tuple[str, float] | None:
    inc = increments(timings)
    if not inc:
        return None
    key = max(inc, key=inc.get)
    return key, inc[key]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


def _column(t: dict, inc: dict, key: str, mark: bool) -> str:
    at = t.get(key)
    if at is None:
        return f"{'-':>7}{'':17}"
    return f"{at:7.3f} (+{inc.get(key, 0.0):.3f}){'*' if mark else ' ':<8}"


def _throughput(r: dict) -> str:
    t, n = r["timings_s"], r["fetch"].get("bytes") or 0
    dl, fb = t.get("download_done"), t.get("first_byte")
    if dl is None or fb is None or dl <= fb or not n:
        return "-"
    return f"{n / (dl - fb) / 1e6:.1f} MB/s"


# ---------------------------------------------------------------------- verdict
def advice(kind: str, r: dict, cfg, url: str, p: Probe) -> str:
    """What to change when waiting on this kind of stage dominates."""
    origin = _origin(url)
    f, v = r["fetch"], r["video"]
    if kind == "setup":
        if f.get("connections_new") and not f.get("connections_reused"):
            return ("the server did not keep connections alive (every job opened new ones, "
                    f"{f.get('http_version') or 'HTTP/1.x'}), so pooling and prewarm cannot help: "
                    "use a CDN/origin with keep-alive (HTTP/1.1 or HTTP/2)")
        if origin in {_origin(o) for o in cfg.prewarm or ()}:
            return ("ENGINE_PREWARM already names this origin; the rest of the set-up is the "
                    "fetcher's own first use (it is paid once per engine)")
        return (f"set ENGINE_PREWARM={origin} (or call Engine.prewarm) so connections are "
                "open before the first job")
    if kind in ("rtt", "moov"):
        text = (f"RTT-bound (first byte {_short(p.first_byte_s or 0)} from here): set "
                f"ENGINE_PREWARM={origin} to keep connections open; raise ENGINE_RANGE_MB "
                f"(now {cfg.range_mb:g}) for fewer round trips")
        if kind == "moov" and v.get("moov") == "end":
            text = ("the moov is at the end of the file, costing an extra round trip before "
                    "decoding: re-mux with faststart (ffmpeg -movflags +faststart); " + text)
        if p.alpn == "h2" and cfg.http2 != "1":
            text += "; the server speaks h2: try ENGINE_HTTP2=1"
        return text
    if kind == "transfer":
        slots = cfg.fetchers * cfg.connections
        ranges = f.get("ranges") or 0
        text = (f"transfer is the bound ({_throughput(r)} over {ranges} ranges): raise "
                f"ENGINE_CONNECTIONS (now {cfg.connections}) / ENGINE_FETCHERS (now "
                f"{cfg.fetchers}) for more aggregate bandwidth, or ENGINE_RANGE_MB "
                f"(now {cfg.range_mb:g})")
        if ranges < slots:
            text += (f"; only {ranges} range(s) for {slots} connections: a smaller "
                     "ENGINE_RANGE_MB spreads the file over more of them")
        return text
    if kind == "decode":
        now = r.get("decoder") or cfg.decoder
        other = "decord" if now != "decord" else "pyav"
        have = other == "pyav" or importlib.util.find_spec("decord") is not None
        return (f"decoding is the bound (decoder {now}): try ENGINE_DECODER={other}"
                + ("" if have else " (needs decord installed)")
                + ", more cores / a GPU decoder; ENGINE_MAX_FRAMES if you need fewer frames")
    return (f"the processor is the bound: results came after the frames (here the null "
            f"processor, so this is the engine's result path): use the GPU (ENGINE_DEVICE=cuda), "
            f"a larger ENGINE_BATCH (now {cfg.batch}), a lighter model")


def _wrap(head: str, text: str) -> str:
    return textwrap.fill(text, width=WIDTH, initial_indent=head,
                         subsequent_indent=" " * len(head), break_on_hyphens=False)


def cold_penalty(cold: dict, warm: dict) -> list[tuple[str, float]]:
    """The stages where the cold job waited longer than the warm one, largest first."""
    ci, wi = increments(cold["timings_s"]), increments(warm["timings_s"])
    extra = [(key, ci[key] - wi.get(key, 0.0)) for key in ci if key != "total"]
    return sorted([kv for kv in extra if kv[1] > 0.001], key=lambda kv: -kv[1])


def verdict(cold: dict, warm: dict, cfg, url: str, p: Probe) -> list[str]:
    wt, ct = warm["timings_s"], cold["timings_s"]
    wdom = dominant(wt)
    total_w = wt.get("total") or 0.0
    # What the cold job pays on top: connection set-up (network + the fetcher's first use).
    cold_setup = max(0.0, (ct.get("connect") or 0.0) - (wt.get("connect") or 0.0))
    cold_extra = (ct.get("total") or 0.0) - total_w
    net = [(k, v) for k, v in (("DNS", p.dns_s), ("TCP connect", p.tcp_s), ("TLS", p.tls_s))
           if v is not None]
    net_name, net_s = max(net, key=lambda kv: kv[1])
    network = f"network DNS+TCP+TLS {_short(p.setup_s)}, largest {net_name} {_short(net_s)}"
    setup_first = wdom is None or cold_setup > wdom[1]
    lines = []
    if setup_first:
        rest = ("; the rest is the fetcher's first use" if cold_setup > 2 * p.setup_s + 0.01
                else "")
        lines.append(_wrap("dominant: ", f"connection set-up on the cold job, {cold_setup:.3f} s "
                           f"({network}{rest})"))
    if wdom is not None:
        key, dt = wdom
        share = f" ({100 * dt / total_w:.0f}%)" if total_w else ""
        text = f"{CAUSE[key]}: waited {dt:.3f} s of the warm job's {total_w:.3f} s{share}"
        lines.append(_wrap("  warm:   " if setup_first else "dominant: ", text))
    penalty = ", ".join(f"{LABEL[k]} +{d:.3f}" for k, d in cold_penalty(cold, warm)[:3])
    text = f"{cold_extra:+.3f} s against warm" + (f": {penalty}" if penalty else "")
    if not setup_first:
        text += f" (connection set-up {cold_setup:.3f} s; {network})"
    lines.append(_wrap("  cold:   ", text))
    kinds = (["setup"] if setup_first else []) + ([KIND[wdom[0]]] if wdom else [])
    if not setup_first and cold_setup > 0.2 * wdom[1]:
        kinds.append("setup")
    seen = []
    for kind in kinds:
        text = advice(kind, warm, cfg, url, p)
        if text not in seen:
            seen.append(text)
            lines.append(_wrap("change: " if len(seen) == 1 else "  then: ", text))
    return lines


# ---------------------------------------------------------------------- the command
def _stop(eng) -> None:
    """Stop an engine quickly: SIGTERM is the supervisor's own stop path (closing the
    pipe alone is not seen while the client's reader thread is blocked on it)."""
    try:
        if getattr(eng, "_process", None) is not None and eng._process.poll() is None:
            os.kill(eng.pid, signal.SIGTERM)
    except OSError:
        pass
    eng.close()


def _err(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def diagnose(url: str) -> int:
    """Print the cold and warm waterfalls of URL and the dominant stage; exit code."""
    try:
        return _diagnose(url)
    except ProbeError as exc:
        return _err(str(exc))
    except KeyboardInterrupt:
        raise
    except Exception as exc:   # the contract: one line, never a traceback
        return _err(f"{type(exc).__name__}: {_one_line(exc)}")


def _diagnose(url: str) -> int:
    p = probe(url)
    print("\n".join(_network_lines(url, p)), flush=True)
    reports, cfg, error = _cold_and_warm(url)
    if error:
        return _err(error)
    print("\n".join(_stage_lines(reports["cold"], reports["warm"], cfg, url, p)), flush=True)
    return 0


def _network_lines(url: str, p) -> list[str]:
    out = [f"diagnose {url}",
           f"network, measured from this process ({p.host} port {p.port}, {p.address} {p.family})",
           f"  {'DNS':<20}{_ms(p.dns_s)}",
           f"  {'TCP connect':<20}{_ms(p.tcp_s)}"]
    if p.scheme == "https":
        out.append(f"  {'TLS':<20}{_ms(p.tls_s)}  {p.tls_version}, ALPN {p.alpn or 'none'} "
                   "(offered h2,http/1.1)")
    else:
        out.append(f"  {'TLS':<20}      -     (http: no TLS)")
    status = f"HTTP/1.1 {p.status} {p.reason}".rstrip()
    extra = f", file {_mb(p.size)}" if p.size is not None else ""
    if p.location:
        extra += f", redirects to {p.location[:60]}"
    if p.first_byte_note:
        extra += f" ({p.first_byte_note})"
    out.append(_wrap(f"  {'first byte':<20}{_ms(p.first_byte_s)}  ", f"{status}{extra}"))
    return out


def _cold_and_warm(url: str):
    """The URL's job on a fresh engine (cold), then again with its pool open (warm):
    ``(reports, config, error)``."""
    from engine.api import Engine
    from engine.errors import EngineError

    t = time.perf_counter()
    try:
        eng = Engine(processor="engine.processors:null", device="cpu")
    except EngineError as exc:
        return None, None, f"engine start failed: {_one_line(exc)}"
    started = time.perf_counter() - t
    try:
        cfg = eng.config
        pre = f", prewarm {','.join(cfg.prewarm)}" if cfg.prewarm else ""
        print(_wrap(f"{'engine start':<22}", f"{started:5.2f} s  (not in the waterfall; "
                    f"{cfg.fetchers} fetchers x {cfg.connections} connections, ranges "
                    f"{cfg.range_mb:g} MB, HTTP/2 {cfg.http2}, decoder {cfg.decoder}{pre})"),
              flush=True)
        reports = {}
        for name in ("cold", "warm"):
            if name == "warm":
                # every pooled connection open, as a running miner's engine has them: the
                # cold job may have needed fewer at once than the warm one will
                eng.prewarm([_origin(url) + "/"])
            report = eng.report(url)
            if not report.ok:
                return None, cfg, f"{name} job failed: {report.error}"
            reports[name] = report.to_dict()
    finally:
        _stop(eng)
    return reports, cfg, None


def _stage_lines(cold: dict, warm: dict, cfg, url: str, p) -> list[str]:
    ct, wt = cold["timings_s"], warm["timings_s"]
    ci, wi = increments(ct), increments(wt)
    cd, wd = dominant(ct), dominant(wt)
    out = ["engine stages: seconds since submit (+ wait since the previous event), * largest",
           f"  {'stage':<22}{'cold':>7}{'':17}{'warm':>7}"]
    for key, label, _ in STAGES:
        out.append(f"  {label:<22}{_column(ct, ci, key, cd and cd[0] == key)}"
                   f"{_column(wt, wi, key, wd and wd[0] == key)}".rstrip())
    cf, wf = cold["fetch"], warm["fetch"]
    for label, a, b in (("connections new", cf["connections_new"], wf["connections_new"]),
                        ("connections reused", cf["connections_reused"], wf["connections_reused"]),
                        ("HTTP version", cf["http_version"] or "-", wf["http_version"] or "-"),
                        ("ranges / retries", f"{cf['ranges']} / {cf['retries']}",
                         f"{wf['ranges']} / {wf['retries']}"),
                        ("throughput", _throughput(cold), _throughput(warm))):
        out.append(f"  {label:<22}{str(a):>7}{'':17}{str(b):>7}")
    v = warm["video"]
    out.append(_wrap("video: ", f"{v.get('codec')} {v.get('width')}x{v.get('height')} "
                     f"{v.get('fps')} fps, {v.get('frames')} frames, {_mb(v.get('bytes'))}, "
                     f"moov at {v.get('moov')}, {warm['frames_processed']} processed, decoder "
                     f"{warm.get('decoder') or '-'}"))
    return out + verdict(cold, warm, cfg, url, p)
