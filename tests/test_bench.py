"""Smoke test of ``python -m engine bench``: tiny clip, LAN profile, one run, two contenders."""
from __future__ import annotations

import json
import os

import pytest


@pytest.mark.timeout(120)
def test_bench_smoke(tmp_path, capsys):
    from engine.tools.bench import main

    out = tmp_path / "bench.json"
    ca_before = os.environ.get("SSL_CERT_FILE")
    rc = main(["--profile", "lan", "--clip", "small", "--runs", "1",
               "--contenders", "engine-warm,stock", "--json", str(out)])
    assert rc == 0
    assert os.environ.get("SSL_CERT_FILE") == ca_before      # restored after the bench
    data = json.loads(out.read_text())
    assert data["contenders"] == ["engine-warm", "stock"]
    for name in ("engine-warm", "stock"):
        runs = [r for r in data["runs"] if r["contender"] == name]
        assert len(runs) == 1
        run = runs[0]
        assert run["ok"], run.get("error")
        assert run["t"]["total"] > 0
        assert run["frames"] == 50
        assert data["summary"][name]["total"]["median"] > 0
    table = capsys.readouterr().out
    assert "engine-warm" in table and "stock" in table and "total/warm" in table


@pytest.mark.timeout(120)
def test_bench_fetch_smoke(tmp_path, capsys):
    import shutil

    from engine.tools.bench import main

    out = tmp_path / "fetch.json"
    ca_before = os.environ.get("SSL_CERT_FILE")
    rc = main(["--fetch", "--profile", "lan", "--clip", "small", "--runs", "1",
               "--json", str(out)])
    assert rc == 0
    assert os.environ.get("SSL_CERT_FILE") == ca_before
    data = json.loads(out.read_text())
    size = data["video"]["bytes"]
    measured = ["engine-warm", "engine-cold", "httpx-get"]
    if shutil.which("aria2c"):
        measured.append("aria2")
    for name in measured:
        runs = [r for r in data["runs"] if r["contender"] == name]
        assert len(runs) == 1 and runs[0]["ok"], runs
        assert runs[0]["t"]["download_done"] > 0
        assert runs[0]["wire_bytes"] >= size            # the emulator saw the whole file
    assert data["summary"]["engine-cold"]["startup_s"] > 0
    assert data["summary"]["link"]["download_done"]["median"] == 0.0   # lan: no RTT, no cap
    assert {c["goal"] for c in data["checks"]} == {
        "warm engine >= 0.9 x aggregate capacity", "no slower than aria2",
        "warm time-to-first-byte within 1.2 x one RTT"}
    table = capsys.readouterr().out
    assert "all bytes local s" in table and "link-cold" in table and "goal checks" in table


@pytest.mark.timeout(180)
def test_bench_model_bound_smoke(tmp_path, capsys, monkeypatch):
    import shutil

    from engine.tools.bench import main

    monkeypatch.setenv("ENGINE_WAIT_MS_PER_FRAME", "2")
    out = tmp_path / "model.json"
    contenders = ["engine-warm", "decord-file"] + (["ffmpeg-cli"] if shutil.which("ffmpeg") else [])
    rc = main(["--model-bound", "--profile", "lan", "--clip", "small", "--runs", "1",
               "--contenders", ",".join(contenders), "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["processor"] == "engine.processors:wait"
    for name in contenders:
        run, = [r for r in data["runs"] if r["contender"] == name]
        assert run["ok"] and run["frames"] == 50, run
        assert run["model_s"] == 0.1                        # 50 frames x 2 ms
        assert run["model_idle_s"] == round(run["t"]["total"] - 0.1, 4)
        assert run["t"]["total"] >= 0.1                     # the model's time is inside it
    table = capsys.readouterr().out
    assert "model idle s" in table and "decord-file" in table


def test_runner_rotates_skips_and_derives_rows():
    """The runner alone, on a stand-in context: no CDN, no subprocess."""
    import time
    from types import SimpleNamespace

    from engine.tools.bench.contenders import Contender
    from engine.tools.bench.runner import Runner
    from engine.tools.bench.tables import summarize

    class Ctx:
        a = SimpleNamespace(runs=3, budget=1e9)
        started = time.monotonic()
        emu = SimpleNamespace(stats=lambda: {"bytes_server_to_client": 0, "connections_accepted": 0})

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    order = []

    class Fake(Contender):
        def run(self, ctx):
            order.append(self.name)
            if self.name != "x":
                return {"ok": True, "t": {"total": 1.0}}
            return {"ok": True, "t": {"total": 2.0},
                    "also": {"x-floor": {"ok": True, "t": {"total": 0.5}}}}

    class Absent(Contender):
        def missing(self):
            return "not installed"

    runner = Runner(Ctx(), "total")
    rows = runner.measure([Fake("engine-warm"), Fake("x", "x-floor"), Absent("gone")])
    assert rows == ["engine-warm", "x", "x-floor", "gone"]
    assert order == ["engine-warm", "x", "x", "engine-warm", "engine-warm", "x"]
    summary = summarize(runner.runs, rows, ("total",), (), {"ratio_total": "total"})
    assert summary["x"]["ratio_total"] == 2.0 and summary["x-floor"]["runs_ok"] == 3
    assert summary["gone"] == {"runs_ok": 0, "runs_failed": 0, "skipped": "not installed"}


@pytest.mark.timeout(180)
def test_bench_sparse_smoke(tmp_path, capsys):
    """Both parts on the small clip: the engine with two lanes and one, the tables, the
    plots and the raw runs; the next job after each left the pool warm."""
    from engine.tools.bench import main

    out, png = tmp_path / "sparse.json", tmp_path / "sparse.png"
    rc = main(["--sparse", "--profile", "lan", "--clip", "small", "--every-clip", "small",
               "--runs", "1", "--count", "4", "--contenders", "engine,engine-1lane,pyav-whole",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    data = json.loads(out.read_text())
    one = {r["contender"]: r for r in data["part_one"]["runs"]}
    assert set(one) == {"engine", "engine-1lane", "pyav-whole"}
    assert one["pyav-whole"]["ok"] and one["pyav-whole"]["frames"] == 4
    for run in (one["engine"], one["engine-1lane"]):
        assert run["ok"] and run["frames"] == 4 and run["next_conns_new"] == 0
        assert 4 <= run["frames_decoded"] < 50
    two = {r["contender"]: r for r in data["part_two"]["runs"]}
    assert two["engine-every5"]["frames"] == 10 and two["engine-all"]["frames"] == 50
    assert png.stat().st_size > 0 and (tmp_path / "sparse-every.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "engine-1lane" in table and "decoded" in table
