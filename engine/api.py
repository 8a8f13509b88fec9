"""What a miner imports: ``Engine`` (spawns and owns an engine) and ``Engine.connect``
(talks to one started with ``python -m engine run``). Both speak the same messages over
a ``multiprocess`` connection, so they share this one client.
"""
from __future__ import annotations

import itertools
import os
import queue
import threading

import socket
import subprocess
import sys

import numpy as np
from multiprocess.connection import Client, Connection

from engine.config import Config, check_device
from engine.errors import EngineClosed, EngineError, error_from
from engine.messages import (CancelJob, JobDone, Prewarm, ReleaseFrames, ResultBatch,
                             StatusQuery, Submit)
from engine.report import Batch, Frames, Report, VideoResult, raise_for
from engine.selection import Selection
from engine.shm import SharedBlock, ShmError

START_TIMEOUT_S = 120.0
CLUSTER_START_TIMEOUT_S = 300.0   # Ray joined, an actor placed and its engine up
CLUSTER_STOP_S = 60.0             # every actor's engine stopped, then the actors


def submit_message(token: int, url: str, stream: bool = False, *,
                   processor: str | None = None, return_frames: bool = False,
                   **selection) -> Submit:
    """The job's message, its selection checked first (``engine.selection``): a
    malformed one or an unknown option raises here, before anything is sent."""
    return Submit(token=token, url=url, processor=processor, stream=stream,
                  selection=Selection.of(**selection), return_frames=return_frames)


def take_frames(report: Report, send) -> Frames:
    """Copy a finished ``frames`` job's frames out of its output block; then the engine
    may unlink it (``send(ReleaseFrames)``)."""
    raise_for(report)
    out = report.video_result or {}
    report.video_result = None
    try:
        block = SharedBlock.attach(out["output"])
    except ShmError as exc:
        raise EngineError(f"{report.url}: the frames are gone ({exc})") from None
    try:
        shape = tuple(out["shape"])
        array = np.frombuffer(block.mm, np.uint8, count=int(np.prod(shape))).reshape(shape).copy()
    finally:
        block.close()
        send(ReleaseFrames(output=out["output"]))
    return Frames(array, list(out["frame_numbers"]), report)


