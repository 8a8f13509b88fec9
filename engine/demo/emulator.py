"""User-space network emulator for benchmarking against a "distant CDN".

The kernel on the build machines has no ``tc netem``, so this module provides
a plain TCP proxy (TLS passes through untouched, so HTTP/2 negotiated by ALPN
keeps working) that sits in front of a real local HTTPS server and emulates:

* a slow connection set-up (TCP + TLS handshakes to a far-away edge): each
  accepted client connection waits ``new_conn_s`` before the upstream
  connection is opened and before any byte flows in either direction;
* latency: each direction is a *delay line* with a one-way delay of
  ``rtt_s / 2``.  A chunk read at time ``t`` is released to the other side at
  ``t + delay``, so latency shifts a stream in time but does not serialise
  throughput;
* bandwidth (server -> client, i.e. downloads): a per-connection token bucket
  at ``per_conn_bps`` and a token bucket shared by all connections at
  ``total_bps`` (bytes per second, ``None`` = unlimited).

The emulator runs an asyncio loop in a daemon thread::

    with CdnEmulator("127.0.0.1", 8443, "seed").start() as emu:
        httpx.get(emu.url("/clip.mp4"), verify=False)

or from the command line::

    python -m engine.demo.emulator --upstream 127.0.0.1:8443 --profile seed
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import signal
import sys
import threading
from dataclasses import dataclass

__all__ = ["Profile", "PROFILES", "profile", "CdnEmulator"]

log = logging.getLogger(__name__)

#: Largest read from a socket, in bytes.
CHUNK = 64 * 1024
#: When shaping, chunks are released in pieces of at most this size.
PIECE = 16 * 1024
#: Minimum token bucket depth (burst) in bytes; a bucket holds at least this
#: much or 10 ms worth of its rate, whichever is larger.
MIN_BURST = 64 * 1024
BURST_S = 0.010
#: Bytes a delay line may hold for an unshaped direction.
UNSHAPED_LINE_LIMIT = 16 * 1024 * 1024
#: Minimum bytes a shaped delay line may hold.
MIN_LINE_LIMIT = 256 * 1024


@dataclass(frozen=True)
class Profile:
    """Network conditions. Rates are in bytes per second (None = unlimited)."""

    name: str
    rtt_s: float
    new_conn_s: float
    per_conn_bps: float | None
    total_bps: float | None

    def __post_init__(self) -> None:
        if self.rtt_s < 0 or self.new_conn_s < 0:
            raise ValueError(f"profile {self.name!r}: delays must be >= 0")
        for field in ("per_conn_bps", "total_bps"):
            v = getattr(self, field)
            if v is not None and not v > 0:
                raise ValueError(f"profile {self.name!r}: {field} must be > 0 or None")


PROFILES: dict[str, Profile] = {
    "lan": Profile("lan", rtt_s=0.0, new_conn_s=0.0, per_conn_bps=None, total_bps=None),
    "seed": Profile("seed", rtt_s=0.080, new_conn_s=0.300, per_conn_bps=5e6, total_bps=40e6),
    "mobile": Profile("mobile", rtt_s=0.150, new_conn_s=0.500, per_conn_bps=2e6, total_bps=8e6),
}


def profile(name: str) -> Profile:
    """Return the named profile from :data:`PROFILES`."""
    try:
        return PROFILES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown CDN profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}"
        ) from None


_lookup_profile = profile  # CdnEmulator.__init__'s argument shadows the name


class _TokenBucket:
    """Token bucket that may go into debt.

    ``reserve(n)`` takes ``n`` tokens now and returns how long the caller must
    wait before sending.  Concurrent reservers queue up behind each other's
    debt, which makes a shared bucket FIFO-fair and keeps the long-run rate
    exact regardless of timer granularity (oversleeping refills tokens, up to
    the burst).
    """

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = float(rate)
        self.burst = max(float(MIN_BURST), self.rate * BURST_S)
        self.tokens = self.burst
        self.last = now

    def reserve(self, n: int, now: float) -> float:
        tokens = self.tokens + (now - self.last) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        tokens -= n
        self.tokens = tokens
        self.last = now
        return -tokens / self.rate if tokens < 0 else 0.0


class _DelayLine:
    """FIFO of (release_time, data) with a byte bound for back-pressure."""

    __slots__ = ("_loop", "_q", "_bytes", "_limit", "_data_waiter", "_space_waiter", "_exc")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._loop = loop
        self._q: collections.deque[tuple[float, bytes]] = collections.deque()
        self._bytes = 0
        self._limit = limit
        self._data_waiter: asyncio.Future | None = None
        self._space_waiter: asyncio.Future | None = None
        self._exc: BaseException | None = None

    @staticmethod
    def _wake(fut: asyncio.Future | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def put(self, release: float, data: bytes) -> None:
        self._q.append((release, data))
        self._bytes += len(data)
        self._wake(self._data_waiter)
        while self._bytes > self._limit and self._exc is None:
            self._space_waiter = self._loop.create_future()
            try:
                await self._space_waiter
            finally:
                self._space_waiter = None

    def fail(self, exc: BaseException) -> None:
        self._exc = exc
        self._wake(self._data_waiter)

    async def get(self) -> tuple[float, bytes]:
        while not self._q:
            if self._exc is not None:
                raise self._exc
            self._data_waiter = self._loop.create_future()
            try:
                await self._data_waiter
            finally:
                self._data_waiter = None
        return self._q.popleft()

    def consumed(self, n: int) -> None:
        self._bytes -= n
        if self._bytes <= self._limit:
            self._wake(self._space_waiter)


class CdnEmulator:
    """TCP proxy on 127.0.0.1 emulating a distant CDN in front of ``upstream``."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        profile: Profile | str,
        *,
        listen_port: int = 0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = int(upstream_port)
        self.profile: Profile = _lookup_profile(profile) if isinstance(profile, str) else profile
        if not isinstance(self.profile, Profile):
            raise TypeError(f"profile must be a Profile or a profile name, not {profile!r}")
        self.listen_port = int(listen_port)
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._shared: _TokenBucket | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self._stats = {
            "connections_accepted": 0,
            "connections_active": 0,
            "connections_failed": 0,
            "bytes_client_to_server": 0,
            "bytes_server_to_client": 0,
        }

    # ------------------------------------------------------------------ API

    def start(self) -> "CdnEmulator":
        """Start listening on 127.0.0.1 (port in :attr:`port`); returns self."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("CdnEmulator already started")
            ready = threading.Event()
            error: list[BaseException] = []
            self._thread = threading.Thread(
                target=self._run, args=(ready, error), name=f"cdn-emulator-{self.profile.name}", daemon=True
            )
            self._thread.start()
        ready.wait()
        if error:
            self._thread.join()
            raise error[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection, join the thread. Idempotent."""
        with self._lock:
            if self._stopped or self._thread is None:
                self._stopped = True
                return
            self._stopped = True
            loop, thread = self._loop, self._thread
        if loop is not None and not loop.is_closed():
            try:
                fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
                fut.result(timeout=10)
            except Exception:  # pragma: no cover - best effort
                log.exception("cdn emulator shutdown failed")
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:  # loop already closed
                pass
        if thread is not threading.current_thread():
            thread.join(timeout=10)

    def __enter__(self) -> "CdnEmulator":
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def set_total_rate(self, bps: float) -> None:
        """The shared link's rate from now on (a link that clears up, or clogs)."""
        def change():
            if self._shared is not None:
                self._shared.rate = float(bps)
        self._loop.call_soon_threadsafe(change)

    def stats(self) -> dict:
        """Snapshot: connections accepted/active/failed, bytes each direction."""
        return dict(self._stats)

    def url(self, path: str = "/", scheme: str = "https") -> str:
        if self.port is None:
            raise RuntimeError("CdnEmulator not started")
        if not path.startswith("/"):
            path = "/" + path
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def __repr__(self) -> str:
        return (
            f"CdnEmulator(127.0.0.1:{self.port} -> {self.upstream_host}:{self.upstream_port}, "
            f"profile={self.profile})"
        )

    # ------------------------------------------------------------ internals

    def _run(self, ready: threading.Event, error: list) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._exception_handler)
        try:
            try:
                self._shared = (
                    _TokenBucket(self.profile.total_bps, loop.time()) if self.profile.total_bps else None
                )
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, "127.0.0.1", self.listen_port, limit=CHUNK)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:
                error.append(e)
                return
            finally:
                ready.set()
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(self._shutdown())
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    @staticmethod
    def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ConnectionError, OSError, asyncio.CancelledError)):
            return
        loop.default_exception_handler(context)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        # Registered at accept, not in the task's first step: a shutdown in between
        # still cancels it, and a task cancelled before it ran still closes its client.
        task = asyncio.get_running_loop().create_task(self._handle(c_reader, c_writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: c_writer.is_closing() or c_writer.transport.abort())

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        st = self._stats
        st["connections_accepted"] += 1
        st["connections_active"] += 1
        prof = self.profile
        u_writer: asyncio.StreamWriter | None = None
        pumps: list[asyncio.Task] = []
        clean = False
        try:
            if prof.new_conn_s > 0:
                await asyncio.sleep(prof.new_conn_s)
            try:
                u_reader, u_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port, limit=CHUNK
                )
            except OSError as e:
                st["connections_failed"] += 1
                log.debug("upstream connect failed: %s", e)
                return
            loop = asyncio.get_running_loop()
            buckets = []
            if prof.per_conn_bps:
                buckets.append(_TokenBucket(prof.per_conn_bps, loop.time()))
            if self._shared is not None:
                buckets.append(self._shared)
            pumps = [
                asyncio.create_task(self._pump(c_reader, u_writer, (), "bytes_client_to_server")),
                asyncio.create_task(self._pump(u_reader, c_writer, tuple(buckets), "bytes_server_to_client")),
            ]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            clean = True
            for t in pumps:
                if not t.done() or t.cancelled() or t.exception() is not None:
                    clean = False
                    if t.done() and not t.cancelled():
                        log.debug("connection error: %r", t.exception())
        finally:
            # Sockets are closed before the only await here: a shutdown's cancel
            # landing on it must not leave them open.
            for t in pumps:
                if not t.done():
                    t.cancel()
            for w in (c_writer, u_writer):
                if w is None:
                    continue
                if clean:
                    w.close()
                else:
                    w.transport.abort()
            st["connections_active"] -= 1
            if pumps:
                await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        buckets: tuple[_TokenBucket, ...],
        counter: str,
    ) -> None:
        """Copy reader -> writer through the delay line and the shapers."""
        delay = self.profile.rtt_s / 2.0
        loop = asyncio.get_running_loop()
        send = self._send
        if delay <= 0:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                await send(writer, data, buckets, counter, loop)
        else:
            if buckets:
                rate = min(b.rate for b in buckets)
                limit = max(MIN_LINE_LIMIT, int(2 * rate * delay))
            else:
                limit = UNSHAPED_LINE_LIMIT
            line = _DelayLine(loop, limit)
            feeder = asyncio.create_task(self._feed(reader, line, delay, loop))
            try:
                while True:
                    release, data = await line.get()
                    wait = release - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if not data:
                        break
                    await send(writer, data, buckets, counter, loop)
                    line.consumed(len(data))
            finally:
                if not feeder.done():
                    feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
            await writer.drain()

    @staticmethod
    async def _feed(
        reader: asyncio.StreamReader, line: _DelayLine, delay: float, loop: asyncio.AbstractEventLoop
    ) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                await line.put(loop.time() + delay, data)
                if not data:
                    return
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            line.fail(e)

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        data: bytes,
        buckets: tuple[_TokenBucket, ...],
        counter: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        st = self._stats
        if not buckets:
            writer.write(data)
            st[counter] += len(data)
            await writer.drain()
            return
        n = len(data)
        view = memoryview(data)
        for off in range(0, n, PIECE):
            piece = view[off : off + PIECE]
            now = loop.time()
            wait = 0.0
            for b in buckets:
                w = b.reserve(len(piece), now)
                if w > wait:
                    wait = w
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(piece)
            st[counter] += len(piece)
            await writer.drain()


