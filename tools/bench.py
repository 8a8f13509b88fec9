"""``python -m engine bench``: the engine side by side with the methods miners use today.

One run starts the bundled local CDN (nginx behind the CDN emulator with a named network
profile), serves one clip, and measures every contender ``--runs`` times, interleaving
the contenders round by round (the order rotates each round) so that drift and noise
spread over all of them:

* ``engine-warm`` -- one Engine, started once outside the timing, prewarmed to the origin
  before each job (a running miner's steady state). Timings are the engine's report
  (seconds since submit); the wall clock around the call is recorded too.
* ``engine-cold`` -- a fresh Engine in a fresh process, first job; the start-up (what a
  miner pays once) is its own column.
* ``stock`` -- the SN44 stock miner: one ``httpx.AsyncClient`` GET of the whole file into
  memory, a temp file, then ``cv2.VideoCapture`` frame by frame, BGR->RGB, processor on
  batches of one.
* ``seed-fork`` -- the seed fork's partial download: pooled HTTP/2 ``httpx.Client`` (the
  pool warmed by an earlier request, as in a running miner), GET of the first N MB
  (``--prefix-mb``, 4) to a temp file, then OpenCV on that prefix: it only sees the frames
  inside it, so its frame count (coverage) matters as much as its time.
* ``pyav-url`` -- ``av.open(url)`` on FFmpeg's own HTTPS (verifying the CDN's CA via
  ``ca_file``/``tls_verify``), decode to rgb24, processor per frame.
* ``limit`` -- not a method but the physical floor for this file on this link and this
  machine: the transfer at the link's aggregate rate, and the decode+process time of the
  same file from local disk measured in this run (see ``limit_from``); ``limit-pipelined``,
  shown with it, lets decode and processor overlap perfectly (decode alone vs processor
  alone), the floor for a pipeline like the engine's.

``python -m engine bench --model-bound`` puts a GPU model's stand-in in every contender's
place of the processor (``engine.processors:wait``: ``ENGINE_WAIT_MS_PER_FRAME`` ms a frame,
asleep) and adds model time (frames x that) and model idle (total - model time); the
warm engine's idle is split by the processor's own timeline (before its first call,
between growing batches, between full batches, after its last call, sleeps overrun).
Its default contenders are ``engine-warm`` and the peers a user would pick instead:
``ffmpeg-cli`` (the ``ffmpeg`` command line reading the URL, ``-hwaccel cuda`` on a GPU,
raw RGB frames piped to the processor in batches) and ``decord-file`` (one GET to a temp
file, then decord's ``get_batch``).

``python -m engine bench --fetch`` compares the transfer alone (time until every byte of
the clip is local, no decoding in the measure) -- see ``fetch_main``: ``engine-warm``
(prewarmed, ``engine.processors:null``, the report's ``download_done``), ``engine-cold``
(a fresh engine's first job; start-up apart), ``httpx-get`` (one streamed GET to a temp
file on a new connection), ``aria2`` (``aria2c -x16 -s16 -k1M``, subprocess wall clock)
and ``link`` (the floor: RTT + size / total_bps), with the issue's three goal checks.

Both modes are the same small framework: each contender is a ``Contender`` (``prepare``
once off the clock, ``run`` once per round returning a measurement dict), a ``Context``
holds what they run on (the clip, the local CDN, SSL_CERT_FILE, the workers' environment,
the warm engine), and one ``Runner`` owns the rounds, the notes and the JSON file;
``summarize`` and ``_table`` turn the measurements into medians [min-max] and tables.

Each subprocess contender runs as ``python -m engine.tools.bench --worker NAME ...`` and prints
one JSON line; imports and the processor's load happen before its clock starts. CPU is
user+sys of the measured process tree over the timed part; memory is the peak of the
tree's summed RSS (shared memory counted once per process that maps it) and summed PSS
(shared pages split between the processes mapping them), sampled every 50/250 ms.
Connections and bytes on the wire come from the emulator's own counters, so they are
known for every contender.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH-RESULT "
CONTENDERS = ("engine-warm", "engine-cold", "stock", "seed-fork", "pyav-url", "limit")
# --model-bound: the wait processor (a GPU model's stand-in) and the peers a user would pick
MODEL_CONTENDERS = ("engine-warm", "ffmpeg-cli", "decord-file")
WAIT_PROCESSOR = "engine.processors:wait"
STAGE_KEYS = ("connect", "first_byte", "moov_ready", "first_frame", "first_result",
              "download_done", "decode_done", "total")
FETCH_CONTENDERS = ("engine-warm", "engine-cold", "httpx-get", "aria2", "link")
NULL_PROCESSOR = "engine.processors:null"


# ----------------------------------------------------------------------------- measuring
def _proc_mem(pid: int, pss: bool) -> tuple[int, int | None]:
    """(RSS, PSS or None) of one process, in bytes, straight from /proc."""
    rss = None
    try:
        with open(f"/proc/{pid}/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0, None
    if not pss:
        return rss, None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return rss, int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, None


class TreeMeter:
    """CPU seconds (user+sys) and peak memory of a process and all its descendants.

    A process seen during the window counts with its last sampled CPU time if it is gone
    at the end (at most one sample interval lost); one that existed at the start counts
    only what it used after the start.
    """

    def __init__(self, root_pid: int | None = None, interval: float = 0.05, pss_every: int = 5):
        import psutil
        self._psutil = psutil
        self.root = psutil.Process(root_pid or os.getpid())
        self.interval, self.pss_every = interval, pss_every
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = None

    def _procs(self):
        try:
            return [self.root] + self.root.children(recursive=True)
        except self._psutil.Error:
            return []

    def _sample(self, tick: int = 0) -> None:
        rss_sum = pss_sum = 0
        want_pss = tick % self.pss_every == 0
        for p in self._procs():
            try:
                ct = p.cpu_times()
            except self._psutil.Error:
                continue
            self.last[p.pid] = ct.user + ct.system
            rss, pss = _proc_mem(p.pid, want_pss)
            rss_sum += rss
            pss_sum += pss or 0
        self.peak_rss = max(self.peak_rss, rss_sum)
        if want_pss:
            self.peak_pss = max(self.peak_pss, pss_sum)

    def _loop(self) -> None:
        tick = 1
        while not self._stop.wait(self.interval):
            self._sample(tick)
            tick += 1

    def start(self) -> "TreeMeter":
        self._sample(0)
        self.base = dict(self.last)
        self._thread = threading.Thread(target=self._loop, name="tree-meter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample(0)
        cpu = sum(v - self.base.get(pid, 0.0) for pid, v in self.last.items())
        return {"cpu_s": round(max(cpu, 0.0), 3), "peak_rss_mb": round(self.peak_rss / 1e6, 1),
                "peak_pss_mb": round(self.peak_pss / 1e6, 1) if self.peak_pss else None}


class Clock:
    """Milestones in seconds since ``t0`` (first write of a key wins)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.t: dict[str, float] = {}

    def mark(self, key: str) -> float:
        now = round(time.perf_counter() - self.t0, 4)
        self.t.setdefault(key, now)
        return now


def _load_processor(a):
    """The worker's processor on its device (``--device``, else ENGINE_DEVICE, else auto)."""
    import torch
    from engine.processors import load
    d = (a.device or os.environ.get("ENGINE_DEVICE") or "auto").lower()
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    return load(a.processor, torch.device(d)), torch.device(d)


def _httpx_trace(clock: Clock, is_async: bool):
    """An httpx/httpcore trace hook marking connect (TLS done) and first byte (headers)."""
    def on(name: str) -> None:
        if name == "connection.start_tls.complete":
            clock.mark("connect")
        elif name.endswith("receive_response_headers.complete"):
            clock.mark("first_byte")

    if is_async:
        async def trace(name, info):
            on(name)
    else:
        def trace(name, info):
            on(name)
    return trace


