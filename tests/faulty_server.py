"""A small real HTTPS server that misbehaves on purpose.

Why: nginx (engine/demo/nginx.py) is always correct, but the engine must
survive servers and networks that are not: connections that die mid-body,
truncated bodies, bodies longer than the range asked for, and transfers
that stall.  This server speaks just enough HTTP/1.1 (keep-alive, GET/HEAD,
``Range: bytes=a-b`` / ``bytes=a-`` answered with 206 + Content-Range) over
TLS with the same certificate as NginxCDN, and serves one byte string at
every path.  ALPN offers only http/1.1, so HTTP/2 clients fall back.

Modes and what httpx (0.28, HTTP/1.1) surfaces:
  'ok'         correct responses (control).
  'drop-once'  the first ranged response whose range does not start at 0
               sends its headers and half its body, then closes the
               connection (TCP FIN, no TLS close_notify); httpx raises
               httpx.RemoteProtocolError ("peer closed connection without
               sending complete message body").  Later requests are fine.
  'short'      every response announces the full length but sends half the
               body and closes: httpx.RemoteProtocolError on every request.
  'long'       ranged requests get ``206`` with the honest Content-Range
               ``bytes a-b/total`` but a Content-Length and body that are
               half as long again: the requested bytes followed by 0xEE
               garbage.  httpx frames by Content-Length, so it raises nothing
               and returns the longer body; only a client that checks
               len(body) against the Content-Range span notices.
               (Garbage sent *after* an honest Content-Length is not seen
               with the response: httpx returns the right body, then fails
               the next request on that connection with RemoteProtocolError
               "illegal status line" -- an error pinned on the wrong request,
               which is why this mode lies in Content-Length instead.)
  'chunked'    every GET is answered 200 with the whole body in
               ``Transfer-Encoding: chunked`` (Range ignored, no Content-Length),
               16 KiB a chunk.
  'eof'        every GET is answered 200 with the whole body, no Content-Length
               and no chunking: the body ends where the server closes (HTTP/1.0
               style).
  'stall'      every GET sends headers and the first 64 KiB of its body
               (less one byte if the body is smaller), then holds the
               connection open, sending nothing, until stop() or until the
               client hangs up (counted in ``hung_up``): httpx raises
               httpx.ReadTimeout once its read timeout passes.

Legal answers that nginx never gives (RFC 9110 allows each):
  'whole-later' a range starting at 0 is answered 206; any other range gets 200 with
               the whole body, as a CDN edge that has the file's first bytes cached
               forwards a cache miss to an origin without Range support.
  'star'       every 206 gives its total as unknown: ``Content-Range: bytes a-b/*``.
  'star-head'  only a range starting at 0 does (``bytes 0-b/*``); later ones give it.
  'short-range' a 206 brings at most ``SHORT_SPAN`` bytes, its Content-Range honest
               and shorter than the range asked for.
  'gzip'       every GET is answered 200 with the whole body gzip-encoded
               (``Content-Encoding: gzip``, the encoded length), Range ignored.
  'gzip-range' ranges are answered 206 with the range's bytes gzip-encoded.

In every mode but 'chunked', 'eof' and 'gzip', a range starting at or past the end
is answered 416 with ``Content-Range: bytes */total``, as nginx does.
"""

from __future__ import annotations

import gzip
import re
import socket
import ssl
import threading

MODES = ("ok", "drop-once", "short", "long", "stall", "chunked", "eof", "whole-later", "star",
         "star-head", "short-range", "gzip", "gzip-range")
