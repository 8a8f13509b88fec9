"""Session fixtures: a real nginx HTTPS CDN serving the sample clips; helpers the tests share.

Why session scope: certificate, nginx start and clip generation are paid
once.  The two 14 MB sn44 clips take ~20 s to generate on a cold cache, so
they sit behind their own fixture (``sn44_clips``) that only slow tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.faulty_server import FaultyServer
from engine import Engine, EngineError
from engine.demo.clips import cached_clip
from engine.demo.emulator import CdnEmulator, Profile
from engine.demo.nginx import NginxCDN
from engine.shm.sweep import alive, owned_blocks

SMALL = ("small", "small-moov-end")
SN44 = ("sn44", "sn44-moov-end")
PAGE_HTML = "<!doctype html><html><body><p>an HTML page, not a video</p></body></html>\n"
NULL = "engine.processors:null"
STATS = "engine.processors:stats"
BOUND_S = 240   # a bound on a whole scenario, so a hang fails instead of blocking the run


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
    leaked = []
    for name in _engine_blocks() - before:
        pid = int(name.split("-")[1])
        if pid == os.getpid() or pid in children or not alive(pid):
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


# ------------------------------------------------------------------ shared helpers


def wait_for(predicate, timeout: float, what: str, every: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def run(scenario):
    """Run an asyncio scenario to its end, bounded by ``BOUND_S``."""
    return asyncio.run(asyncio.wait_for(scenario, BOUND_S))


def gone(p: psutil.Process) -> bool:
    """The process has exited (a zombie has exited too: it only waits to be reaped)."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def moving_frame(i: int, w: int, h: int) -> np.ndarray:
    """A frame that differs from its neighbours: a moving gradient and a bright block."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = (x * 255 // w + 5 * i) % 256
    img[..., 1] = (y * 255 // h) % 256
    img[..., 2] = (128 + 3 * i) % 256
    bx = (i * 7) % (w - 40)
    img[20:60, bx:bx + 40] = 250
    return img


@pytest.fixture
def slow_cdn(cdn, sn44_clips):
    """The nginx CDN behind an emulated slow link (0.5 MB/s per connection): a 14 MB
    download takes seconds, so a process can be killed while the job is in flight."""
    emu = CdnEmulator("127.0.0.1", cdn.port, Profile("slow", 0.02, 0, 5e5, None)).start()
    try:
        yield emu
    finally:
        emu.stop()


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="a private tmpfs on /dev/shm needs root and unshare")


def in_small_shm(size: str) -> list[str]:
    """A command prefix: run in a private mount namespace whose /dev/shm is a tmpfs of ``size``."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"', "sh"]


class Served:
    """``python -m engine run --socket PATH`` in a subprocess of this test."""

    def __init__(self, tmp_path, processor=NULL, prefix=(), **env):
        self.path = str(tmp_path / "engine.sock")
        self.log = open(tmp_path / "serve.log", "w+")
        full = dict(os.environ, ENGINE_DEVICE="cpu", ENGINE_LOG_LEVEL="INFO",
                    **{k: str(v) for k, v in env.items()})
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "engine", "run", "--socket", self.path,
             "--processor", processor], env=full, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(self.path) or self.proc.poll() is not None, 60,
                 "the engine to listen")
        assert self.proc.poll() is None, self.output()
        self.seen: dict[int, psutil.Process] = {}
        with self.client() as c:
            wait_for(lambda: all(p["pid"] for p in c.status()["processes"]), 60,
                     "every worker to run")
        self.remember()

    def client(self):
        return Engine.connect(self.path)

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def remember(self) -> None:
        for p in self.children():
            self.seen.setdefault(p.pid, p)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.remember()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("serve mode did not stop within 15 s of SIGTERM")
        assert code == 0, f"serve mode exited {code}:\n{self.output()[-3000:]}"
        wait_for(lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
                             for p in self.seen.values()), 10, "every child to exit")
        assert owned_blocks(self.proc.pid) == [], "segments left after serve mode stopped"
        # (a private /dev/shm of the engine's own namespace ends with it)
        assert not os.path.exists(self.path), "socket left after serve mode stopped"


@contextlib.contextmanager
def served(tmp_path, **kw):
    s = Served(tmp_path, **kw)
    try:
        yield s
    finally:
        s.stop()


class Job(threading.Thread):
    def __init__(self, path, url, **options):
        super().__init__(daemon=True)
        self.path, self.url, self.options = path, url, options
        self.report = self.error = None
        self.start()

    def run(self):
        try:
            with Engine.connect(self.path) as c:
                self.report = c.process(self.url, **self.options)
        except EngineError as exc:
            self.error = exc

    def outcome(self, timeout: float):
        self.join(timeout)
        assert not self.is_alive(), f"job {self.url} did not end within {timeout:g} s"
        return self.report, self.error