def _cv2_loop(content: bytes, clock: Clock, proc, dev, tag: str) -> int:
    """The downloaded bytes to a temp file, then OpenCV frame by frame, BGR->RGB, processor
    on a batch of one (the stock way)."""
    import cv2
    import torch
    with _temp_mp4(tag) as path:
        Path(path).write_bytes(content)
        clock.mark("written")
        cap = cv2.VideoCapture(path)
        n = 0
        try:
            while True:
                ok, bgr = cap.read()
                if not ok:
                    break
                clock.mark("first_frame")
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                proc(torch.from_numpy(rgb[None]).to(dev), [n])
                clock.mark("first_result")
                n += 1
        finally:
            cap.release()
    clock.mark("decode_done")
    clock.mark("total")
    return n


@contextlib.contextmanager
def _temp_mp4(tag: str):
    fd, path = tempfile.mkstemp(suffix=".mp4", prefix=f"bench-{tag}-")
    os.close(fd)
    try:
        yield path
    finally:
        os.unlink(path)


def _pyav_loop(container, clock: Clock, proc, dev, proc_time: list | None = None) -> int:
    """PyAV (frame threads) to rgb24, the processor on batches of one; ``proc=None``
    decodes only; ``proc_time`` (a one-item list) accumulates the processor's share."""
    import torch
    from engine.workers.decoder import rgb24
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    n = 0
    for frame in container.decode(stream):
        clock.mark("first_frame")
        arr = rgb24(frame)
        if proc is not None:
            t = time.perf_counter()
            proc(torch.from_numpy(arr[None]).to(dev), [n])
            if proc_time is not None:
                proc_time[0] += time.perf_counter() - t
            clock.mark("first_result")
        n += 1
    clock.mark("decode_done")
    return n


def _get_to_file(url: str, ca: str | None, path: str) -> tuple[Clock, int, str]:
    """One streamed GET on a new connection into ``path``; the clock starts just before the
    request (client built, CA loaded, off the clock). Returns (clock, bytes, HTTP version)."""
    import ssl

    import httpx
    verify = ssl.create_default_context(cafile=ca) if ca else True
    with open(path, "wb") as fh, httpx.Client(verify=verify, timeout=60.0) as client:
        clock = Clock()
        with client.stream("GET", url, extensions={"trace": _httpx_trace(clock, False)}) as r:
            r.raise_for_status()
            clock.mark("first_byte")
            for chunk in r.iter_raw():
                fh.write(chunk)
            fh.flush()
            clock.mark("download_done")
            return clock, fh.tell(), r.http_version


def _decoded(clock: Clock, frames: int, meter: TreeMeter, error: str | None, **fields) -> dict:
    """A decoding worker's measurement; ``error`` is None when it worked."""
    out = {"ok": error is None, "error": error, "t": clock.t, "wall_s": clock.t["total"],
           "frames": frames, **fields}
    out.update(meter.stop())
    return out


# ----------------------------------------------------------------------------- workers
def _report_fields(report, wall_s: float) -> dict:
    r = report.to_dict()
    return {"ok": r["ok"], "error": r["error"], "t": dict(r["timings_s"]), "wall_s": round(wall_s, 4),
            "frames": r["frames_processed"], "bytes": r["fetch"].get("bytes"),
            "http_version": r["fetch"].get("http_version"),
            "conns_new": r["fetch"].get("connections_new"),
            "conns_reused": r["fetch"].get("connections_reused"),
            "ranges": r["fetch"].get("ranges"), "decoder": r.get("decoder"),
            "video": r.get("video")}


def worker_engine_cold(a) -> dict:
    from engine.api import Engine
    t = time.perf_counter()
    meter = TreeMeter().start()
    eng = Engine(processor=a.processor, device=a.device, prewarm=())
    startup = time.perf_counter() - t
    startup_res = meter.stop()
    try:
        meter = TreeMeter().start()
        t0 = time.perf_counter()
        report = eng.report(a.url)
        wall = time.perf_counter() - t0
        res = meter.stop()
    finally:
        eng.close()
    out = _report_fields(report, wall)
    out.update(res, startup_s=round(startup, 4), startup_cpu_s=startup_res["cpu_s"])
    return out


def worker_stock(a) -> dict:
    import httpx
    proc, dev = _load_processor(a)
    meter = TreeMeter().start()
    clock = Clock()

    async def fetch() -> bytes:                 # the SN44 miner's download, as it is
        async with httpx.AsyncClient(timeout=60.0) as client:
            response = await client.get(a.url, extensions={"trace": _httpx_trace(clock, True)})
            response.raise_for_status()
            return response.content, response.http_version

    content, http_version = asyncio.run(fetch())
    clock.mark("download_done")
    frames = _cv2_loop(content, clock, proc, dev, "stock")
    return _decoded(clock, frames, meter, None if frames else "OpenCV decoded no frame",
                    bytes=len(content), http_version=http_version, conns_new=1, conns_reused=0)


def worker_seed_fork(a) -> dict:
    import httpx
    proc, dev = _load_processor(a)
    client = httpx.Client(http2=True, timeout=60.0)
    try:
        t = time.perf_counter()                 # a running miner's pool is already warm
        client.get(a.url, headers={"Range": "bytes=0-0"}).raise_for_status()
        warmup = time.perf_counter() - t
        meter = TreeMeter().start()
        clock = Clock()
        response = client.get(a.url, headers={"Range": f"bytes=0-{a.prefix_bytes - 1}"},
                              extensions={"trace": _httpx_trace(clock, False)})
        response.raise_for_status()
        clock.mark("first_byte")
        content = response.content
        clock.mark("download_done")
    finally:
        client.close()
    frames = _cv2_loop(content, clock, proc, dev, "seed")
    return _decoded(clock, frames, meter,
                    None if frames else "OpenCV decoded no frame from the prefix",
                    bytes=len(content), http_version=response.http_version, conns_new=0,
                    conns_reused=1, pool_warmup_s=round(warmup, 4))


def worker_pyav_url(a) -> dict:
    import av
    proc, dev = _load_processor(a)
    options, note = {}, None
    if a.ca:
        options = {"ca_file": a.ca, "tls_verify": "1"}
        note = "FFmpeg TLS verified against the CDN's CA (ca_file, tls_verify=1)"
    meter = TreeMeter().start()
    clock = Clock()
    container = av.open(a.url, options=options, timeout=60.0)
    clock.mark("moov_ready")                   # open returns with the header (moov) parsed
    try:
        frames = _pyav_loop(container, clock, proc, dev)
    finally:
        container.close()
    clock.mark("total")
    return _decoded(clock, frames, meter, None if frames else "PyAV decoded no frame",
                    bytes=None, http_version="HTTP/1.1", note=note)


def worker_local(a) -> dict:
    """The decode side of the floor: the same file from local disk, same processor."""
    import av
    from engine.workers.decoder import rgb24
    proc, dev = _load_processor(a)
    # bytes a decoder needs for the first frame: the header and the first (key) packet
    with av.open(a.video) as c:
        stream = c.streams.video[0]
        first = next(p for p in c.demux(stream) if p.size)
        first_bytes = int(first.pos) + int(first.size)
    # the first frame alone, on a fresh decoder (what a streaming decoder pays once)
    clock = Clock()
    with av.open(a.video) as c:
        import torch
        for frame in c.decode(c.streams.video[0]):
            clock.mark("first_frame")
            proc(torch.from_numpy(rgb24(frame)[None]).to(dev), [0])
            clock.mark("first_result")
            break
    ff = dict(clock.t)
    # decode alone: what a decoder process feeding a separate processor process can reach
    dclock = Clock()
    with av.open(a.video) as c:
        _pyav_loop(c, dclock, None, dev)
    dclock.mark("total")
    # decode and processor in series in one process (the processor's share timed apart)
    meter = TreeMeter().start()
    clock = Clock()
    proc_time = [0.0]
    with av.open(a.video) as c:
        frames = _pyav_loop(c, clock, proc, dev, proc_time)
    clock.mark("total")
    out = {"ok": frames > 0, "error": None, "t": clock.t, "wall_s": clock.t["total"],
           "decode_only_s": dclock.t["total"], "process_only_s": round(proc_time[0], 4),
           "frames": frames, "first_frame_bytes": first_bytes,
           "first_frame_decode_s": ff.get("first_frame"),
           "first_result_s": ff.get("first_result"),
           "size": os.path.getsize(a.video)}
    out.update(meter.stop())
    return out


