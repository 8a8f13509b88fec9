"""Fences for untrusted URLs: ENGINE_ALLOW_HOSTS, ENGINE_DENY_PRIVATE, ENGINE_MAX_PIXELS.

The decisions (engine.fences) are unit-tested on their own, both sides; each fence is
then tested end to end with a real engine against the real nginx CDN. Every test server
here is on loopback, so end to end ENGINE_DENY_PRIVATE can only be shown refusing.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine import Engine, fences
from engine.config import Config, ConfigError
from engine.demo.clips import make_clip
from tests.reference import assert_matches, reference

ROOT = Path(__file__).resolve().parents[1]
SMALL_PIXELS = 320 * 240      # the small clips' picture: the limit, so they just pass


# ------------------------------------------------------------------ the decisions


def test_allow_hosts_parse_exact_hosts_and_suffixes():
    assert fences.parse_hosts(" CDN.example.com, *.Media.example.org.,,") == (
        "cdn.example.com", "*.media.example.org")
    assert fences.parse_hosts(["a.com", "[::1]"]) == ("a.com", "::1")
    assert fences.parse_hosts("") == ()
    for bad in ("*", "*.", "a*.com", "*.*.com", "a.com/x"):
        with pytest.raises(ValueError, match="ENGINE_ALLOW_HOSTS"):
            fences.parse_hosts(bad)


@pytest.mark.parametrize("host, allowed", [
    ("cdn.example.com", True), ("CDN.Example.com.", True), ("a.media.example.org", True),
    ("a.b.media.example.org", True), ("media.example.org", False),   # *.x: under x only
    ("evilmedia.example.org", False), ("cdn.example.com.evil.net", False),
    ("example.com", False), ("127.0.0.1", False), ("::1", True),
])
def test_host_fence(host, allowed):
    patterns = fences.parse_hosts("cdn.example.com,*.media.example.org,::1")
    assert fences.host_allowed(host, patterns) is allowed
    why = fences.host_refusal(host, patterns)
    assert (why is None) is allowed
    if why:
        assert "ENGINE_ALLOW_HOSTS" in why and "\n" not in why
    assert fences.host_refusal(host, ()) is None      # off: every host


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
    ("192.168.1.1", "private"), ("fc00::1", "private"), ("fd12:3456::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1%eth0", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "reserved"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("100.64.0.1", "non-global"),
    ("192.0.2.1", "private"),
])
def test_deny_private_refuses_every_non_global_address(address, kind):
    why = fences.address_refusal(address)
    assert why is not None and f"(a {kind} address)" in why, why
    assert why.startswith("ENGINE_DENY_PRIVATE=1 refuses ") and "\n" not in why


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34",
                                     "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_deny_private_lets_global_addresses_through(address):
    assert fences.address_refusal(address) is None


def test_deny_private_refuses_an_address_it_cannot_read():
    for peer in (None, "", "not-an-address"):
        assert "ENGINE_DENY_PRIVATE=1" in fences.address_refusal(peer)


def test_pixel_fence():
    assert fences.pixels_refusal(1920, 1080, None) is None
    assert fences.pixels_refusal(320, 240, SMALL_PIXELS) is None
    why = fences.pixels_refusal(322, 240, SMALL_PIXELS)
    assert why == f"a 322x240 video has 77280 pixels a frame, more than ENGINE_MAX_PIXELS={SMALL_PIXELS}"


def test_settings_from_the_environment_and_as_keyword_arguments():
    assert (Config().allow_hosts, Config().deny_private, Config().max_pixels) == ((), False, None)
    env = {"ENGINE_ALLOW_HOSTS": "a.com,*.b.com", "ENGINE_DENY_PRIVATE": "1",
           "ENGINE_MAX_PIXELS": "2073600"}
    cfg = Config.from_env(env)
    assert (cfg.allow_hosts, cfg.deny_private, cfg.max_pixels) == (("a.com", "*.b.com"), True,
                                                                    2073600)
    # Engine(**overrides) goes through Config.with_: the same values, parsed the same way
    assert Config().with_(allow_hosts="a.com, *.B.com", deny_private=True,
                          max_pixels=2073600) == cfg
    assert Config().with_(allow_hosts=["a.com", "*.b.com"]).allow_hosts == cfg.allow_hosts
    for bad, name in [({"ENGINE_ALLOW_HOSTS": "*"}, "ENGINE_ALLOW_HOSTS"),
                      ({"ENGINE_DENY_PRIVATE": "yes"}, "ENGINE_DENY_PRIVATE"),
                      ({"ENGINE_MAX_PIXELS": "0"}, "ENGINE_MAX_PIXELS"),
                      ({"ENGINE_MAX_PIXELS": "big"}, "ENGINE_MAX_PIXELS")]:
        with pytest.raises(ConfigError, match=name):
            Config.from_env(bad)
    with pytest.raises(ConfigError, match="ENGINE_MAX_PIXELS"):
        Config().with_(max_pixels=0)


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def wide(cdn) -> Path:
    """A clip one pixel column pair wider than the small ones: over SMALL_PIXELS."""
    path = cdn.root / "wide.mp4"
    if not path.exists():
        make_clip(path, frames=5, width=322, height=240)
    return path


@pytest.fixture(scope="module")
def fenced(cdn):
    """An engine that fetches from 127.0.0.1 only, pictures up to the small clips'."""
    with Engine(processor="engine.processors:stats", device="cpu", fetchers=1, connections=2,
                decoders=1, allow_hosts="127.0.0.1", max_pixels=SMALL_PIXELS) as eng:
        yield eng


