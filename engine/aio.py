"""The asyncio face of the engine: ``AsyncEngine`` (spawns and owns one) and
``AsyncEngine.connect`` (talks to one started with ``python -m engine run``), with the
blocking API's methods as coroutines.

One task per connection reads the socket with asyncio streams (no thread); each job
waits on its own queue, so one event loop runs many jobs at once. Cancelling the task
that awaits a job (``task.cancel()``, ``asyncio.wait_for`` expiring, a web client that
hangs up) cancels the job in the engine.
"""
from __future__ import annotations

import asyncio
import itertools
import struct
from contextlib import aclosing

from multiprocess.reduction import ForkingPickler

from engine.api import START_TIMEOUT_S, engine_config, reap, spawn, submit_message, take_frames
from engine.config import Config, default_socket_path
from engine.errors import EngineClosed, EngineError, error_from
from engine.messages import CancelJob, JobDone, Prewarm, Reply, ResultBatch, StatusQuery
from engine.report import Batch, Frames, Report, VideoResult, raise_for

# multiprocess.connection's framing: the supervisor reads and writes with it.
_SIZE = struct.Struct("!i")
_LONG_SIZE = struct.Struct("!Q")
_LONG = -1


def frame(msg) -> bytes:
    body = ForkingPickler.dumps(msg)
    if len(body) > 0x7fffffff:
        return _SIZE.pack(_LONG) + _LONG_SIZE.pack(len(body)) + body
    return _SIZE.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader):
    size, = _SIZE.unpack(await reader.readexactly(_SIZE.size))
    if size == _LONG:
        size, = _LONG_SIZE.unpack(await reader.readexactly(_LONG_SIZE.size))
    return ForkingPickler.loads(await reader.readexactly(size))