def worker_httpx_get(a) -> dict:
    """One streamed GET of the whole file to a temp file, on a new connection."""
    with _temp_mp4("httpx") as path:
        clock, n, http_version = _get_to_file(a.url, a.ca, path)
    return {"ok": n > 0, "error": None if n else "no bytes", "t": clock.t,
            "wall_s": clock.t["download_done"], "bytes": n, "http_version": http_version,
            "conns_new": 1, "conns_reused": 0}


def _dims(path: str) -> tuple[int, int]:
    import av
    with av.open(path) as c:
        s = c.streams.video[0]
        return s.codec_context.width, s.codec_context.height


def worker_ffmpeg_cli(a) -> dict:
    """The ``ffmpeg`` command line reads the URL and pipes raw RGB frames to the processor
    (``-hwaccel cuda`` on a CUDA device), batches of ``--batch`` frames. The frame size
    is known off the clock (a user would ffprobe it)."""
    import numpy as np
    import torch
    exe = shutil.which("ffmpeg")
    if exe is None:
        return {"ok": False, "error": "ffmpeg is not installed (tools/setup.sh installs it)"}
    proc, dev = _load_processor(a)
    w, h = _dims(a.video)
    cmd = [exe, "-nostdin", "-v", "error"]
    if dev.type == "cuda":
        cmd += ["-hwaccel", "cuda"]
    if a.ca:
        cmd += ["-ca_file", a.ca, "-tls_verify", "1"]
    cmd += ["-i", a.url, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    frame_bytes = w * h * 3
    meter = TreeMeter().start()
    clock = Clock()
    ff = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    n, batch, numbers = 0, [], []
    try:
        while True:
            buf = ff.stdout.read(frame_bytes)
            if len(buf) == frame_bytes:
                clock.mark("first_frame")
                batch.append(np.frombuffer(buf, np.uint8).reshape(h, w, 3))
                numbers.append(n)
                n += 1
            if batch and (len(batch) >= (1 if n == 1 else a.batch) or len(buf) < frame_bytes):
                proc(torch.from_numpy(np.stack(batch)).to(dev), numbers)
                clock.mark("first_result")
                batch, numbers = [], []
            if len(buf) < frame_bytes:
                break
        clock.mark("decode_done")
        err = ff.stderr.read().decode(errors="replace").strip()
        rc = ff.wait()
    finally:
        if ff.poll() is None:
            ff.kill()
            ff.wait()
    clock.mark("total")
    return _decoded(clock, n, meter, None if rc == 0 and n else f"ffmpeg exited {rc}: {err[-300:]}",
                    bytes=None, conns_new=1, conns_reused=0)


def worker_decord_file(a) -> dict:
    """One streamed GET to a temp file (new connection), then decord on the file,
    ``get_batch`` of ``--batch`` frames into the processor (the first batch one frame)."""
    import torch
    try:
        import decord
    except ImportError:
        return {"ok": False, "error": "decord is not installed"}
    proc, dev = _load_processor(a)
    meter = TreeMeter().start()
    with _temp_mp4("decord") as path:
        clock, size, _ = _get_to_file(a.url, a.ca, path)
        vr = decord.VideoReader(path, ctx=decord.cpu(0))
        total = len(vr)
        n = 0
        while n < total:
            count = 1 if n == 0 else min(a.batch, total - n)
            frames = vr.get_batch(list(range(n, n + count))).asnumpy()
            clock.mark("first_frame")
            proc(torch.from_numpy(frames).to(dev), list(range(n, n + count)))
            clock.mark("first_result")
            n += count
        clock.mark("decode_done")
        clock.mark("total")
    return _decoded(clock, n, meter, None if n else "decord decoded no frame", bytes=size,
                    conns_new=1, conns_reused=0)


WORKERS = {"ffmpeg-cli": worker_ffmpeg_cli, "decord-file": worker_decord_file,
           "engine-cold": worker_engine_cold, "httpx-get": worker_httpx_get,
           "stock": worker_stock, "seed-fork": worker_seed_fork,
           "pyav-url": worker_pyav_url, "local": worker_local}


def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.tools.bench --worker")
    ap.add_argument("--worker", required=True)
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--url")
    ap.add_argument("--video")
    ap.add_argument("--ca")
    ap.add_argument("--processor", default="engine.processors:stats")
    ap.add_argument("--device")
    ap.add_argument("--prefix-bytes", type=int, default=4 * 1024 * 1024)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args(argv)
    try:
        from engine.config import Config
        from engine.workers import decoder
        decoder.SWS_THREADS = Config.from_env().sws_threads   # convert as the engine does
        if a.worker.startswith("sparse:"):
            from engine.tools.bench_sparse import WORKERS as SPARSE
            out = SPARSE[a.worker.split(":", 1)[1]](a)
        else:
            out = WORKERS[a.worker](a)
    except Exception as exc:                    # one line back to the parent, not a traceback
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    import resource
    out["worker_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    sys.stdout.write(RESULT_TAG + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------- parent
def run_worker(name: str, args: list[str], timeout: float, env: dict) -> dict:
    """Run one worker in its own session; on timeout kill its whole process group."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, "-m", "engine.tools.bench", "--worker", name, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(REPO), env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "stderr": err[-2000:]}
    finally:
        _kill_group(proc)                       # whatever it left behind (an engine, say)
        _sweep()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            break
    else:
        res = {"ok": False, "error": f"worker exited {proc.returncode} without a result: "
                                     + (err.strip().splitlines() or ["(no stderr)"])[-1]}
    res["process_cpu_s"] = round((after.ru_utime - before.ru_utime)
                                 + (after.ru_stime - before.ru_stime), 3)
    if not res.get("ok"):
        res["stderr"] = err[-2000:]
    return res


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


# ----------------------------------------------------------------------------- framework
class Contender:
    """What the runner measures. ``prepare`` runs once, off the clock, once the CDN is up
    (a note back if it went wrong); ``run`` measures once and returns a measurement (ok,
    error, t = {stage: seconds since submit}, whatever else it knows), with the rows it
    derives from that same measurement under ``also`` (``rows`` lists them after its own).
    ``missing`` says why it cannot run on this machine: it is then shown as skipped."""
    wire = True             # the emulator's counters over run() are this contender's
    every_round = True      # False for a floor computed from the profile: nothing to spread

    def __init__(self, name: str, *also: str):
        self.name, self.rows = name, (name, *also)

    def missing(self) -> str | None:
        return None

    def prepare(self, ctx: Context) -> str | None:
        return None

    def run(self, ctx: Context) -> dict:
        raise NotImplementedError


class EngineWarm(Contender):
    def __init__(self):
        super().__init__("engine-warm")

    def prepare(self, ctx):
        return ctx.start_engine()

    def run(self, ctx):
        eng = ctx.eng
        eng.prewarm([ctx.origin])
        before = ctx.emu.stats()                # the prewarm's connections are not the job's
        meter = TreeMeter(eng.pid).start()
        mono = time.monotonic()
        t0 = time.perf_counter()
        report = eng.report(ctx.url)
        out = _report_fields(report, time.perf_counter() - t0)
        out.update(meter.stop(), _emu_before=before)
        timeline = report.video_result
        if report.ok and isinstance(timeline, dict) and timeline.get("first_call") is not None:
            # the wait processor's own timeline (engine.processors.Wait): where the model waited
            out["model_waits"] = {
                "to_first_call": round(timeline["first_call"] - mono, 4),
                "ramp_gaps": timeline["ramp_gaps_s"], "gaps": timeline["gaps_s"],
                "after_last": round(mono + report.timings_s["total"] - timeline["last_end"], 4),
                "held_s": timeline["held_s"], "calls": timeline["calls"]}
        return out


class Worker(Contender):
    """``--worker NAME`` in a fresh interpreter, given the URL, the CA, the clip's path,
    the processor and the device, and ``args``."""

    def __init__(self, name: str, timeout: float, *args: str, worker: str | None = None):
        super().__init__(name)
        self.worker, self.timeout, self.args = worker or name, timeout, list(args)

    def run(self, ctx):
        return run_worker(self.worker, ctx.worker_args + self.args, self.timeout, ctx.env)


class Limit(Worker):
    wire = False            # no transfer: the local file, the link from the profile

    def __init__(self, timeout: float):
        super().__init__("limit", timeout, worker="local")
        self.rows = ("limit", "limit-pipelined")

    def run(self, ctx):
        local = super().run(ctx)
        if not local.get("ok"):
            return dict(local, local=local)
        serial, pipelined = limit_from(local, ctx.prof)
        return dict(serial, local=local, also={"limit-pipelined": pipelined})


class Link(Contender):
    """The floor: one RTT then the file at the link's aggregate rate (connections open);
    ``link-cold`` adds one new connection's set-up (``new_conn_s``)."""
    wire, every_round = False, False

    def __init__(self):
        super().__init__("link", "link-cold")

    def run(self, ctx):
        p, size = ctx.prof, ctx.size
        transfer = size / p.total_bps if p.total_bps else 0.0
        warm, cold = ({"ok": True, "error": None, "bytes": size, "transfer_s": round(transfer, 4),
                       "t": {"first_byte": round(fb, 4), "download_done": round(fb + transfer, 4)}}
                      for fb in (p.rtt_s, p.rtt_s + p.new_conn_s))
        return dict(warm, also={"link-cold": cold})


class Aria2(Contender):
    """``aria2c -x16 -s16 -k1M`` to a temp dir; the time is the subprocess's wall clock
    (process start-up included, a few ms)."""

    def __init__(self, timeout: float):
        super().__init__("aria2")
        self.timeout = timeout

    def missing(self):
        return None if shutil.which("aria2c") else "aria2c is not installed (apt-get install aria2)"

    def run(self, ctx):
        with tempfile.TemporaryDirectory(prefix="bench-aria2-") as d:
            cmd = [shutil.which("aria2c"), "--no-conf", "-x16", "-s16", "-k1M",
                   f"--ca-certificate={ctx.ca}", "--allow-overwrite=true",
                   "--auto-file-renaming=false", "--file-allocation=none", "--summary-interval=0",
                   "--console-log-level=warn", "--download-result=hide", "-d", d, "-o", "out.mp4",
                   ctx.url]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=self.timeout)
                wall = time.perf_counter() - t0
            except subprocess.TimeoutExpired:
                return {"ok": False, "error": f"aria2c timed out after {self.timeout:.0f} s"}
            finally:
                _kill_group(proc)
            out_path = os.path.join(d, "out.mp4")
            got = os.path.getsize(out_path) if os.path.exists(out_path) else 0
        ok = proc.returncode == 0 and got == ctx.size
        return {"ok": ok, "error": None if ok else
                f"aria2c exited {proc.returncode}, {got} of {ctx.size} bytes: {out.strip()[-300:]}",
                "t": {"download_done": round(wall, 4)}, "wall_s": round(wall, 4), "bytes": got,
                "http_version": "HTTP/1.1"}


class Context:
    """Where the contenders run: the clip served as ``bench.mp4`` by the local CDN (nginx
    behind the emulator with the profile), SSL_CERT_FILE naming the CDN's CA while it is up
    and given back after, the environment and arguments of subprocess workers, and the warm
    engine once a contender starts it. A ``with`` block holds the CDN up."""

    def __init__(self, a, prog: str, argv: list[str]):
        from engine.demo.clips import cached_clip
        from engine.demo.emulator import profile
        from engine.errors import EngineError

        self.a, self.prog, self.started = a, prog, time.monotonic()
        self.cmdline = f"python -m engine {prog} " + " ".join(shlex.quote(x) for x in argv)
        try:
            self.prof = profile(a.profile)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        print("preparing the clip (generated once, then cached) ...", file=sys.stderr)
        self.video = Path(a.video).resolve() if a.video else cached_clip(a.clip)
        if not self.video.is_file():
            raise EngineError(f"--video {a.video}: no such file")
        self.size = self.video.stat().st_size
        self.machine = machine_info()
        self.load = " ".join(map(str, self.machine["loadavg"]))
        p = self.prof
        self.profile_line = (f"profile {p.name}: RTT {p.rtt_s * 1000:.0f} ms, "
                             f"+{p.new_conn_s * 1000:.0f} ms per new connection, "
                             f"{_rate(p.per_conn_bps)} per connection, {_rate(p.total_bps)} in total")
        self.eng = self.warm_startup = None

    def head(self, *lines: str) -> None:
        print("\n".join([f"$ {self.cmdline}", *lines]), flush=True)

    def __enter__(self) -> Context:
        from engine.demo import local_cdn
        from engine.demo.clips import cached_clip

        # the warm engine's first job (imports, processor load, first segments) runs on a tiny
        # clip off the clock; a whole job, since every stage of the pipeline should have run once
        self.cdn, self.emu, self.tmp = local_cdn(
            {"bench.mp4": self.video, "warmup.mp4": cached_clip("small")}, self.prof.name)
        self.old_ca = os.environ.get("SSL_CERT_FILE")
        self.ca = os.environ["SSL_CERT_FILE"] = str(self.cdn.ca_file)
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.url, self.origin = self.emu.url("/bench.mp4"), self.emu.url("/")
        self.worker_args = ["--url", self.url, "--ca", self.ca, "--video", str(self.video),
                            "--processor", self.a.processor]
        if self.a.device:
            self.worker_args += ["--device", self.a.device]
        return self

    def __exit__(self, *exc) -> None:
        if self.eng is not None:
            self.eng.close()
        self.emu.stop()
        self.cdn.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.old_ca is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = self.old_ca
        _sweep()

    def start_engine(self) -> str | None:
        from engine.api import Engine
        print("starting the warm engine ...", file=sys.stderr)
        t = time.perf_counter()
        self.eng = Engine(processor=self.a.processor, device=self.a.device)
        self.eng.prewarm([self.origin])
        warm = self.eng.report(self.emu.url("/warmup.mp4"))
        self.warm_startup = time.perf_counter() - t
        return None if warm.ok else f"engine-warm: the warm-up job failed: {warm.error}"


class Runner:
    """Rounds: every contender once a round, the order rotated by one each round so that
    drift and noise spread over all of them, no new round once ``--budget`` seconds have
    passed since the start. ``progress`` is the stage reported on stderr after each run;
    ``after`` adds derived fields to each measurement."""

    def __init__(self, ctx: Context, progress: str, after=None):
        self.ctx, self.progress, self.after = ctx, progress, after
        self.runs: list[dict] = []
        self.notes: list[str] = []

    def measure(self, contenders: list[Contender]) -> list[str]:
        """Measure; returns the table's rows."""
        a, ready = self.ctx.a, []
        for c in contenders:
            why = c.missing()
            if why:
                print(f"{why}: skipping the {c.name} contender", file=sys.stderr)
                self.runs.append({"ok": False, "skipped": True, "contender": c.name, "round": 0,
                                  "error": why})
            else:
                ready.append(c)
        timed = [c for c in ready if c.every_round]
        with self.ctx:
            self.notes += filter(None, (c.prepare(self.ctx) for c in ready))
            for c in ready:
                if not c.every_round:
                    self._once(c, 0)
            for rnd in range(a.runs):
                if rnd and time.monotonic() - self.ctx.started > a.budget:
                    self.notes.append(f"stopped after {rnd} rounds: the {a.budget:.0f} s budget "
                                      "was spent")
                    break
                k = rnd % max(len(timed), 1)
                for c in timed[k:] + timed[:k]:
                    print(f"round {rnd + 1}/{a.runs}: {c.name} ...", file=sys.stderr, flush=True)
                    self._once(c, rnd)
        return [row for c in contenders for row in c.rows]

    def _once(self, c: Contender, rnd: int) -> None:
        emu = self.ctx.emu
        before = emu.stats()
        res = c.run(self.ctx)
        before = res.pop("_emu_before", before)
        if c.wire:
            res.update(_emu_delta(before, emu.stats()))
        if self.after:
            self.after(res)
        self.runs += [dict(r, contender=row, round=rnd) for row, r in res.pop("also", {}).items()]
        self.runs.append(dict(res, contender=c.name, round=rnd))
        t = (res.get("t") or {}).get(self.progress)
        status = f"FAILED: {res.get('error')}"
        if res.get("ok") and t is not None:
            frames = f", {res['frames']} frames" if res.get("frames") else ""
            status = f"{self.progress} {t:.3f} s{frames}"
        print(f"  {c.name}: {status}", file=sys.stderr, flush=True)

    def finish(self, summary: dict, rows: list[str], warm: str, notes: list[str], **extra) -> int:
        """Print the notes, write ``--json``; 1 if a run failed."""
        ctx, a = self.ctx, self.ctx.a
        notes = self.notes + notes + [
            f"{r['contender']} round {r['round'] + 1} failed: {r.get('error')}"
            for r in self.runs if not r.get("ok") and not r.get("skipped")]
        if ctx.warm_startup is not None:
            notes.insert(0, f"engine-warm: started once in {ctx.warm_startup:.2f} s {warm}")
        if notes:
            print()
            for n in notes:
                print(f"- {n}")
        if a.json:
            p = ctx.prof
            with open(a.json, "w") as fh:
                json.dump({"command": ctx.cmdline, "machine": ctx.machine,
                           "profile": {"name": p.name, "rtt_s": p.rtt_s, "new_conn_s": p.new_conn_s,
                                       "per_conn_bps": p.per_conn_bps, "total_bps": p.total_bps},
                           "video": {"path": str(ctx.video), "bytes": ctx.size}, **extra,
                           "runs_per_contender": a.runs, "contenders": a.contenders, "rows": rows,
                           "runs": self.runs, "summary": summary, "notes": notes,
                           "elapsed_s": round(time.monotonic() - ctx.started, 1)}, fh, indent=1)
        print(f"\n{ctx.prog} finished in {time.monotonic() - ctx.started:.0f} s", file=sys.stderr)
        return 0 if all(r.get("ok") or r.get("skipped") for r in self.runs) else 1


def _parser(prog: str, description: str, runs: int, timeout: float, budget: float):
    """The options both modes share."""
    from engine.demo.clips import PRESETS
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--profile", default="seed", help="CDN emulator profile (lan, seed, mobile)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--video", metavar="PATH", help="an MP4 file to serve instead of a preset clip")
    src.add_argument("--clip", default="sn44", choices=sorted(PRESETS), help="preset clip (sn44)")
    ap.add_argument("--runs", type=int, default=runs, help=f"measurements per contender ({runs})")
    ap.add_argument("--device", help="auto, cpu, cuda[:N] (default ENGINE_DEVICE or auto)")
    ap.add_argument("--json", metavar="PATH", help="write every raw measurement as JSON")
    ap.add_argument("--timeout", type=float, default=timeout,
                    help=f"per measurement, seconds ({timeout:g})")
    ap.add_argument("--budget", type=float, default=budget,
                    help=f"start no new round after this many seconds ({budget:g})")
    return ap


def _parse(ap, argv, known, default) -> argparse.Namespace:
    """Parse, then check the contender list (``default`` if none) and the run count."""
    a = ap.parse_args(argv)
    a.contenders = [c.strip() for c in (a.contenders or ",".join(default)).split(",") if c.strip()]
    bad = [c for c in a.contenders if c not in known]
    if bad or not a.contenders:
        ap.error(f"unknown contender(s) {bad}; known: {', '.join(known)}")
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    return a


def _sweep() -> None:
    try:
        from engine.shm.sweep import sweep_stale
        sweep_stale()
    except Exception:
        pass


def machine_info() -> dict:
    import psutil
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": model, "cores_logical": psutil.cpu_count(),
            "cores_physical": psutil.cpu_count(logical=False),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "os": platform.platform(), "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}
    for mod in ("torch", "av", "cv2", "httpx"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    try:
        import torch
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        info["gpu"] = None
    return info


def _emu_delta(before: dict, after: dict) -> dict:
    return {"wire_bytes": after["bytes_server_to_client"] - before["bytes_server_to_client"],
            "conns_accepted": after["connections_accepted"] - before["connections_accepted"]}


def limit_from(local: dict, prof) -> tuple[dict, dict]:
    """The floor: nothing can beat the link's aggregate rate or this machine's decoder.

    transfer      = size / total_bps                  (the last byte, after one RTT)
    total floor   = RTT + max(transfer, local decode+process)
    first frame   = RTT + first_frame_bytes / per_conn_bps + first frame decode
    first result  = first frame floor + the processor on that frame
    Connections are assumed open (prewarmed); ``new_conn_s`` is not part of the floor.

    Returns (``limit``, ``limit-pipelined``): the second lets decode and processor run
    at once (as in separate processes), total = RTT + max(transfer, first-frame bytes at
    one connection's rate + decode alone, processor alone) -- optimistic, since on few
    cores the two share them.
    """
    rtt = prof.rtt_s
    size = local["size"]
    transfer = size / prof.total_bps if prof.total_bps else 0.0
    ff_net = local["first_frame_bytes"] / prof.per_conn_bps if prof.per_conn_bps else 0.0
    decode = local["t"]["total"]
    ff = rtt + ff_net + local["first_frame_decode_s"]
    fr = rtt + ff_net + local["first_result_s"]
    t = {"first_byte": round(rtt, 4), "first_frame": round(ff, 4), "first_result": round(fr, 4),
         "download_done": round(rtt + transfer, 4), "decode_done": round(rtt + max(transfer, decode), 4),
         "total": round(rtt + max(transfer, decode), 4), "decode_start": round(rtt + ff_net, 4)}
    serial = {"ok": True, "error": None, "t": t, "frames": local["frames"], "bytes": size,
              "local_decode_s": decode, "transfer_s": round(transfer, 4),
              "first_frame_bytes": local["first_frame_bytes"],
              "first_frame_decode_s": local["first_frame_decode_s"],
              "cpu_s": local.get("cpu_s"), "peak_rss_mb": local.get("peak_rss_mb"),
              "peak_pss_mb": local.get("peak_pss_mb")}
    dec_only, proc_only = local["decode_only_s"], local["process_only_s"]
    end = rtt + max(transfer, ff_net + dec_only, proc_only)
    tp = dict(t, decode_done=round(rtt + ff_net + dec_only, 4), total=round(max(end, fr), 4))
    pipelined = {"ok": True, "error": None, "t": tp, "frames": local["frames"], "bytes": size,
                 "decode_only_s": dec_only, "process_only_s": proc_only,
                 "transfer_s": round(transfer, 4)}
    return serial, pipelined


def _spread(values) -> dict | None:
    vals = [v for v in values if v is not None]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)} if vals else None