STALL_PREFIX = 64 * 1024
SHORT_SPAN = 48 * 1024 + 1   # not a multiple of the engine's 64 KiB chunks
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class FaultyServer:
    def __init__(self, data: bytes, *, certfile, keyfile, mode: str = "ok",
                 content_type: str | None = "video/mp4"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.data, self.mode, self.content_type = data, mode, content_type
        self.requests = 0  # requests whose response we started to send
        self.targets: list[str] = []   # the request target (path and query) of each
        self.asked: list[tuple[str, str]] = []   # (target, its Range header or "") of each
        self.stalled = 0   # 'stall': responses held open
        self.hung_up = 0   # 'stall': of those, the ones the client closed
        self.port: int | None = None
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(str(certfile), str(keyfile))
        self._ctx.set_alpn_protocols(["http/1.1"])
        self._lock = threading.Lock()
        self._dropped = False
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._clients: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    def url(self, path: str = "file.mp4") -> str:
        return f"https://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def start(self) -> "FaultyServer":
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # so the accept loop notices stop()
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            clients = list(self._clients)
        for sock in clients:
            try:  # the plain-socket shutdown wakes a thread blocked in recv/send
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self) -> "FaultyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------
    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                raw, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            raw.settimeout(None)
            with self._lock:
                self._clients.add(raw)
            self._spawn(self._serve, raw)

    def _serve(self, raw: socket.socket) -> None:
        conn = reader = None
        try:
            raw.settimeout(10)  # handshake only
            conn = self._ctx.wrap_socket(raw, server_side=True)
            conn.settimeout(None)
            with self._lock:
                self._clients.add(conn)
            reader = conn.makefile("rb")
            while not self._stopping.is_set():
                request = _read_request(reader)
                if request is None or not self._respond(conn, *request):
                    return
        except (OSError, ValueError):
            pass  # client went away, handshake failed, or stop() shut us down
        finally:
            for sock in (conn, raw):
                if sock is not None:
                    with self._lock:
                        self._clients.discard(sock)
            if reader is not None:
                reader.close()  # else it keeps the fd open after conn.close()
            (conn or raw).close()  # no unwrap(): a close never sends close_notify

    def _respond(self, conn, method: str, headers: dict[str, str]) -> bool:
        """Send one response; return False when the connection must end."""
        with self._lock:
            self.requests += 1
            self.targets.append(headers.get("", ""))
            self.asked.append((headers.get("", ""), headers.get("range", "")))
        total = len(self.data)
        match = _RANGE.match(headers.get("range", "").replace(" ", ""))
        if self.mode in ("chunked", "eof"):
            return self._respond_unframed(conn, method)
        if self.mode == "gzip" or (self.mode == "whole-later" and match
                                   and int(match.group(1)) > 0):
            match = None
        if match and int(match.group(1)) >= total:
            return self._send_head(conn, "416 Range Not Satisfiable",
                                   [f"Content-Range: bytes */{total}", "Content-Length: 0"])
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2) or total - 1), total - 1)
            if self.mode == "short-range":
                end = min(end, start + SHORT_SPAN - 1)
            status = "206 Partial Content"
            star = self.mode == "star" or (self.mode == "star-head" and start == 0)
            extra = [f"Content-Range: bytes {start}-{end}/{'*' if star else total}"]
        else:
            start, end, status, extra = 0, total - 1, "200 OK", []
        body = self.data[start : end + 1]
        if self.mode == "gzip" or (self.mode == "gzip-range" and match):
            body = gzip.compress(body, mtime=0)
            extra.append("Content-Encoding: gzip")
        send, keep = body, True
        if method == "GET" and self.mode == "drop-once" and match and start > 0:
            with self._lock:
                first, self._dropped = not self._dropped, True
            if first:
                send, keep = body[: len(body) // 2], False
        elif method == "GET" and self.mode == "short":
            send, keep = body[: len(body) // 2], False
        elif method == "GET" and self.mode == "long" and match:
            body = send = body + b"\xee" * (len(body) // 2)
        elif method == "GET" and self.mode == "stall":
            send = body[: min(STALL_PREFIX, max(len(body) - 1, 0))]
        close = headers.get("connection", "").lower() == "close"
        self._send_head(conn, status, [*self._type(), "Accept-Ranges: bytes",
                                       f"Content-Length: {len(body)}", *extra]
                        + (["Connection: close"] if close else []))
        if method == "GET":
            conn.sendall(send)
            if self.mode == "stall":
                self._hold(conn)
                return False
        return keep and not close


    @staticmethod
    def _send_head(conn, status: str, lines: list[str]) -> bool:
        conn.sendall(("\r\n".join([f"HTTP/1.1 {status}", *lines]) + "\r\n\r\n").encode())
        return True

    def _type(self) -> list[str]:
        return [f"Content-Type: {self.content_type}"] if self.content_type else []

    def _respond_unframed(self, conn, method: str) -> bool:
        """The whole body with no Content-Length: chunked, or ended by closing."""
        chunked = self.mode == "chunked"
        head = ["HTTP/1.1 200 OK", *self._type(),
                "Transfer-Encoding: chunked" if chunked else "Connection: close"]
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if method != "GET":
            return False
        for i in range(0, len(self.data), 16384):
            piece = self.data[i:i + 16384]
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            conn.sendall(b"0\r\n\r\n")
        return chunked

    def _hold(self, conn) -> None:
        """Send nothing more until stop(), or until the client closes the connection."""
        with self._lock:
            self.stalled += 1
        conn.settimeout(0.05)
        while not self._stopping.is_set():
            try:
                if conn.recv(1):
                    continue   # a client sends nothing more on a connection mid-response
            except socket.timeout:
                continue
            except OSError:
                pass
            if not self._stopping.is_set():
                with self._lock:
                    self.hung_up += 1
            return


def _read_request(reader) -> tuple[str, dict[str, str]] | None:
    """Read one request head (bodies are not supported); None at EOF."""
    line = reader.readline(65536)
    if not line:
        return None
    method, _, rest = line.decode("latin-1").partition(" ")
    method = method.upper()
    headers = {"": rest.rsplit(" ", 1)[0]}    # the request target, under an empty name
    while True:
        line = reader.readline(65536)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, headers