class AsyncEngineClient:
    """Jobs over one connection from one event loop. ``await`` it (or ``async with``)
    to connect."""

    def __init__(self, socket_path: str | None = None):
        self.socket_path = socket_path
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task | None = None
        self._tokens = itertools.count(1)
        self._waiting: dict[int, asyncio.Queue] = {}
        self._closed = False
        self._refused: Reply | None = None   # the engine's word before it hung up (busy)

    # -- connection ----------------------------------------------------------------------
    async def _open_streams(self):
        path = self.socket_path or default_socket_path()
        try:
            return await asyncio.open_unix_connection(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise EngineClosed(f"no engine is listening on {path} "
                               "(start one with: python -m engine run)") from None

    async def start(self):
        if self._writer is None:
            reader, self._writer = await self._open_streams()
            self._reader = asyncio.create_task(self._read(reader), name="engine-aio-reader")
        return self

    def __await__(self):
        return self.start().__await__()

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    # -- plumbing --------------------------------------------------------------------
    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg = await read_message(reader)
                q = self._waiting.get(msg.token)
                if q is not None:
                    q.put_nowait(msg)
                elif isinstance(msg, Reply) and msg.error:
                    self._refused = msg
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._closed = True
            for q in self._waiting.values():
                q.put_nowait(None)

    def _open(self, token: int) -> asyncio.Queue:
        q = self._waiting[token] = asyncio.Queue()
        return q

    def _write(self, msg) -> None:
        if self._closed or self._writer is None:
            raise EngineClosed("the engine is not running")
        self._writer.write(frame(msg))

    async def _send(self, msg) -> None:
        self._write(msg)
        try:
            await self._writer.drain()
        except (OSError, EOFError):
            raise EngineClosed("the engine is not running") from None

    async def _get(self, q: asyncio.Queue, timeout: float | None = None):
        try:
            msg = await asyncio.wait_for(q.get(), timeout)
        except asyncio.TimeoutError:
            raise EngineError("the engine did not answer in time") from None
        if msg is None:
            if self._refused is not None:
                raise error_from(self._refused.kind, self._refused.error)
            raise EngineClosed("the engine stopped (its supervisor exited)")
        return msg

    async def _call(self, make, timeout: float | None = 60.0, token: int | None = None) -> dict:
        token = next(self._tokens) if token is None else token
        q = self._open(token)
        try:
            await self._send(make(token))
            reply = await self._get(q, timeout)
        finally:
            self._waiting.pop(token, None)
        if reply.error:
            raise error_from(reply.kind, reply.error)
        return reply.payload

    def _cancel(self, token: int) -> None:
        """Synchronous on purpose: it runs while the awaiting task is being cancelled."""
        try:
            self._write(CancelJob(token=token))
        except EngineClosed:
            pass

    # -- the interface -------------------------------------------------------------------
    async def prewarm(self, origins) -> int:
        """Open pooled connections to these origins now; returns how many were opened."""
        if isinstance(origins, str):
            origins = [origins]
        opened = await self._call(lambda t: Prewarm(token=t, origins=tuple(origins)),
                                  timeout=120.0)
        return opened["opened"]

    async def status(self) -> dict:
        return await self._call(lambda t: StatusQuery(token=t))

    async def wait_ready(self, timeout: float | None = 60.0) -> dict:
        """Until every worker is up, as after a worker's restart (``Engine.wait_ready``)."""
        return (await self._call(lambda t: StatusQuery(token=t, ready=True), timeout)
                ).get("workers", {})

    async def submit(self, url: str, *, stream: bool = False, **options):
        """Start a job; yields ``Batch`` objects if streaming, then the ``Report``.
        Leaving early (cancelled, closed) cancels the job in the engine."""
        msg = submit_message(next(self._tokens), url, stream, **options)
        token, q = msg.token, self._open(msg.token)
        try:
            await self._send(msg)
            while True:
                msg = await self._get(q)
                if isinstance(msg, JobDone):
                    self._waiting.pop(token, None)   # over: nothing to cancel
                    yield Report.from_dict(msg.report)
                    return
                if isinstance(msg, ResultBatch):
                    yield msg.batch
        finally:
            if self._waiting.pop(token, None) is not None and not self._closed:
                self._cancel(token)

    async def report(self, url: str, **options) -> Report:
        """Like ``process`` but returns a failed report instead of raising."""
        async with aclosing(self.submit(url, **options)) as items:
            async for item in items:
                pass
        return item

    async def process(self, url: str, **options) -> Report:
        """Run one job to the end. Raises ``FetchError``, ``DecodeError``,
        ``ProcessorError`` or ``JobTimeout`` (with ``.report``) when it fails."""
        report = await self.report(url, **options)
        raise_for(report)
        return report

    async def frames(self, url: str, **selection) -> Frames:
        """The selected frames themselves, moved through shared memory (``Engine.frames``):
        ``.array`` (uint8 ``[N, H, W, 3]`` RGB), ``.frame_numbers``, ``.report``."""
        report = await self.report(url, return_frames=True, **selection)
        return take_frames(report, self._write)

    async def stream(self, url: str, **options):
        """Yield result batches as they are produced, in frame order; then, if the
        processor gave a video result (``end()``, not None), a ``VideoResult``. Leaving
        the loop early cancels the job once the generator is closed
        (``contextlib.aclosing`` closes it at once)."""
        async with aclosing(self.submit(url, stream=True, **options)) as items:
            async for item in items:
                if isinstance(item, Batch):
                    yield item
                    continue
                raise_for(item)
                self.last_report = item
                if item.video_result is not None:
                    yield VideoResult(item.video_result)


class AsyncEngine(AsyncEngineClient):
    """Spawns a supervisor and its workers on ``start`` (``async with``, ``await``);
    ``close`` stops them all and removes every segment they made. Same arguments as
    ``Engine``, on this machine only."""

    def __init__(self, processor: str | None = None, device: str | None = None, *,
                 config: Config | None = None, cluster: str | None = None, **overrides):
        super().__init__()
        if cluster if cluster is not None else (config or Config.from_env()).cluster:
            raise EngineError("AsyncEngine runs on this machine only: serve the cluster "
                              "(python -m engine run --cluster ADDRESS) and use "
                              "AsyncEngine.connect")
        self.config = engine_config(processor, device, config, dict(overrides, cluster=cluster))
        self._process = None
        self.workers: dict = {}

    @staticmethod
    def connect(socket_path: str | None = None) -> AsyncEngineClient:
        """A client of the engine serving on this socket; ``await`` it or ``async with``."""
        return AsyncEngineClient(socket_path)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def _open_streams(self):
        self._process, mine = spawn(self.config)
        return await asyncio.open_unix_connection(sock=mine)

    async def start(self):
        if self._writer is not None:
            return self
        try:
            await super().start()
            ready = await self._call(lambda t: StatusQuery(token=t, ready=True),
                                     START_TIMEOUT_S, token=0)
            self.workers = ready.get("workers", {})
            if self.config.prewarm:
                await self.prewarm(list(self.config.prewarm))
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Stop the supervisor and every worker; remove every segment they made."""
        await super().close()
        if self._process is not None:
            # the wait for the supervisor to exit is a blocking call: off the loop
            await asyncio.to_thread(reap, self._process)
            self._process = None