def summarize(runs: list[dict], rows: list[str], stages, meds, ratios: dict) -> dict:
    """Per row: runs ok/failed (and why skipped), median/min/max of each stage in ``stages``
    (and of model idle), medians of ``meds``, and ``ratios`` ({key: stage}) of its median
    over engine-warm's."""
    out = {}
    for c in rows:
        mine = [r for r in runs if r["contender"] == c]
        rs = [r for r in mine if r.get("ok")]
        s = {"runs_ok": len(rs), "runs_failed": sum(1 for r in mine
                                                   if not r.get("ok") and not r.get("skipped"))}
        skipped = next((r["error"] for r in mine if r.get("skipped")), None)
        if skipped:
            s["skipped"] = skipped
        spreads = {k: _spread((r.get("t") or {}).get(k) for r in rs) for k in stages}
        spreads["model_idle"] = _spread(r.get("model_idle_s") for r in rs)
        s.update((k, v) for k, v in spreads.items() if v)
        waits = [r["model_waits"] for r in rs if r.get("model_waits")]
        if waits:
            s["model_waits"] = {k: statistics.median(w[k] for w in waits) for k in WAIT_PARTS}
        s.update((k, v["median"]) for k in meds if (v := _spread(r.get(k) for r in rs)))
        out[c] = s
    ref = out.get("engine-warm", {})
    for s in out.values():
        for key, stage in ratios.items():
            if stage in s and stage in ref and ref[stage]["median"]:
                s[key] = s[stage]["median"] / ref[stage]["median"]
    return out


