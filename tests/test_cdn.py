"""The test servers are what they claim to be.

Why: every fetch test and benchmark trusts these fixtures; if nginx silently
spoke HTTP/1.1, ignored Range, or a faulty mode stopped misbehaving, engine
tests would pass for the wrong reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import socket
import ssl
import struct
from pathlib import Path

import av
import httpx
import pytest

from engine.demo.nginx import NginxCDN

RANGE = (100, 1099)


def _connections_opened(client: httpx.Client, urls: list[str]) -> int:
    """GET each url with one client; count the TCP connections it opened."""
    opened = []

    def trace(event, info):
        if event == "connection.connect_tcp.complete":
            opened.append(info)

    for url in urls:
        client.get(url, extensions={"trace": trace}).raise_for_status()
    return len(opened)


def test_main_port_is_https_http2_trusted_via_env(cdn, small_clips):
    assert os.environ["SSL_CERT_FILE"] == str(cdn.ca_file)
    with httpx.Client(http2=True) as client:
        r = client.get(cdn.url("small.mp4"))
    assert cdn.url("x").startswith("https://127.0.0.1:")
    assert (r.http_version, r.status_code) == ("HTTP/2", 200)
    assert r.headers["content-type"] == "video/mp4"
    assert r.content == small_clips["small"].read_bytes()


def test_ca_file_works_as_explicit_context_and_is_needed(cdn):
    ctx = ssl.create_default_context(cafile=str(cdn.ca_file))
    with httpx.Client(http2=True, verify=ctx) as client:
        assert client.get(cdn.url("page.html")).http_version == "HTTP/2"
    with pytest.raises(httpx.ConnectError):  # certifi's roots do not trust it
        httpx.get(cdn.url("page.html"), trust_env=False)


def test_h1_port_is_http11_only(cdn):
    with httpx.Client(http2=True) as client:
        r = client.get(cdn.url_h1("small.mp4"))
    assert (r.http_version, r.status_code) == ("HTTP/1.1", 200)


@pytest.mark.parametrize("h1", [False, True], ids=["h2", "h1"])
def test_range_gives_206_with_exact_bytes(cdn, small_clips, h1):
    data = small_clips["small-moov-end"].read_bytes()
    a, b = RANGE
    url = (cdn.url_h1 if h1 else cdn.url)("small-moov-end.mp4")
    with httpx.Client(http2=True) as client:
        r = client.get(url, headers={"Range": f"bytes={a}-{b}"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes {a}-{b}/{len(data)}"
    assert r.content == data[a : b + 1]


def test_norange_ignores_range(cdn, small_clips):
    with httpx.Client(http2=True) as client:
        r = client.get(cdn.url("norange/small.mp4"), headers={"Range": "bytes=100-1099"})
    assert r.status_code == 200 and "content-range" not in r.headers
    assert r.content == small_clips["small"].read_bytes()


def test_statuses_redirects_and_html(cdn, small_clips):
    with httpx.Client(http2=True) as client:
        assert client.get(cdn.url("status/404")).status_code == 404
        assert client.get(cdn.url("status/500")).status_code == 500
        assert client.get(cdn.url("missing.mp4")).status_code == 404
        r = client.get(cdn.url("redirect/small.mp4"))
        assert r.status_code == 302 and r.headers["location"] == "/small.mp4"
        r = client.get(cdn.url("redirect/small.mp4"), follow_redirects=True)
        assert r.status_code == 200 and r.content == small_clips["small"].read_bytes()
        with pytest.raises(httpx.TooManyRedirects):
            client.get(cdn.url("loop"), follow_redirects=True)
        for path in ("html", "page.html"):
            r = client.get(cdn.url(path))
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert b"<html>" in r.content


@pytest.mark.parametrize("h1", [False, True], ids=["h2", "h1"])
def test_keepalive_reuses_one_connection(cdn, h1):
    url = (cdn.url_h1 if h1 else cdn.url)("small.mp4")
    with httpx.Client(http2=True) as client:
        assert _connections_opened(client, [url] * 5) == 1


def test_faulty_ok_and_drop_once(faulty_server):
    data = os.urandom(300_000)
    ok = faulty_server(data, "ok")
    with httpx.Client(http2=True) as client:
        r = client.get(ok.url(), headers={"Range": "bytes=1000-200999"})
        assert (r.http_version, r.status_code, r.content) == ("HTTP/1.1", 206, data[1000:201000])
        assert r.headers["content-range"] == "bytes 1000-200999/300000"
        assert client.get(ok.url()).content == data

    drop = faulty_server(data, "drop-once")
    with httpx.Client() as client:
        assert client.get(drop.url(), headers={"Range": "bytes=0-999"}).content == data[:1000]
        with pytest.raises(httpx.RemoteProtocolError, match="peer closed connection"):
            client.get(drop.url(), headers={"Range": "bytes=1000-200999"})
        r = client.get(drop.url(), headers={"Range": "bytes=1000-200999"})
        assert r.status_code == 206 and r.content == data[1000:201000]
    assert drop.requests == 3


def test_faulty_short_truncates_every_response(faulty_server):
    server = faulty_server(os.urandom(100_000), "short")
    with httpx.Client() as client:
        for headers in ({}, {"Range": "bytes=10-9999"}):
            with pytest.raises(httpx.RemoteProtocolError, match="received .* expected"):
                client.get(server.url(), headers=headers)


def test_faulty_long_returns_more_than_the_range(faulty_server):
    data = os.urandom(100_000)
    server = faulty_server(data, "long")
    with httpx.Client() as client:
        r = client.get(server.url(), headers={"Range": "bytes=10-1009"})
    assert r.status_code == 206
    assert r.headers["content-range"] == "bytes 10-1009/100000"  # honest range ...
    assert len(r.content) == 1500 and int(r.headers["content-length"]) == 1500  # ... longer body
    assert r.content[:1000] == data[10:1010] and r.content[1000:] == b"\xee" * 500


def test_faulty_stall_times_out_and_stops_promptly(faulty_server):
    server = faulty_server(os.urandom(200_000), "stall")
    with httpx.Client(timeout=httpx.Timeout(5, read=0.5)) as client:
        with client.stream("GET", server.url(), headers={"Range": "bytes=0-199999"}) as r:
            assert r.status_code == 206
            got = bytearray()
            with pytest.raises(httpx.ReadTimeout):
                for chunk in r.iter_bytes():
                    got += chunk
    assert len(got) == 64 * 1024
    server.stop()  # must not hang on the stalled connection
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.add(int(stat.parent.name))
    return found


def _cmdlines_mentioning(text: str) -> list[str]:
    hits = []
    for f in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = f.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            hits.append(cmd)
    return hits


def test_stop_leaves_no_nginx_running(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "a.mp4").write_bytes(b"x" * 1000)
    cdn = NginxCDN(tmp_path / "root", tmp_path / "work").start()
    pids = {cdn.pid} | _children(cdn.pid)
    assert len(pids) == 2  # master + one worker
    assert _cmdlines_mentioning(str(cdn.conf_file))
    with httpx.Client(http2=True, verify=ssl.create_default_context(cafile=str(cdn.ca_file))) as c:
        c.get(cdn.url("a.mp4")).raise_for_status()  # an open keep-alive connection must not delay stop
        cdn.stop()
    cdn.stop()  # idempotent
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not _cmdlines_mentioning(str(cdn.conf_file))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", cdn.port), timeout=1).close()


def test_nginx_stops_when_its_starter_is_killed(tmp_path):
    """A test run killed mid-way (no fixture teardown, no atexit) leaves no nginx behind."""
    (tmp_path / "root").mkdir()
    script = ("import sys, time; from pathlib import Path; from engine.demo.nginx import NginxCDN;"
              f"cdn = NginxCDN(Path({str(tmp_path / 'root')!r}), Path({str(tmp_path / 'work')!r}))"
              ".start(); print(cdn.pid, flush=True); time.sleep(60)")
    starter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        master = int(starter.stdout.readline())
        pids = {master} | _children(master)
        assert len(pids) == 2
    finally:
        starter.kill()
        starter.wait(10)
        starter.stdout.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.05)
    left = [p for p in pids if Path(f"/proc/{p}").exists()]
    for pid in left:                     # not left behind by this test either
        os.kill(pid, signal.SIGKILL)
    assert not left


def _top_level_boxes(path: Path) -> list[str]:
    boxes, data, pos = [], path.read_bytes(), 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        boxes.append(kind.decode())
        pos += struct.unpack(">Q", data[pos + 8 : pos + 16])[0] if size == 1 else size
    return boxes


def test_small_clips_have_b_frames_and_moov_where_named(small_clips):
    boxes = {name: _top_level_boxes(p) for name, p in small_clips.items()}
    assert boxes["small"].index("moov") < boxes["small"].index("mdat")
    assert boxes["small-moov-end"].index("moov") > boxes["small-moov-end"].index("mdat")
    with av.open(str(small_clips["small"])) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 320, 240)
        pts = [p.pts for p in container.demux(stream) if p.size]
    assert len(pts) == 50 and pts != sorted(pts)  # B-frames: decode order != display order
