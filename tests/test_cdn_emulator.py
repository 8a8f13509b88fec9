"""Measurements through engine.demo.emulator against real local TCP servers.

The emulator's job is timing, so these tests measure it: a threaded bulk
server (request = 8-byte big-endian length N, reply = N bytes then close) and
an echo server run in-process, and clients time transfers through the
emulator.  Bounds are +-20 % of the profile values; medians of a few trials
keep them robust on a noisy 2-core machine.  One test also runs real HTTPS
(HTTP/2 via ALPN) through the emulator to the session's nginx ``cdn`` fixture.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

import pytest

from engine.demo.emulator import PROFILES, CdnEmulator, Profile, main, profile
from tests.conftest import wait_for

TOL = 0.20
IO_TIMEOUT = 15.0
PATTERN = memoryview(bytes(range(256)) * (1 << 14))  # 4 MiB


def within(value: float, target: float, tol: float = TOL) -> bool:
    return abs(value - target) <= tol * target


# --------------------------------------------------------------- servers


class _ThreadedServer:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.settimeout(IO_TIMEOUT)
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        try:
            with c:
                self.handle(c)
        except OSError:
            pass

    def handle(self, c: socket.socket) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


class BulkServer(_ThreadedServer):
    """Reads an 8-byte length N, sends N bytes, closes."""

    def handle(self, c: socket.socket) -> None:
        hdr = b""
        while len(hdr) < 8:
            d = c.recv(8 - len(hdr))
            if not d:
                return
            hdr += d
        (n,) = struct.unpack("!Q", hdr)
        while n > 0:
            k = min(n, len(PATTERN))
            c.sendall(PATTERN[:k])
            n -= k


class EchoServer(_ThreadedServer):
    def handle(self, c: socket.socket) -> None:
        while True:
            d = c.recv(1 << 20)
            if not d:
                c.shutdown(socket.SHUT_WR)
                return
            c.sendall(d)


@pytest.fixture(scope="module")
def bulk():
    s = BulkServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def echo():
    s = EchoServer()
    yield s
    s.close()


# --------------------------------------------------------------- clients


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def fetch(port: int, n: int) -> dict:
    """Download n bytes from the bulk server; returns timings."""
    t_connect = time.perf_counter()
    s = connect(port)
    with s:
        s.sendall(struct.pack("!Q", n))
        buf = bytearray(1 << 20)
        got = first_k = 0
        t_first = None
        while True:
            k = s.recv_into(buf)
            if not k:
                break
            if t_first is None:
                t_first = time.perf_counter()
                first_k = k
            got += k
        t_end = time.perf_counter()
    assert got == n, f"short transfer: {got} of {n}"
    return {
        "t_connect": t_connect,
        "t_first": t_first,
        "t_end": t_end,
        "bytes": got,
        # steady-state rate: bytes after the first read over the time they took
        "rate": (got - first_k) / (t_end - t_first),
        "ttfb": t_first - t_connect,
    }


def fetch_parallel(port: int, n: int, conns: int) -> tuple[float, list[dict]]:
    results: list[dict] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(fetch(port, n))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(IO_TIMEOUT * 2)
    assert not errors, errors
    assert len(results) == conns
    start = min(r["t_first"] for r in results)
    end = max(r["t_end"] for r in results)
    return sum(r["bytes"] for r in results) / (end - start), results


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        d = s.recv(n - len(out))
        if not d:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += d
    return bytes(out)


def echo_rtts(port: int, rounds: int, size: int = 100) -> tuple[float, list[float]]:
    """(time from connect to first echoed byte, RTTs of later round trips)."""
    msg = os.urandom(size)
    t0 = time.perf_counter()
    s = connect(port)
    with s:
        s.sendall(msg)
        assert recv_exact(s, size) == msg
        setup = time.perf_counter() - t0
        rtts = []
        for _ in range(rounds):
            t = time.perf_counter()
            s.sendall(msg)
            assert recv_exact(s, size) == msg
            rtts.append(time.perf_counter() - t)
    return setup, rtts


# ----------------------------------------------------------------- tests


def test_profiles():
    seed = profile("seed")
    assert seed == PROFILES["seed"]
    assert (seed.rtt_s, seed.new_conn_s, seed.per_conn_bps, seed.total_bps) == (0.080, 0.300, 5e6, 40e6)
    assert PROFILES["lan"] == Profile("lan", 0, 0, None, None)
    assert "mobile" in PROFILES
    with pytest.raises(ValueError) as ei:
        profile("nope")
    for name in PROFILES:
        assert name in str(ei.value)
    with pytest.raises(ValueError):
        Profile("bad", rtt_s=0.1, new_conn_s=0, per_conn_bps=0, total_bps=None)


def test_lifecycle_url_stats(bulk):
    emu = CdnEmulator("127.0.0.1", bulk.port, "lan")
    assert emu.profile is PROFILES["lan"]
    emu.start()
    try:
        assert isinstance(emu.port, int) and emu.port > 0
        assert emu.url("/a/b.mp4") == f"https://127.0.0.1:{emu.port}/a/b.mp4"
        assert emu.url("x", scheme="http") == f"http://127.0.0.1:{emu.port}/x"
        fetch(emu.port, 1000)
        wait_for(lambda: emu.stats()["connections_active"] == 0, 5, "every connection to close")
        st = emu.stats()
        assert st["connections_accepted"] == 1
        assert st["bytes_client_to_server"] == 8
        assert st["bytes_server_to_client"] == 1000
    finally:
        emu.stop()
    emu.stop()  # idempotent
    with pytest.raises(OSError):
        connect(emu.port).recv(1)
    with CdnEmulator("127.0.0.1", bulk.port, PROFILES["lan"]) as emu2:
        assert fetch(emu2.port, 10)["bytes"] == 10
    with pytest.raises(ValueError):
        CdnEmulator("127.0.0.1", bulk.port, "nope")


def test_stop_closes_open_connections(echo):
    emu = CdnEmulator("127.0.0.1", echo.port, "lan").start()
    s = connect(emu.port)
    with s:
        s.sendall(b"hi")
        assert recv_exact(s, 2) == b"hi"
        emu.stop()
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass


def test_unreachable_upstream_closes_client():
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there now
    with CdnEmulator("127.0.0.1", port, "lan") as emu:
        s = connect(emu.port)
        with s:
            s.sendall(b"x")
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        wait_for(lambda: emu.stats()["connections_failed"] == 1, 5, "the failed connection")


def test_client_abort_closes_upstream(bulk):
    with CdnEmulator("127.0.0.1", bulk.port, "seed") as emu:
        s = connect(emu.port)
        s.sendall(struct.pack("!Q", 50_000_000))
        recv_exact(s, 100_000)
        s.close()
        wait_for(lambda: emu.stats()["connections_active"] == 0, 5, "every connection to close")
        assert emu.stats()["bytes_server_to_client"] < 5_000_000


# (a) one connection's throughput under 'seed' is ~5 MB/s
def test_seed_single_connection_throughput(bulk):
    with CdnEmulator("127.0.0.1", bulk.port, "seed") as emu:
        rates = [fetch(emu.port, 4_000_000)["rate"] for _ in range(3)]
    rate = statistics.median(rates)
    print(f"\n(a) seed 1 conn: {rate / 1e6:.2f} MB/s (trials {[round(r / 1e6, 2) for r in rates]})")
    assert within(rate, 5e6), rates


# (b) 12 connections share the 40 MB/s total (12 x 5 = 60 would exceed it)
def test_seed_parallel_aggregate_throughput(bulk):
    with CdnEmulator("127.0.0.1", bulk.port, "seed") as emu:
        aggs = []
        per_conn = []
        ttfbs = []
        for _ in range(3):
            agg, results = fetch_parallel(emu.port, 4_000_000, 12)
            aggs.append(agg)
            per_conn.extend(r["rate"] for r in results)
            ttfbs.extend(r["ttfb"] for r in results)
    agg = statistics.median(aggs)
    print(
        f"\n(b) seed 12 conns: aggregate {agg / 1e6:.2f} MB/s (trials {[round(a / 1e6, 2) for a in aggs]}),"
        f" per conn median {statistics.median(per_conn) / 1e6:.2f} MB/s"
    )
    assert within(agg, 40e6), aggs
    assert max(per_conn) <= 5e6 * (1 + TOL)
    # connection set-ups overlap: 12 serialised 300 ms waits would take 3.6 s
    assert statistics.median(ttfbs) < 0.380 * (1 + TOL), ttfbs


# (c) round trip of a small request/response on an established connection ~80 ms
def test_seed_rtt(echo):
    with CdnEmulator("127.0.0.1", echo.port, "seed") as emu:
        _, rtts = echo_rtts(emu.port, rounds=7)
    rtt = statistics.median(rtts)
    print(f"\n(c) seed RTT: {rtt * 1e3:.1f} ms (samples {[round(r * 1e3, 1) for r in rtts]})")
    assert within(rtt, 0.080), rtts


# (d) connect -> first byte of a new connection ~ new_conn_s + RTT = 380 ms
def test_seed_new_connection_first_byte(echo):
    with CdnEmulator("127.0.0.1", echo.port, "seed") as emu:
        samples = [echo_rtts(emu.port, rounds=0)[0] for _ in range(5)]
    ttfb = statistics.median(samples)
    print(f"\n(d) seed connect->first byte: {ttfb * 1e3:.1f} ms (samples {[round(r * 1e3, 1) for r in samples]})")
    assert within(ttfb, 0.380), samples


# (e) 'lan' is byte-exact (both directions) and fast
def test_lan_byte_exact_echo(echo):
    data = os.urandom(10 * 1024 * 1024)
    with CdnEmulator("127.0.0.1", echo.port, "lan") as emu:
        s = connect(emu.port)
        with s:
            sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
            sender.start()
            h = hashlib.sha256()
            n = 0
            buf = bytearray(1 << 20)
            while True:
                k = s.recv_into(buf)
                if not k:
                    break
                h.update(memoryview(buf)[:k])
                n += k
            sender.join(IO_TIMEOUT)
        assert n == len(data)
        assert h.digest() == hashlib.sha256(data).digest()
        wait_for(lambda: emu.stats()["connections_active"] == 0, 5, "every connection to close")
        st = emu.stats()
        assert st["bytes_client_to_server"] == st["bytes_server_to_client"] == len(data)


def test_lan_throughput(bulk):
    n = 200 * 1024 * 1024
    with CdnEmulator("127.0.0.1", bulk.port, "lan") as emu:
        rates: list[float] = []
        for _ in range(2):
            r = fetch(emu.port, n)
            rates.append(r["bytes"] / (r["t_end"] - r["t_connect"]))
    best = max(rates)
    print(f"\nlan 1 conn: {best / 1e6:.0f} MB/s (trials {[round(r / 1e6) for r in rates]})")
    # The emulator is meant to sustain >= 200 MB/s on 'lan' (about 800 MB/s on an
    # idle 2-core box); the floor here is halved so a busy CI machine stays green.
    assert best >= 100e6, rates


def test_custom_profile_is_honoured(bulk, echo):
    slow = Profile("slow", rtt_s=0.2, new_conn_s=0.1, per_conn_bps=2e6, total_bps=None)
    with CdnEmulator("127.0.0.1", echo.port, slow) as emu:
        setups = [echo_rtts(emu.port, rounds=0)[0] for _ in range(2)]
        setup0, rtts = echo_rtts(emu.port, rounds=5)
    setup = statistics.median(setups + [setup0])
    rtt = statistics.median(rtts)
    with CdnEmulator("127.0.0.1", bulk.port, slow) as emu:
        r = fetch(emu.port, 2_500_000)
    # total-only shaping, no latency: 4 connections share 10 MB/s
    capped = Profile("capped", rtt_s=0, new_conn_s=0, per_conn_bps=None, total_bps=10e6)
    with CdnEmulator("127.0.0.1", bulk.port, capped) as emu:
        agg, _ = fetch_parallel(emu.port, 2_500_000, 4)
    print(
        f"\ncustom: rtt {rtt * 1e3:.1f} ms, first byte {setup * 1e3:.1f} ms, 1 conn {r['rate'] / 1e6:.2f} MB/s;"
        f" total-capped 4 conns {agg / 1e6:.2f} MB/s"
    )
    assert within(rtt, 0.2), rtts
    assert within(setup, 0.3), setups + [setup0]
    assert within(r["rate"], 2e6), r["rate"]
    assert within(agg, 10e6), agg


def test_https_http2_passes_through(cdn, small_clips):
    """TLS is passed through untouched: HTTP/2 via ALPN and Range requests work."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("h2")
    data = small_clips["small"].read_bytes()
    with CdnEmulator("127.0.0.1", cdn.port, "seed") as emu:
        with httpx.Client(http2=True) as client:
            t0 = time.perf_counter()
            r = client.get(emu.url("/small.mp4"), headers={"Range": "bytes=0-99"})
            first = time.perf_counter() - t0
            assert r.status_code == 206 and r.http_version == "HTTP/2"
            assert r.content == data[:100]
            t0 = time.perf_counter()
            r = client.get(emu.url("/small.mp4"))
            again = time.perf_counter() - t0
            assert r.status_code == 200 and r.content == data
        assert emu.stats()["connections_accepted"] == 1
    print(f"\nhttps h2 via seed: first request {first * 1e3:.0f} ms, whole {len(data)} B clip {again * 1e3:.0f} ms")
    # new connection: 300 ms + TCP/TLS/h2 round trips + request RTT
    assert first >= 0.300 + 2 * 0.080