# ---------------------------------------------------------------------- CLI


def _parse_hostport(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {s!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m engine.demo.emulator",
        description="TCP proxy on 127.0.0.1 emulating a distant CDN (latency, slow connects, bandwidth).",
    )
    ap.add_argument("--upstream", required=True, type=_parse_hostport, help="HOST:PORT of the real server")
    ap.add_argument("--profile", default="seed", help=f"one of: {', '.join(sorted(PROFILES))}")
    ap.add_argument("--port", type=int, default=0, help="listen port (default: any free port)")
    args = ap.parse_args(argv)
    try:
        prof = profile(args.profile)
    except ValueError as e:
        ap.error(str(e))
    host, port = args.upstream
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    # A process started as a background job inherits SIGINT ignored, and a handler
    # runs only when the main thread next executes Python: both lost Ctrl-C. The
    # signals are blocked before the proxy's thread exists (it inherits the mask)
    # and taken synchronously below, so one sent as soon as the port is printed waits.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    for sig in stop_signals:
        signal.signal(sig, signal.SIG_DFL)
    emu = CdnEmulator(host, port, prof, listen_port=args.port).start()
    try:
        print(emu.port, flush=True)
        print(
            f"cdn_emulator: 127.0.0.1:{emu.port} -> {host}:{port} profile={prof}; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        signal.sigwait(stop_signals)
    finally:
        emu.stop()
        print(f"cdn_emulator: stats {emu.stats()}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
