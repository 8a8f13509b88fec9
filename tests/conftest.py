"""Session fixtures: a real nginx HTTPS CDN serving the sample clips.

Why session scope: certificate, nginx start and clip generation are paid
once.  The two 14 MB sn44 clips take ~20 s to generate on a cold cache, so
they sit behind their own fixture (``sn44_clips``) that only slow tests use.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.faulty_server import FaultyServer
from engine.demo.clips import cached_clip
from engine.demo.nginx import NginxCDN

SMALL = ("small", "small-moov-end")
SN44 = ("sn44", "sn44-moov-end")
PAGE_HTML = "<!doctype html><html><body><p>an HTML page, not a video</p></body></html>\n"


def _place(src: Path, dst: Path) -> Path:
    """Hard-link src to dst (copy when across file systems)."""
    if not dst.exists():
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return dst


@pytest.fixture(scope="session")
def small_clips() -> dict[str, Path]:
    """{'small': Path, 'small-moov-end': Path}: cached files; served by ``cdn`` as NAME.mp4."""
    return {name: cached_clip(name) for name in SMALL}


@pytest.fixture(scope="session")
def cdn(tmp_path_factory, small_clips):
    """A started NginxCDN; root holds small.mp4, small-moov-end.mp4, page.html.

    SSL_CERT_FILE points at its certificate for the session, so plain
    ``httpx.Client()`` (and child processes) trust it.
    """
    root = tmp_path_factory.mktemp("cdn-root")
    for name, path in small_clips.items():
        _place(path, root / f"{name}.mp4")
    (root / "page.html").write_text(PAGE_HTML)
    server = NginxCDN(root, tmp_path_factory.mktemp("nginx")).start()
    old = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(server.ca_file)
    try:
        yield server
    finally:
        if old is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = old
        server.stop()


@pytest.fixture(scope="session")
def sn44_clips(cdn) -> dict[str, Path]:
    """{'sn44': Path, 'sn44-moov-end': Path}: cached files, now also served by ``cdn`` as NAME.mp4.

    Slow (~20 s) only when the cache is cold.
    """
    clips = {name: cached_clip(name) for name in SN44}
    for name, path in clips.items():
        _place(path, cdn.root / f"{name}.mp4")
    return clips


@pytest.fixture
def faulty_server(cdn):
    """Factory: ``faulty_server(data, mode='ok') -> started FaultyServer``, stopped after the test."""
    servers: list[FaultyServer] = []

    def make(data: bytes, mode: str = "ok", content_type: str | None = "video/mp4") -> FaultyServer:
        server = FaultyServer(data, certfile=cdn.cert_file, keyfile=cdn.key_file, mode=mode,
                              content_type=content_type)
        servers.append(server.start())
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def engine(cdn):
    """One shared engine (stats processor, CPU) for tests that do not break it."""
    from engine import Engine
    with Engine(processor="engine.processors:stats", device="cpu", fetchers=2, connections=2,
                decoders=2, job_timeout_s=60.0) as eng:
        yield eng


def engine_children() -> list:
    """Engine processes (supervisors, workers) descended from this test session."""
    import psutil
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline() or [])
        except psutil.Error:
            continue
        if ("engine" in cmd or "multiprocess.spawn" in cmd) and "resource_tracker" not in cmd:
            out.append(p)
    return out


def _engine_blocks() -> set[str]:
    from engine.shm.block import PREFIX, SHM_DIR
    return {n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX)}


def _leaked(before: set[str], children: set[int]) -> list[str]:
    """Blocks that appeared during the session and whose owner is dead or ours."""
    from engine.shm.sweep import _alive
    leaked = []
    for name in _engine_blocks() - before:
        pid = int(name.split("-")[1])
        if pid == os.getpid() or pid in children or not _alive(pid):
            leaked.append(name)
    return sorted(leaked)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """After the whole session: no engine segment and no engine process of ours remains."""
    import time
    before = _engine_blocks()
    yield
    deadline = time.monotonic() + 10
    while True:
        procs = [p for p in engine_children() if p.is_running() and p.status() != "zombie"]
        segs = _leaked(before, {p.pid for p in procs})
        if not segs and not procs or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not segs, f"shared-memory segments left behind: {segs}"
    assert not procs, f"engine processes left behind: {procs}"