def _refused(report, setting: str, kind: str) -> None:
    assert not report.ok and report.error_kind == kind, (report.error_kind, report.error)
    assert setting in report.error and "\n" not in report.error, report.error
    assert report.frames_processed == 0 and not report.results


def test_what_the_fences_allow_goes_through_frame_exact(fenced, cdn, small_clips):
    for name in ("small", "small-moov-end"):
        report = fenced.report(cdn.url(f"{name}.mp4"))
        assert report.ok, report.error
        assert_matches(report, reference(small_clips[name]))
    # a redirect that stays on an allowed host is followed
    report = fenced.report(cdn.url("redirect/small.mp4"))
    assert report.ok, report.error
    assert_matches(report, reference(small_clips["small"]))


def test_a_host_not_allowed_is_refused_before_any_connection(fenced):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        report = fenced.report(f"https://localhost:{port}/small.mp4")
        _refused(report, "ENGINE_ALLOW_HOSTS", "FetchError")
        assert "localhost" in report.error
        # a connection would wait in the backlog, accepted or not; the job is over
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_a_redirect_to_a_host_not_allowed_is_refused(fenced, cdn):
    """127.0.0.1 answers with a redirect to localhost (same nginx): the hop is refused."""
    report = fenced.report(cdn.url("other-origin/small.mp4"))
    _refused(report, "ENGINE_ALLOW_HOSTS", "FetchError")
    assert "host localhost is not in ENGINE_ALLOW_HOSTS" in report.error


@pytest.mark.parametrize("path, way", [("wide.mp4", "planned"), ("norange/wide.mp4", "streamed")])
def test_a_picture_over_max_pixels_is_refused_from_its_header(fenced, cdn, wide, path, way):
    """Planned: from the moov's sample entry. Streamed (no Range support): from the
    decoder's first look at the stream, before its ring exists, so before any frame."""
    report = fenced.report(cdn.url(path))
    _refused(report, "ENGINE_MAX_PIXELS", "DecodeError")
    assert f"a 322x240 video has 77280 pixels a frame, more than ENGINE_MAX_PIXELS=" \
           f"{SMALL_PIXELS}" in report.error
    assert report.plan == way
    # the engine goes on
    assert fenced.report(cdn.url("small.mp4")).ok


def test_deny_private_refuses_the_address_connected_to(cdn):
    """Whether the URL names the address or a name that resolves to it; the connection
    is dropped before TLS starts, so not one byte of a request reaches the address."""
    with Engine(processor="engine.processors:stats", device="cpu", fetchers=1, connections=2,
                decoders=1, deny_private=True) as eng:
        for url in (cdn.url("small.mp4"), f"https://localhost:{cdn.port}/small.mp4"):
            report = eng.report(url)
            _refused(report, "ENGINE_DENY_PRIVATE", "FetchError")
            assert "ENGINE_DENY_PRIVATE=1 refuses 127.0.0.1 (a loopback address)" in report.error
        with socket.create_server(("127.0.0.1", 0)) as listener:
            report = eng.report(f"https://127.0.0.1:{listener.getsockname()[1]}/small.mp4")
            _refused(report, "ENGINE_DENY_PRIVATE", "FetchError")
            listener.settimeout(60)     # bounds a failure only: the job has connected
            connections = [listener.accept()[0]]
            listener.setblocking(False)
            while True:
                try:
                    connections.append(listener.accept()[0])
                except BlockingIOError:
                    break
            for conn in connections:
                with conn:
                    conn.settimeout(60)
                    try:
                        assert conn.recv(1) == b"", "bytes sent to a refused address"
                    except ConnectionResetError:
                        pass


def test_the_cli_exits_1_with_one_line_naming_the_setting(cdn, tmp_path):
    env = dict(os.environ, ENGINE_ALLOW_HOSTS="*.example.com")
    path = tmp_path / "r.json"
    res = subprocess.run([sys.executable, "-m", "engine", "run", cdn.url("small.mp4"), "--quiet",
                          "--device", "cpu", "--json", str(path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "host 127.0.0.1 is not in ENGINE_ALLOW_HOSTS" in errors[0]
    assert "Traceback" not in res.stderr
    report = json.loads(path.read_text())
    assert report["ok"] is False and "ENGINE_ALLOW_HOSTS" in report["error"]
    # a malformed setting is one line too, before anything starts
    env["ENGINE_ALLOW_HOSTS"] = "*"
    res = subprocess.run([sys.executable, "-m", "engine", "run", cdn.url("small.mp4"), "--quiet"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "ENGINE_ALLOW_HOSTS" in res.stderr