def _num(v, f="{:.2f}") -> str:
    return "-" if v is None else f.format(v)


def _fmt_stage(s: dict, key: str) -> str:
    v = s.get(key)
    if not v:
        return "-"
    if v["min"] == v["max"]:
        return f"{v['median']:.3f}"
    return f"{v['median']:.3f} [{v['min']:.2f}-{v['max']:.2f}]"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    def line(cells):
        return "  ".join((str(c).ljust(w) if i == 0 else str(c).rjust(w))
                         for i, (c, w) in enumerate(zip(cells, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def _rate(bps) -> str:
    return "unlimited" if not bps else f"{bps / 1e6:g} MB/s"


# ----------------------------------------------------------------------------- bench
def render(summary: dict, rows: list[str]) -> str:
    t_rows, r_rows = [], []
    for c in rows:
        s = summary[c]
        fail = f" ({s['runs_failed']} failed)" if s["runs_failed"] else ""
        t_rows.append([c + fail, _fmt_stage(s, "first_frame"), _fmt_stage(s, "first_result"),
                       _fmt_stage(s, "total"), _num(s.get("ratio_first_result"), "{:.2f}x"),
                       _num(s.get("ratio_total"), "{:.2f}x"), _num(s.get("startup_s"))])
        new = s["conns_new"] if s.get("conns_new") is not None else s.get("conns_accepted")
        conns = "-" if new is None else f"{new:.0f}/{_num(s.get('conns_reused'), '{:.0f}')}"
        r_rows.append([c, _num(s.get("cpu_s")), _num(s.get("peak_rss_mb"), "{:.0f}"),
                       _num(s.get("peak_pss_mb"), "{:.0f}"),
                       _num(s["bytes"] / 1e6 if s.get("bytes") else None),
                       _num(s["wire_bytes"] / 1e6 if s.get("wire_bytes") else None),
                       conns, _num(s.get("frames"), "{:.0f}")])
    t = _table(t_rows, ["contender", "first frame s", "first result s", "total s",
                        "1st res/warm", "total/warm", "startup s"])
    r = _table(r_rows, ["contender", "CPU s", "peak RSS MB", "peak PSS MB", "MB payload",
                        "MB wire", "conns new/reused", "frames"])
    return ("timings: median [min-max] over the runs, seconds since the job was submitted\n"
            + t + "\n\nresources (medians; CPU = user+sys of the process tree over the timed part)\n"
            + r)


# ----------------------------------------------------------------------------- plot
def plot(summary: dict, contenders: list[str], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    def med(s, k):
        v = s.get(k)
        return v["median"] if v else None

    colors = {"startup": "#9467bd", "connect": "#7f7f7f", "wait": "#c7c7c7", "download": "#1f77b4",
              "decode": "#ff7f0e", "process": "#2ca02c"}
    names = [c for c in contenders if summary[c].get("total")]
    fig, ax = plt.subplots(figsize=(12, 1.1 * len(names) + 2.2))
    lane = {"net": 0.28, "decode": 0.0, "process": -0.28}
    h = 0.24
    xmax = 0.0
    xscale = max(med(summary[c], "total") for c in names) if names else 1.0
    for i, c in enumerate(names):
        s = summary[c]
        y = len(names) - 1 - i
        total = med(s, "total")
        xmax = max(xmax, total)
        connect, fb = med(s, "connect"), med(s, "first_byte")
        dl, moov = med(s, "download_done"), med(s, "moov_ready")
        ff, fr, dec = med(s, "first_frame"), med(s, "first_result"), med(s, "decode_done")
        if s.get("startup_s"):                  # not to scale: it would dwarf the job
            stub = 0.12 * xscale
            ax.barh(y + lane["net"], stub, left=-stub, height=h, color=colors["startup"],
                    hatch="//", edgecolor="white")
            ax.text(-stub, y + lane["net"], f"start-up {s['startup_s']:.1f} s (not to scale) ",
                    va="center", ha="right", fontsize=7, color=colors["startup"])
        if connect:
            ax.barh(y + lane["net"], connect, left=0, height=h, color=colors["connect"])
        if fb is not None and fb > (connect or 0):
            ax.barh(y + lane["net"], fb - (connect or 0), left=connect or 0, height=h,
                    color=colors["wait"])
        if dl is not None:
            start = fb or connect or 0
            ax.barh(y + lane["net"], max(dl - start, 0.003), left=start, height=h,
                    color=colors["download"])
        elif moov is not None:                   # pyav-url: only "open" is known
            ax.barh(y + lane["net"], moov, left=0, height=h, color=colors["wait"])
            ax.text(moov, y + lane["net"], "  open; download then interleaved with decode",
                    va="center", fontsize=7, color="#555")
        dstart = med(s, "decode_start") or med(s, "written") or moov or dl or 0
        dend = dec or total
        if ff is not None:
            ax.barh(y + lane["decode"], max(dend - dstart, 0.003), left=dstart, height=h,
                    color=colors["decode"])
            ax.plot([ff], [y + lane["decode"]], marker="D", color="black", ms=5)
        if fr is not None:
            ax.barh(y + lane["process"], max(total - fr, 0.003), left=fr, height=h,
                    color=colors["process"])
            ax.plot([fr], [y + lane["process"]], marker="^", color="#d62728", ms=6)
        ax.plot([total, total], [y - 0.45, y + 0.45], color="black", lw=1)
        ratio = s.get("ratio_total")
        label = f" total {total:.2f} s" + (f" ({ratio:.2f}x warm)" if ratio else "")
        if s.get("frames") is not None:
            label += f", {s['frames']:.0f} frames"
        ax.text(total, y, label, va="center", fontsize=8)
    ax.set_yticks([len(names) - 1 - i for i in range(len(names))])
    ax.set_yticklabels(names)
    has_startup = any(summary[c].get("startup_s") for c in names)
    ax.set_xlim(-(0.45 if has_startup else 0.03) * xmax, xmax * 1.5)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("seconds since the job was submitted (medians); lanes per contender: "
                  "network / decode / processor")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    handles = [Patch(color=colors[k], label=k) for k in
               ("startup", "connect", "wait", "download", "decode", "process")]
    handles += [plt.Line2D([], [], marker="D", color="black", ls="", label="first frame"),
                plt.Line2D([], [], marker="^", color="#d62728", ls="", label="first result")]
    handles[0].set_label("engine start-up (before submit)")
    handles[2].set_label("connect/wait for first byte")
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.09), fontsize=7,
              ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv):
    ap = _parser("python -m engine bench", "The engine against the stock and seed miners, PyAV "
                 "on the URL, and the physical floor.", runs=3, timeout=120.0, budget=540.0)
    ap.add_argument("--processor", default="engine.processors:stats", help="module:factory")
    ap.add_argument("--contenders",
                    help=f"comma-separated subset of {','.join(CONTENDERS + MODEL_CONTENDERS[1:])} "
                         f"(default {','.join(CONTENDERS)}; with --model-bound "
                         f"{','.join(MODEL_CONTENDERS)})")
    ap.add_argument("--model-bound", action="store_true",
                    help=f"processor {WAIT_PROCESSOR} (ENGINE_WAIT_MS_PER_FRAME ms a frame, no "
                         "CPU): a GPU model's stand-in; adds model time and model idle")
    ap.add_argument("--prefix-mb", type=float, default=4.0, help="seed-fork's partial download (4)")
    ap.add_argument("--fetch", action="store_true",
                    help="fetch-only comparison instead (engine, httpx, aria2c, the link); "
                         "see --fetch --help")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG waterfall per contender")
    a = _parse(ap, argv, CONTENDERS + MODEL_CONTENDERS[1:],
               MODEL_CONTENDERS if "--model-bound" in argv else CONTENDERS)
    if a.model_bound:
        a.processor = WAIT_PROCESSOR
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if "--worker" in argv:
        return worker_main(argv)
    if "--fetch" in argv:
        return fetch_main([x for x in argv if x != "--fetch"])
    if "--sparse" in argv:
        from engine.tools.bench_sparse import main as sparse_main
        return sparse_main([x for x in argv if x != "--sparse"])
    a = parse_args(argv)
    ctx = Context(a, "bench", argv)
    m = ctx.machine
    ctx.head(f"machine: {m['cpu']}, {m['cores_logical']} logical / {m['cores_physical']} physical "
             f"cores (affinity {m['affinity']}), {m['memory_gb']} GB RAM, GPU {m['gpu'] or 'none'}, "
             f"load average {ctx.load} at start",
             f"software: Python {m['python']}, torch {m['torch']}, PyAV {m['av']}, "
             f"OpenCV {m['cv2']}, httpx {m['httpx']}; {m['os']}", ctx.profile_line,
             f"clip: {ctx.video.name} ({ctx.size / 1e6:.2f} MB); processor {a.processor}; "
             f"device {a.device or os.environ.get('ENGINE_DEVICE') or 'auto'}; runs {a.runs}")
    special = {"engine-warm": EngineWarm(), "limit": Limit(a.timeout),
               "seed-fork": Worker("seed-fork", a.timeout,
                                   "--prefix-bytes", str(int(a.prefix_mb * 1024 * 1024)))}
    runner = Runner(ctx, "total", _model_time if a.model_bound else None)
    rows = runner.measure([special.get(c) or Worker(c, a.timeout) for c in a.contenders])
    summary = summarize(runner.runs, rows, STAGE_KEYS + ("written", "decode_start"),
                        ("wall_s", "startup_s", "cpu_s", "peak_rss_mb", "peak_pss_mb", "bytes",
                         "wire_bytes", "conns_accepted", "conns_new", "conns_reused", "frames",
                         "process_cpu_s", "model_s"),
                        {"ratio_total": "total", "ratio_first_result": "first_result"})
    print()
    print(render(summary, rows))
    if a.model_bound:
        print()
        print(render_model(summary, rows))
    if a.plot:
        plot(summary, rows, a.plot,
             f"{ctx.video.name} ({ctx.size / 1e6:.1f} MB) on profile {ctx.prof.name}, "
             f"{a.processor}, {m['cores_logical']} cores")
    return runner.finish(summary, rows, "(start, prewarm and a 50-frame warm-up job on another "
                         "clip, all off the clock)", _notes(summary, a),
                         processor=a.processor, device=a.device)


def _wait_s_per_frame() -> float:
    return float(os.environ.get("ENGINE_WAIT_MS_PER_FRAME", "4")) / 1000.0


def _model_time(res: dict) -> None:
    """The wait processor holds exactly this per frame: model time = frames x that;
    model idle = total - model time (the first frame's wait included)."""
    t = res.get("t") or {}
    if res.get("ok") and res.get("frames") and t.get("total") is not None:
        res["model_s"] = round(res["frames"] * _wait_s_per_frame(), 4)
        res["model_idle_s"] = round(t["total"] - res["model_s"], 4)
        if res.get("model_waits"):
            waits = res["model_waits"]
            waits["overrun"] = round(waits["held_s"] - res["model_s"], 4)


WAIT_PARTS = ("to_first_call", "ramp_gaps", "gaps", "after_last", "overrun")


def render_model(summary: dict, contenders: list[str]) -> str:
    rows, parts = [], []
    for c in contenders:
        s = summary[c]
        if s.get("model_s") is None:
            continue
        rows.append([c, _fmt_stage(s, "total"), f"{s['model_s']:.3f}",
                     _fmt_stage(s, "model_idle"), _fmt_stage(s, "first_result"),
                     f"{s.get('frames', 0):.0f}"])
        if s.get("model_waits"):
            parts.append([c] + [f"{s['model_waits'][k]:.3f}" for k in WAIT_PARTS])
    waits = ""
    if parts:
        waits = ("\n\nwhere the model waited (medians, s; from the processor's own timeline): "
                 "before its first call, between batches while they still grew, between "
                 "full batches, after its last call, sleeps overrun\n"
                 + _table(parts, ["contender", "to 1st call", "ramp gaps", "gaps",
                                  "after last", "overrun"]))
    return (f"model-bound: {WAIT_PROCESSOR}, {_wait_s_per_frame() * 1000:g} ms a frame asleep; "
            "model idle = total - model time\n"
            + _table(rows, ["contender", "total s", "model s", "model idle s", "first result s",
                            "frames"]) + waits)


def _notes(summary: dict, a) -> list[str]:
    notes = []
    w = summary.get("engine-warm", {})
    if w.get("wall_s") and w.get("total"):
        notes.append(f"engine-warm: wall clock around process() {w['wall_s']:.3f} s vs its report's "
                     f"total {w['total']['median']:.3f} s (the difference is the client round trip "
                     "and moving the results)")
    c = summary.get("engine-cold", {})
    if c.get("startup_s"):
        notes.append(f"engine-cold: Engine() start-up {c['startup_s']:.2f} s, paid once per miner; "
                     "its timings start at process()")
    if "seed-fork" in summary and summary["seed-fork"].get("frames") is not None:
        notes.append(f"seed-fork: only the first {a.prefix_mb:g} MB fetched, so it processed "
                     f"{summary['seed-fork']['frames']:.0f} frames (coverage) -- compare its time with "
                     "that in mind; its HTTP/2 pool was warmed by one earlier request")
    if "pyav-url" in summary:
        notes.append("pyav-url: FFmpeg's HTTPS with tls_verify=1 and ca_file=<the CDN's CA>; "
                     "payload bytes not observable, MB wire is from the emulator")
    if "limit" in summary and summary["limit"].get("total"):
        notes.append("limit: total = RTT + max(size / total_bps, local decode+process); first frame = "
                     "RTT + first-frame bytes / per_conn_bps + first-frame decode (connections "
                     "assumed prewarmed); CPU/memory shown are the local decode's; "
                     "limit-pipelined: total = RTT + max(size / total_bps, first-frame bytes / "
                     "per_conn_bps + local decode alone, processor alone), as if decode and "
                     "processor overlapped perfectly on their own cores")
    notes.append("MB wire and new connections are counted by the CDN emulator (TLS included); "
                 "stock/seed-fork/pyav-url decode with OpenCV/PyAV threads inside one process")
    return notes


# ----------------------------------------------------------------------------- --fetch
def parse_fetch_args(argv):
    ap = _parser("python -m engine bench --fetch",
                 "Fetch only: the time until every byte of the clip is local, for the "
                 "engine (warm and cold), one httpx GET, aria2c and the link's floor.",
                 runs=5, timeout=60.0, budget=180.0)
    ap.add_argument("--contenders", help=f"comma-separated subset of {','.join(FETCH_CONTENDERS)}")
    a = _parse(ap, argv, FETCH_CONTENDERS, FETCH_CONTENDERS)
    a.processor = NULL_PROCESSOR
    return a


def fetch_checks(summary: dict, prof, size: int) -> list[dict]:
    """The issue's goals, on the medians. Throughput is defined two ways:
    end to end = size / download_done (submit to last byte local), and
    after one RTT = size / (download_done - RTT) (the request's unavoidable round trip
    taken out: what the transfer itself reached). Informational: size / (download_done -
    first_byte), the rate once the first byte is in (the engine's first byte is its head
    request's)."""
    checks = []
    w = summary.get("engine-warm", {})
    dl = w.get("download_done", {}).get("median")
    fb = w.get("first_byte", {}).get("median")
    cap = prof.total_bps
    rtt = prof.rtt_s
    if dl and cap:
        target = 0.9 * cap
        for label, denom, goal in (("end to end: size / download_done", dl, True),
                                   ("after one RTT: size / (download_done - RTT)", dl - rtt, True),
                                   ("after first byte: size / (download_done - first_byte)",
                                    dl - fb if fb is not None else None, False)):
            if not denom or denom <= 0:
                continue
            rate = size / denom
            checks.append({"goal": "warm engine >= 0.9 x aggregate capacity", "how": label,
                           "value": rate, "target": target, "ratio": rate / cap,
                           "pass": rate >= target if goal else None,
                           "text": f"{rate / 1e6:.1f} MB/s = {rate / cap:.2f} x capacity "
                                   f"(goal >= {target / 1e6:.1f} MB/s)"})
    else:
        checks.append({"goal": "warm engine >= 0.9 x aggregate capacity", "how": "-", "pass": None,
                       "text": "n/a (" + ("the link is unlimited" if not cap else "no engine-warm run")
                               + ")"})
    ar = summary.get("aria2", {}).get("download_done", {}).get("median")
    if dl and ar:
        checks.append({"goal": "no slower than aria2", "how": "engine-warm download_done vs aria2 wall",
                       "value": dl, "target": ar, "ratio": dl / ar, "pass": dl <= ar,
                       "text": f"{dl:.3f} s vs {ar:.3f} s = {dl / ar:.2f} x aria2's time"})
        cold = summary.get("engine-cold", {}).get("download_done", {}).get("median")
        if cold:
            checks.append({"goal": "no slower than aria2", "pass": None,
                           "how": "engine-cold (start-up excluded) vs aria2 wall, both on new "
                                  "connections",
                           "value": cold, "target": ar, "ratio": cold / ar,
                           "text": f"{cold:.3f} s vs {ar:.3f} s = {cold / ar:.2f} x aria2's time"})
    else:
        why = summary.get("aria2", {}).get("skipped") or "no successful aria2/engine-warm run"
        checks.append({"goal": "no slower than aria2", "how": "-", "pass": None, "text": f"n/a ({why})"})
    if fb is not None and rtt > 0:
        checks.append({"goal": "warm time-to-first-byte within 1.2 x one RTT",
                       "how": "engine-warm first_byte / RTT", "value": fb, "target": 1.2 * rtt,
                       "ratio": fb / rtt, "pass": fb <= 1.2 * rtt,
                       "text": f"{fb * 1000:.0f} ms = {fb / rtt:.2f} x RTT ({rtt * 1000:.0f} ms; "
                               f"goal <= {1.2 * rtt * 1000:.0f} ms)"})
    else:
        checks.append({"goal": "warm time-to-first-byte within 1.2 x one RTT", "how": "-", "pass": None,
                       "text": "n/a (" + ("RTT is 0 on this profile" if fb is not None
                                          else "no engine-warm run") + ")"})
    return checks


def render_fetch(summary: dict, rows: list[str], prof, size: int, checks: list[dict]) -> str:
    out = []
    for c in rows:
        s = summary[c]
        if s.get("skipped"):
            out.append([c, "skipped"] + ["-"] * 7)
            continue
        fail = f" ({s['runs_failed']} failed)" if s["runs_failed"] else ""
        dl, fb = s.get("download_done"), s.get("first_byte")
        fb_rtt = (fb["median"] / prof.rtt_s) if fb and prof.rtt_s > 0 else None
        conns = "-"
        if s.get("conns_new") is not None:
            conns = f"{s['conns_new']:.0f}/{_num(s.get('conns_reused'), '{:.0f}')}"
        if s.get("conns_accepted") is not None:
            conns += f" ({s['conns_accepted']:.0f})"
        out.append([c + fail, _fmt_stage(s, "download_done"), _num(s.get("ratio"), "{:.2f}x"),
                    _fmt_stage(s, "first_byte"), _num(fb_rtt, "{:.2f}"),
                    _num(size / dl["median"] / 1e6 if dl and dl["median"] else None, "{:.1f}"),
                    conns, _num(s["wire_bytes"] / 1e6 if s.get("wire_bytes") else None),
                    _num(s.get("startup_s"))])
    lines = [
        "time until all bytes are local: median [min-max] over the runs, seconds; /warm = "
        "median over engine-warm's; fb/RTT = first byte / one RTT; MB/s = size / median; "
        "requests on new/reused connections as the client counts them, and in brackets the "
        "connections the emulator accepted during the run",
        _table(out, ["contender", "all bytes local s", "/warm", "first byte s", "fb/RTT",
                     "MB/s", "req new/reused (conns)", "MB wire", "start-up s"]), "",
        f"link: aggregate capacity {_rate(prof.total_bps)}"
        + (f" = {prof.total_bps / prof.per_conn_bps:g} connections at {_rate(prof.per_conn_bps)}"
           if prof.total_bps and prof.per_conn_bps else "")
        + f"; floor for {size / 1e6:.2f} MB = RTT + size/capacity "
        f"= {prof.rtt_s:.3f} + {(size / prof.total_bps if prof.total_bps else 0):.3f} s; "
        f"cold floor adds one new connection ({prof.new_conn_s:.3f} s; the emulator's TLS "
        "handshake round trips come on top of it)", "goal checks (medians):"]
    for ch in checks:
        verdict = {True: "PASS", False: "FAIL", None: "info"}[ch["pass"]]
        how = f" [{ch['how']}]" if ch.get("how") and ch["how"] != "-" else ""
        lines.append(f"  {verdict:4}  {ch['goal']}{how}: {ch['text']}")
    return "\n".join(lines)


def _fetch_notes(summary: dict) -> list[str]:
    notes = []
    c = summary.get("engine-cold", {})
    if c.get("startup_s"):
        notes.append(f"engine-cold: Engine() start-up {c['startup_s']:.2f} s (median), excluded; "
                     "its time starts at submit")
    if "httpx-get" in summary:
        notes.append("httpx-get: a fresh subprocess, httpx.Client().stream('GET') on a new "
                     "connection to a temp file, clock from just before the request")
    if "aria2" in summary and not summary["aria2"].get("skipped"):
        notes.append("aria2: aria2c -x16 -s16 -k1M --file-allocation=none, subprocess wall clock "
                     "(process start included)")
    notes.append("the engines still decode (null processor) while fetching; download_done is "
                 "when the last byte is in shared memory, not when the job ends")
    return notes


def fetch_main(argv: list[str]) -> int:
    a = parse_fetch_args(argv)
    ctx = Context(a, "bench --fetch", argv)
    m = ctx.machine
    ctx.head(f"machine: {m['cpu']}, {m['cores_logical']} logical cores (affinity {m['affinity']}), "
             f"load average {ctx.load} at start; httpx {m['httpx']}",
             ctx.profile_line + " (the link's aggregate capacity)",
             f"clip: {ctx.video.name} ({ctx.size / 1e6:.2f} MB); runs {a.runs}; measured: the time "
             "until every byte is local (engine: report download_done, since submit)")
    # engine-cold's worker starts its engine before its clock does, within the same timeout
    special = {"engine-warm": EngineWarm(), "engine-cold": Worker("engine-cold", a.timeout + 60),
               "aria2": Aria2(a.timeout), "link": Link()}
    runner = Runner(ctx, "download_done")
    rows = runner.measure([special.get(c) or Worker(c, a.timeout) for c in a.contenders])
    summary = summarize(runner.runs, rows, ("connect", "first_byte", "download_done"),
                        ("wall_s", "startup_s", "bytes", "wire_bytes", "conns_accepted",
                         "conns_new", "conns_reused", "cpu_s"), {"ratio": "download_done"})
    checks = fetch_checks(summary, ctx.prof, ctx.size)
    print()
    print(render_fetch(summary, rows, ctx.prof, ctx.size, checks))
    return runner.finish(summary, rows, "(start, prewarm and a warm-up job on another clip, off "
                         "the clock); prewarmed again before each run; processor "
                         f"{NULL_PROCESSOR}", _fetch_notes(summary), checks=checks)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
