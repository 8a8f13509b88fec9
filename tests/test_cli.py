"""The commands of the contract, run as a user runs them: real processes, real nginx."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine.shm.sweep import owned_blocks

ROOT = Path(__file__).resolve().parents[1]
REPORT_KEYS = {"url", "ok", "error", "video", "frames_processed", "timings_s", "fetch", "results"}


def engine_cmd(*args, timeout=180, **kw):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kw)


def test_help_lists_every_command():
    out = engine_cmd("--help").stdout
    for command in ("run", "submit", "status", "diagnose", "bench"):
        assert command in out


def test_run_prints_a_summary_and_writes_the_contract_report(cdn, tmp_path):
    path = tmp_path / "r.json"
    res = engine_cmd("run", cdn.url("small.mp4"), "--json", str(path), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout and "first frame" in res.stdout and "bounded by" in res.stdout
    report = json.loads(path.read_text())
    assert REPORT_KEYS <= set(report)
    assert set(report["timings_s"]) == {"connect", "first_byte", "moov_ready", "first_frame",
                                        "first_result", "download_done", "decode_done", "total"}
    assert report["frames_processed"] == 50 and len(report["results"]) == 50
    assert report["fetch"]["http_version"] == "HTTP/1.1"


def test_run_with_a_failing_url_exits_1_with_one_line_per_failure(cdn, tmp_path):
    path = tmp_path / "r.json"
    res = engine_cmd("run", cdn.url("small.mp4"), cdn.url("nope.mp4"), "file:///etc/hosts",
                     "--quiet", "--json", str(path))
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "nope.mp4" in errors[0] and "file:///etc/hosts" in errors[1]
    assert "Traceback" not in res.stderr
    reports = json.loads(path.read_text())
    assert [r["ok"] for r in reports] == [True, False, False]
    assert reports[1]["error"] and "\n" not in reports[1]["error"]


def test_bad_options_give_one_line_errors():
    res = engine_cmd("run", "https://127.0.0.1:1/x.mp4", "--device", "tpu")
    assert res.returncode != 0 and "device" in res.stderr and "Traceback" not in res.stderr
    res = engine_cmd("submit", "https://127.0.0.1:1/x.mp4", "--socket", "/tmp/no-such.sock")
    assert res.returncode == 1 and "no engine is listening" in res.stderr


@pytest.fixture
def served(cdn, tmp_path):
    sock = tmp_path / "engine.sock"
    from engine.demo.nginx import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engine", "run", "--socket", str(sock),
                             "--device", "cpu", "--metrics-port", str(port)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    proc.metrics_port = port
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    try:
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_submit_status_and_clean_stop(served, cdn, tmp_path):
    proc, sock = served
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    path = tmp_path / "s.json"
    res = engine_cmd("submit", cdn.url("small-moov-end.mp4"), "--socket", str(sock), "--json",
                     str(path))
    assert res.returncode == 0, res.stderr
    assert json.loads(path.read_text())["frames_processed"] == 50
    res = engine_cmd("submit", cdn.url("missing.mp4"), "--socket", str(sock), "--quiet")
    assert res.returncode == 1 and "HTTP 404" in res.stderr

    st = json.loads(engine_cmd("status", "--socket", str(sock), "--json").stdout)
    roles = [p["role"] for p in st["processes"]]
    assert roles[0] == "supervisor" and "gpu" in roles
    assert any(r.startswith("fetcher") for r in roles) and any(r.startswith("decoder") for r in roles)
    assert all(p["rss_mb"] for p in st["processes"])
    table = engine_cmd("status", "--socket", str(sock)).stdout
    assert "supervisor" in table and "shared memory" in table

    time.sleep(2.5)   # one psutil sample
    import httpx
    metrics = httpx.get(f"http://127.0.0.1:{proc.metrics_port}/metrics").text
    assert 'engine_process_rss_bytes{role="gpu"}' in metrics and "engine_shm_bytes" in metrics

    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive
    assert not sock.exists()
    assert owned_blocks(proc.pid) == []


def test_serve_refuses_a_socket_in_use(served):
    _, sock = served
    res = engine_cmd("run", "--socket", str(sock), timeout=60)
    assert res.returncode == 1 and "already serving" in res.stderr


def test_workers_past_the_rss_limit_are_recycled_between_jobs(cdn):
    from engine import Engine
    with Engine(processor="engine.processors:null", device="cpu", max_rss_mb=1, fetchers=1,
                decoders=1) as eng:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            procs = eng.status()["processes"]
            if any((p["last_restart_cause"] or "").startswith("recycled at") for p in procs):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no worker was recycled: {procs}")
        assert eng.process(cdn.url("small.mp4")).frames_processed == 50