def _start_cli(upstream_port: int, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.demo.emulator", "--upstream", f"127.0.0.1:{upstream_port}", "--profile", "lan"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _ctrl_c(proc: subprocess.Popen) -> tuple[int, str]:
    """SIGINT, then the exit status and stderr; the bound only catches a hang."""
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# A job started in the background by a non-interactive shell (as a CI runner may
# start the suite) inherits SIGINT ignored; Ctrl-C must stop the emulator anyway.
@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_cli_stops_on_ctrl_c_sent_as_soon_as_port_is_printed(echo, inherited):
    proc = _start_cli(echo.port, preexec_fn=_ignore_sigint if inherited == "ignored" else None)
    int(proc.stdout.readline())
    rc, err = _ctrl_c(proc)
    assert rc == 0, err
    assert "stats" in err


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_cli_prints_port_and_stops_on_ctrl_c(echo, inherited):
    proc = _start_cli(echo.port, preexec_fn=_ignore_sigint if inherited == "ignored" else None)
    port = int(proc.stdout.readline())
    with connect(port) as s:
        s.sendall(b"ping")
        assert recv_exact(s, 4) == b"ping"
        rc, err = _ctrl_c(proc)  # the connection is still open
        assert rc == 0, err
        assert "stats" in err
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
    with pytest.raises(SystemExit):
        main(["--upstream", "127.0.0.1:1", "--profile", "nope"])
