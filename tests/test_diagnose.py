"""``python -m engine diagnose URL`` against the real nginx CDN.

Why: diagnose is what a user runs when the engine is slow; it must name every
stage of both the cold and the warm job, show that the warm job really reused
pooled connections, end with a verdict, and turn a bad URL into one ``error:``
line (naming the stage that failed) rather than a traceback.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import Config
from engine.tools.diagnose import Probe, advice, dominant, increments, verdict

ROOT = Path(__file__).resolve().parent.parent
NETWORK_STAGES = ("DNS", "TCP connect", "TLS", "first byte")
ENGINE_STAGES = ("connect", "first byte", "moov located", "first frame decoded", "first result",
                 "all bytes", "all frames", "total")


def diagnose(url: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)           # SSL_CERT_FILE comes from the cdn fixture
    env.pop("ENGINE_PREWARM", None)  # the cold job must really be cold
    return subprocess.run([sys.executable, "-m", "engine", "diagnose", url], cwd=ROOT, env=env,
                          timeout=timeout, capture_output=True, text=True)


def test_diagnose_waterfall_cold_then_warm(cdn):
    r = diagnose(cdn.url("small.mp4"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Traceback" not in out + r.stderr
    lines = out.splitlines()
    for stage in NETWORK_STAGES:
        assert any(line.strip().startswith(stage) for line in lines), (stage, out)
    assert re.search(r"^\s+TLS\s+[\d.]+ ms\s+TLSv1\.[23], ALPN h2", out, re.M), out
    assert re.search(r"^\s+first byte\s+[\d.]+ ms\s+HTTP/1\.1 206", out, re.M), out
    assert re.search(r"^engine start\s+[\d.]+ s", out, re.M), out
    header = next(line for line in lines if line.strip().startswith("stage"))
    assert header.index("cold") < header.index("warm")
    for stage in ENGINE_STAGES:   # a time in both columns
        assert re.search(rf"^\s+{re.escape(stage)}[^\d\n]*\s[\d.]+ \(\+[\d.]+\)\*?\s+[\d.]+ "
                         rf"\(\+[\d.]+\)", out, re.M), (stage, out)
    new = re.search(r"^\s+connections new\s+(\d+)\s+(\d+)$", out, re.M)
    reused = re.search(r"^\s+connections reused\s+(\d+)\s+(\d+)$", out, re.M)
    assert new and reused, out
    assert int(new.group(1)) > 0            # cold: the first job opened its connections
    assert int(reused.group(2)) > 0         # warm: pooled connections were reused
    assert int(new.group(2)) == 0
    assert re.search(r"^\s+HTTP version\s+HTTP/1\.1\s+HTTP/1\.1$", out, re.M), out
    assert re.search(r"^dominant: \S", out, re.M), out
    assert re.search(r"^change: .*ENGINE_", out, re.M), out
    assert len(lines) <= 40 and max(map(len, lines)) <= 110, out   # one screen


def test_diagnose_404_is_one_error_line(cdn):
    r = diagnose(cdn.url("no-such-video.mp4"), timeout=60)
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), r.stderr
    assert "404" in err[0] and "first byte" in err[0]
    assert r.stdout == ""   # the probe fails before anything is printed or any engine starts


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"https://127.0.0.1:{port}/small.mp4"


@pytest.mark.parametrize("url, words", [
    ("ftp://127.0.0.1/small.mp4", ("scheme", "ftp")),
    (None, ("TCP connect", "refused")),
])
def test_diagnose_bad_urls_name_the_stage(url, words):
    r = diagnose(url or _refused_url(), timeout=60)
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), r.stderr
    for word in words:
        assert word in err[0], err[0]


# ------------------------------------------------------------- the verdict, on made-up reports
def _report(timings: dict, new: int = 0, reused: int = 4, ranges: int = 8, nbytes: int = 16e6):
    return {"timings_s": timings, "video": {"moov": "front"}, "decoder": "pyav",
            "fetch": {"http_version": "HTTP/1.1", "connections_new": new,
                      "connections_reused": reused, "ranges": ranges, "retries": 0,
                      "bytes": int(nbytes)}}


PROBE = Probe("https", "cdn.example", 443, dns_s=0.02, tcp_s=0.08, tls_s=0.16, first_byte_s=0.09)
URL = "https://cdn.example/v.mp4"
WARM_TRANSFER = {"connect": 0.001, "first_byte": 0.09, "moov_ready": 0.1, "first_frame": 0.15,
                 "first_result": 0.2, "download_done": 2.5, "decode_done": 2.6, "total": 2.62}


def test_increments_follow_time_order():
    inc = increments(WARM_TRANSFER)
    assert inc["download_done"] == pytest.approx(2.5 - 0.2)
    assert inc["first_result"] == pytest.approx(0.05)
    assert dominant(WARM_TRANSFER)[0] == "download_done"


def test_transfer_bound_names_connections_and_fetchers():
    text = advice("transfer", _report(WARM_TRANSFER), Config(), URL, PROBE)
    assert "ENGINE_CONNECTIONS" in text and "ENGINE_FETCHERS" in text and "ENGINE_RANGE_MB" in text


def test_cold_setup_dominant_recommends_prewarm():
    warm = {"connect": 0.001, "first_byte": 0.09, "moov_ready": 0.1, "first_frame": 0.15,
            "first_result": 0.16, "download_done": 0.2, "decode_done": 0.25, "total": 0.26}
    cold = {k: v + 0.5 for k, v in warm.items()}
    lines = verdict(_report(cold, new=4, reused=0), _report(warm), Config(), URL, PROBE)
    text = "\n".join(lines)
    assert lines[0].startswith("dominant: connection set-up"), text
    assert "largest TLS" in text
    assert "ENGINE_PREWARM=https://cdn.example" in text and "Engine.prewarm" in text


def test_decode_and_processor_bound():
    decode = dict(WARM_TRANSFER, download_done=0.5, decode_done=2.5, total=2.52)
    lines = verdict(_report(decode), _report(decode), Config(), URL, PROBE)
    assert lines[0].startswith("dominant: decode (all frames)"), lines
    assert any("ENGINE_DECODER=" in line for line in lines)
    proc = dict(WARM_TRANSFER, download_done=0.5, decode_done=0.6, total=3.0)
    lines = verdict(_report(proc), _report(proc), Config(), URL, PROBE)
    assert lines[0].startswith("dominant: processor"), lines
    assert any("processor" in line and "ENGINE_BATCH" in line for line in lines)