def _child_env() -> dict:
    """The supervisor imports what this process can import (the engine, and the
    caller's processor modules), whether or not they are installed."""
    env = dict(os.environ)
    paths = [os.path.abspath(p or os.getcwd()) for p in sys.path if os.path.isdir(p or ".")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def engine_config(processor: str | None, device: str | None, config: Config | None,
                  overrides: dict) -> Config:
    """An owned engine's config from its constructor's arguments (bad ones raise here)."""
    if device is not None:
        device = check_device(device)
    return (config or Config.from_env()).with_(processor=processor, device=device, **overrides)


def spawn(config: Config) -> tuple[subprocess.Popen, socket.socket]:
    """Start a supervisor (it starts its workers), or a cluster's dispatcher: its process
    and our end of its socket. The blocking and the asyncio engines both start theirs here."""
    mine, theirs = socket.socketpair()
    module = "engine.cluster" if config.cluster else "engine.supervisor"
    process = subprocess.Popen(
        [sys.executable, "-m", module, str(theirs.fileno())],
        pass_fds=[theirs.fileno()], env=_child_env())
    theirs.close()
    with Connection(os.dup(mine.fileno())) as conn:
        conn.send(config)
    return process, mine


def reap(process: subprocess.Popen, wait_s: float = 8.0) -> None:
    """Wait for a supervisor told to stop (kill it if it does not); remove its segments."""
    try:
        process.wait(wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(2.0)
    from engine.shm.sweep import owned_blocks
    from engine.shm.block import unlink_block
    for name in owned_blocks(process.pid):
        unlink_block(name)


class EngineClient:
    """Jobs over one connection; safe to use from several threads at once."""

    def __init__(self, conn):
        self._conn = conn
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._waiting: dict[int, queue.Queue] = {}
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="engine-client", daemon=True)
        self._reader.start()

    # -- plumbing --------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError, TypeError):   # TypeError: closed under the read
                break
            q = self._waiting.get(msg.token)
            if q is not None:
                q.put(msg)
        self._closed = True
        for q in list(self._waiting.values()):
            q.put(None)

    def _open(self, token: int | None = None) -> tuple[int, queue.Queue]:
        token = next(self._tokens) if token is None else token
        q = self._waiting[token] = queue.Queue()
        return token, q

    def _send(self, msg) -> None:
        if self._closed:
            raise EngineClosed("the engine is not running")
        with self._lock:
            try:
                self._conn.send(msg)
            except (OSError, EOFError):
                raise EngineClosed("the engine is not running") from None

    def _get(self, q: queue.Queue, timeout: float | None = None):
        try:
            msg = q.get(timeout=timeout)
        except queue.Empty:
            raise EngineError("the engine did not answer in time") from None
        if msg is None:
            raise EngineClosed("the engine stopped (its supervisor exited)")
        return msg

    def _call(self, make, timeout: float | None = 60.0, token: int | None = None) -> dict:
        token, q = self._open(token)
        try:
            self._send(make(token))
            reply = self._get(q, timeout)
        finally:
            self._waiting.pop(token, None)
        if reply.error:
            raise error_from(reply.kind, reply.error)
        return reply.payload

    # -- the interface -------------------------------------------------------------------
    def prewarm(self, origins) -> int:
        """Open pooled connections to these origins now; returns how many were opened."""
        if isinstance(origins, str):
            origins = [origins]
        opened = self._call(lambda t: Prewarm(token=t, origins=tuple(origins)), timeout=120.0)
        return opened["opened"]

    def status(self) -> dict:
        return self._call(lambda t: StatusQuery(token=t))

    def wait_ready(self, timeout: float | None = 60.0) -> dict:
        """Until every worker is up, as after a worker's restart; returns what each said
        when it started. Raises the error of a worker that cannot start."""
        return self._call(lambda t: StatusQuery(token=t, ready=True), timeout).get("workers", {})

    def submit(self, url: str, *, processor: str | None = None, stream: bool = False,
               **selection):
        """Start a job; yields ``Batch`` objects if streaming, then the ``Report``.
        ``selection``: the frames wanted (``every``, ``fps``, ``count``, ``frames``,
        ``start_s``, ``end_s``, ``max_frames``; default all); a malformed one raises
        ``SelectionError`` (a ``ValueError``) before anything is sent."""
        return self._job(submit_message(next(self._tokens), url, stream, processor=processor,
                                        **selection))

    def frames(self, url: str, **selection) -> Frames:
        """The selected frames themselves (all by default: mind the memory), moved through
        shared memory: ``.array`` (uint8 ``[N, H, W, 3]`` RGB), ``.frame_numbers``,
        ``.report``. Raises like ``process``."""
        msg = submit_message(next(self._tokens), url, return_frames=True, **selection)
        *_, report = self._job(msg)
        return take_frames(report, self._send)

    def _job(self, msg: Submit):
        token, q = self._open(msg.token)
        try:
            self._send(msg)
            while True:
                msg = self._get(q)
                if isinstance(msg, ResultBatch):
                    yield msg.batch
                elif isinstance(msg, JobDone):
                    yield Report.from_dict(msg.report)
                    return
        finally:
            if self._waiting.pop(token, None) is not None and not self._closed:
                try:
                    self._send(CancelJob(token=token))
                except EngineClosed:
                    pass

    def report(self, url: str, **options) -> Report:
        """Like ``process`` but returns a failed report instead of raising."""
        *_, report = self.submit(url, **options)
        return report

    def process(self, url: str, *, processor: str | None = None, **selection) -> Report:
        """Run one job to the end. Raises ``FetchError``, ``DecodeError``,
        ``ProcessorError`` or ``JobTimeout`` (with ``.report``) when it fails."""
        report = self.report(url, processor=processor, **selection)
        raise_for(report)
        return report

    def stream(self, url: str, *, processor: str | None = None, **selection):
        """Yield result batches as they are produced, in frame order; then, if the
        processor gave a video result (``end()``, not None), a ``VideoResult``."""
        for item in self.submit(url, processor=processor, stream=True, **selection):
            if isinstance(item, Batch):
                yield item
            else:
                raise_for(item)
                self.last_report = item
                if item.video_result is not None:
                    yield VideoResult(item.video_result)

    def close(self) -> None:
        self._closed = True
        try:
            # shutdown, not just close: our reader thread is blocked in recv on this
            # socket, and a plain close would neither wake it nor tell the other end.
            socket.socket(fileno=os.dup(self._conn.fileno())).shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        # The reader must be out of recv before the fd is closed: a closed fd number is
        # reused at once by the next connection of this process, whose bytes the old
        # reader would otherwise steal (seen with many clients in threads: the soak).
        if threading.current_thread() is not self._reader:
            self._reader.join(5.0)
        try:
            self._conn.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Engine(EngineClient):
    """Spawns an engine and owns it; ``close`` (or leaving ``with``) stops it all.

    ``cluster=ADDRESS`` (default ``ENGINE_CLUSTER``; "" for this machine): one engine per
    GPU of a Ray cluster, driven by a child process (``engine.cluster``) that speaks the
    local engine's messages, so this client is the same either way.
    """

    def __init__(self, processor: str | None = None, device: str | None = None, *,
                 config: Config | None = None, cluster: str | None = None, **overrides):
        self.config = engine_config(processor, device, config, dict(overrides, cluster=cluster))
        self._process, mine = spawn(self.config)
        super().__init__(Connection(mine.detach()))
        # token 0: a cluster's child that cannot start answers it unasked
        timeout = CLUSTER_START_TIMEOUT_S if self.config.cluster else START_TIMEOUT_S
        try:
            self.workers = self._call(lambda t: StatusQuery(token=t, ready=True), timeout,
                                      token=0).get("workers", {})
        except EngineError:
            self.close()
            raise
        if self.config.prewarm:
            self.prewarm(list(self.config.prewarm))

    @property
    def pid(self) -> int:
        return self._process.pid

    @staticmethod
    def connect(socket_path: str | None = None) -> EngineClient:
        from engine.config import default_socket_path
        path = socket_path or default_socket_path()
        try:
            conn = Client(path, family="AF_UNIX")
        except (FileNotFoundError, ConnectionRefusedError):
            raise EngineClosed(f"no engine is listening on {path} "
                               "(start one with: python -m engine run)") from None
        return EngineClient(conn)

    def close(self) -> None:
        """Stop the supervisor and every worker; remove every segment they made."""
        super().close()
        proc = getattr(self, "_process", None)
        if proc is None:
            return
        reap(proc, CLUSTER_STOP_S if self.config.cluster else 8.0)
        self._process = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
