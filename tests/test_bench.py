"""Smoke test of ``python -m engine bench``: tiny clip, LAN profile, one run, two contenders."""
from __future__ import annotations

import json
import os

import pytest


@pytest.mark.timeout(120)
def test_bench_smoke(tmp_path, capsys):
    from tools.bench import main

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
