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


def _device(spec: str | None) -> str:
    import torch
    d = (spec or os.environ.get("ENGINE_DEVICE") or "auto").lower()
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    return d


def _load_processor(spec: str, device: str):
    import torch
    from engine.processors import load
    dev = torch.device(device)
    return load(spec, dev), dev


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


def _cv2_loop(path: str, clock: Clock, proc, dev, limit: int | None = None) -> int:
    """OpenCV frame by frame, BGR->RGB, processor on a batch of one (the stock way)."""
    import cv2
    import torch
    cap = cv2.VideoCapture(path)
    n = 0
    try:
        while limit is None or n < limit:
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
    return n


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
    proc, dev = _load_processor(a.processor, _device(a.device))
    meter = TreeMeter().start()
    clock = Clock()

    async def fetch() -> bytes:                 # the SN44 miner's download, as it is
        async with httpx.AsyncClient(timeout=60.0) as client:
            response = await client.get(a.url, extensions={"trace": _httpx_trace(clock, True)})
            response.raise_for_status()
            return response.content, response.http_version

    content, http_version = asyncio.run(fetch())
    clock.mark("download_done")
    fd, path = tempfile.mkstemp(suffix=".mp4", prefix="bench-stock-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        clock.mark("written")
        frames = _cv2_loop(path, clock, proc, dev)
        clock.mark("total")
    finally:
        os.unlink(path)
    out = {"ok": frames > 0, "error": None if frames else "OpenCV decoded no frame",
           "t": clock.t, "wall_s": clock.t["total"], "frames": frames, "bytes": len(content),
           "http_version": http_version, "conns_new": 1, "conns_reused": 0}
    out.update(meter.stop())
    return out


def worker_seed_fork(a) -> dict:
    import httpx
    proc, dev = _load_processor(a.processor, _device(a.device))
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
        http_version = response.http_version
    finally:
        client.close()
    fd, path = tempfile.mkstemp(suffix=".mp4", prefix="bench-seed-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        clock.mark("written")
        frames = _cv2_loop(path, clock, proc, dev)
        clock.mark("total")
    finally:
        os.unlink(path)
    out = {"ok": frames > 0, "error": None if frames else "OpenCV decoded no frame from the prefix",
           "t": clock.t, "wall_s": clock.t["total"], "frames": frames, "bytes": len(content),
           "http_version": http_version, "conns_new": 0, "conns_reused": 1,
           "pool_warmup_s": round(warmup, 4)}
    out.update(meter.stop())
    return out


def worker_pyav_url(a) -> dict:
    import av
    proc, dev = _load_processor(a.processor, _device(a.device))
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
    out = {"ok": frames > 0, "error": None if frames else "PyAV decoded no frame",
           "t": clock.t, "wall_s": clock.t["total"], "frames": frames, "bytes": None,
           "http_version": "HTTP/1.1", "note": note}
    out.update(meter.stop())
    return out


def worker_local(a) -> dict:
    """The decode side of the floor: the same file from local disk, same processor."""
    import av
    from engine.workers.decoder import rgb24
    proc, dev = _load_processor(a.processor, _device(a.device))
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
    """One streamed GET of the whole file to a temp file, on a new connection; the clock
    starts just before the request (client built, CA loaded, off the clock)."""
    import ssl

    import httpx
    verify = ssl.create_default_context(cafile=a.ca) if a.ca else True
    fd, path = tempfile.mkstemp(suffix=".mp4", prefix="bench-httpx-")
    n = 0
    try:
        with os.fdopen(fd, "wb") as fh, httpx.Client(verify=verify, timeout=60.0) as client:
            clock = Clock()
            with client.stream("GET", a.url, extensions={"trace": _httpx_trace(clock, False)}) as r:
                r.raise_for_status()
                clock.mark("first_byte")
                for chunk in r.iter_raw():
                    fh.write(chunk)
                    n += len(chunk)
                fh.flush()
                clock.mark("download_done")
                http_version = r.http_version
    finally:
        os.unlink(path)
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
    proc, dev = _load_processor(a.processor, _device(a.device))
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
    ok = rc == 0 and n > 0
    out = {"ok": ok, "error": None if ok else f"ffmpeg exited {rc}: {err[-300:]}", "t": clock.t,
           "wall_s": clock.t["total"], "frames": n, "bytes": None, "conns_new": 1,
           "conns_reused": 0}
    out.update(meter.stop())
    return out


def worker_decord_file(a) -> dict:
    """One streamed GET to a temp file (new connection), then decord on the file,
    ``get_batch`` of ``--batch`` frames into the processor (the first batch one frame)."""
    import ssl

    import httpx
    import torch
    try:
        import decord
    except ImportError:
        return {"ok": False, "error": "decord is not installed"}
    proc, dev = _load_processor(a.processor, _device(a.device))
    verify = ssl.create_default_context(cafile=a.ca) if a.ca else True
    fd, path = tempfile.mkstemp(suffix=".mp4", prefix="bench-decord-")
    meter = TreeMeter().start()
    try:
        with os.fdopen(fd, "wb") as fh, httpx.Client(verify=verify, timeout=60.0) as client:
            clock = Clock()
            with client.stream("GET", a.url, extensions={"trace": _httpx_trace(clock, False)}) as r:
                r.raise_for_status()
                for chunk in r.iter_raw():
                    fh.write(chunk)
                size = fh.tell()
        clock.mark("download_done")
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
    finally:
        os.unlink(path)
    out = {"ok": n > 0, "error": None if n else "decord decoded no frame", "t": clock.t,
           "wall_s": clock.t["total"], "frames": n, "bytes": size, "conns_new": 1,
           "conns_reused": 0}
    out.update(meter.stop())
    return out


WORKERS = {"ffmpeg-cli": worker_ffmpeg_cli, "decord-file": worker_decord_file,
           "engine-cold": worker_engine_cold, "httpx-get": worker_httpx_get, "stock": worker_stock, "seed-fork": worker_seed_fork,
           "pyav-url": worker_pyav_url, "local": worker_local}


def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.tools.bench --worker")
    ap.add_argument("--worker", required=True, choices=sorted(WORKERS))
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
        out = WORKERS[a.worker](a)
    except Exception as exc:                    # one line back to the parent, not a traceback
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    out["worker_maxrss_mb"] = round(_maxrss_mb(), 1)
    sys.stdout.write(RESULT_TAG + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


def _maxrss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def _parse(ap, argv, known) -> argparse.Namespace:
    """Parse, then check the contender list and the run count against ``known``."""
    a = ap.parse_args(argv)
    a.contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    bad = [c for c in a.contenders if c not in known]
    if bad or not a.contenders:
        ap.error(f"unknown contender(s) {bad}; known: {', '.join(known)}")
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    return a


def _teardown(eng, emu, cdn, tmp, old_ca) -> None:
    """Stop what a bench run started and give back SSL_CERT_FILE."""
    if eng is not None:
        eng.close()
    emu.stop()
    cdn.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    if old_ca is None:
        os.environ.pop("SSL_CERT_FILE", None)
    else:
        os.environ["SSL_CERT_FILE"] = old_ca
    _sweep()


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


def _med(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict], contenders: list[str]) -> dict:
    out = {}
    for c in contenders:
        rs = [r for r in runs if r["contender"] == c and r.get("ok")]
        s = {"runs_ok": len(rs), "runs_failed": sum(1 for r in runs if r["contender"] == c
                                                   and not r.get("ok"))}
        for k in STAGE_KEYS + ("written", "decode_start"):
            vals = [r["t"].get(k) for r in rs if r.get("t") and r["t"].get(k) is not None]
            if vals:
                s[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        idle = [r["model_idle_s"] for r in rs if r.get("model_idle_s") is not None]
        if idle:
            s["model_idle"] = {"median": statistics.median(idle), "min": min(idle),
                               "max": max(idle)}
        waits = [r["model_waits"] for r in rs if r.get("model_waits")]
        if waits:
            s["model_waits"] = {k: statistics.median(w[k] for w in waits)
                                for k in WAIT_PARTS}
        for k in ("wall_s", "startup_s", "cpu_s", "peak_rss_mb", "peak_pss_mb", "bytes",
                  "wire_bytes", "conns_accepted", "conns_new", "conns_reused", "frames",
                  "process_cpu_s", "model_s"):
            m = _med(r.get(k) for r in rs)
            if m is not None:
                s[k] = m
        out[c] = s
    ref = out.get("engine-warm", {})
    for c, s in out.items():
        for k in ("total", "first_result"):
            if k in s and k in ref and ref[k]["median"]:
                s[f"ratio_{k}"] = s[k]["median"] / ref[k]["median"]
    return out


def _fmt_stage(s: dict, key: str) -> str:
    v = s.get(key)
    if not v:
        return "-"
    if v["min"] == v["max"]:
        return f"{v['median']:.3f}"
    return f"{v['median']:.3f} [{v['min']:.2f}-{v['max']:.2f}]"


def _table(rows: list[list[str]], header: list[str], right=True) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    def line(cells):
        return "  ".join((str(c).ljust(w) if i == 0 else str(c).rjust(w))
                         for i, (c, w) in enumerate(zip(cells, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def render(summary: dict, contenders: list[str]) -> str:
    def num(v, f="{:.2f}"):
        return "-" if v is None else f.format(v)

    t_rows, r_rows = [], []
    for c in contenders:
        s = summary[c]
        fail = f" ({s['runs_failed']} failed)" if s["runs_failed"] else ""
        t_rows.append([c + fail, _fmt_stage(s, "first_frame"), _fmt_stage(s, "first_result"),
                       _fmt_stage(s, "total"),
                       num(s.get("ratio_first_result"), "{:.2f}x"),
                       num(s.get("ratio_total"), "{:.2f}x"),
                       num(s.get("startup_s"), "{:.2f}")])
        if c.startswith("limit"):
            conns = "-"
        elif s.get("conns_new") is not None or s.get("conns_accepted") is not None:
            new = s["conns_new"] if s.get("conns_new") is not None else s.get("conns_accepted")
            conns = f"{num(new, '{:.0f}')}/{num(s.get('conns_reused'), '{:.0f}')}"
        else:
            conns = "-"
        r_rows.append([c, num(s.get("cpu_s")), num(s.get("peak_rss_mb"), "{:.0f}"),
                       num(s.get("peak_pss_mb"), "{:.0f}"),
                       num(s["bytes"] / 1e6 if s.get("bytes") else None),
                       num(s["wire_bytes"] / 1e6 if s.get("wire_bytes") else None),
                       conns, num(s.get("frames"), "{:.0f}")])
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


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    from engine.demo.clips import PRESETS
    ap = argparse.ArgumentParser(prog="python -m engine bench",
                                 description="The engine against the stock and seed miners, PyAV "
                                             "on the URL, and the physical floor.")
    ap.add_argument("--profile", default="seed", help="CDN emulator profile (lan, seed, mobile)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--video", metavar="PATH", help="an MP4 file to serve instead of a preset clip")
    src.add_argument("--clip", default="sn44", choices=sorted(PRESETS), help="preset clip (sn44)")
    ap.add_argument("--runs", type=int, default=3, help="measurements per contender (3)")
    ap.add_argument("--processor", default="engine.processors:stats", help="module:factory")
    ap.add_argument("--device", help="auto, cpu, cuda[:N] (default ENGINE_DEVICE or auto)")
    ap.add_argument("--contenders", default=None,
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
    ap.add_argument("--json", metavar="PATH", help="write every raw measurement as JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG waterfall per contender")
    ap.add_argument("--timeout", type=float, default=120.0, help="per measurement, seconds (120)")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="start no new round after this many seconds (540)")
    argv = list(argv)
    if "--contenders" not in argv and not any(x.startswith("--contenders=") for x in argv):
        argv += ["--contenders", ",".join(MODEL_CONTENDERS if "--model-bound" in argv
                                          else CONTENDERS)]
    a = _parse(ap, argv, CONTENDERS + MODEL_CONTENDERS[1:])
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
    a = parse_args(argv)
    from engine.demo import local_cdn
    from engine.errors import EngineError
    from engine.demo.emulator import profile as get_profile
    from engine.demo.clips import cached_clip

    prof = get_profile(a.profile)
    started = time.monotonic()
    print("preparing the clip (generated once, then cached) ...", file=sys.stderr)
    video = Path(a.video).resolve() if a.video else cached_clip(a.clip)
    if not video.is_file():
        raise EngineError(f"--video {a.video}: no such file")
    name = "bench.mp4"
    machine = machine_info()
    cmdline = "python -m engine bench " + " ".join(shlex.quote(x) for x in argv)
    head = [f"$ {cmdline}",
            f"machine: {machine['cpu']}, {machine['cores_logical']} logical / "
            f"{machine['cores_physical']} physical cores (affinity {machine['affinity']}), "
            f"{machine['memory_gb']} GB RAM, GPU {machine['gpu'] or 'none'}, "
            f"load average {' '.join(map(str, machine['loadavg']))} at start",
            f"software: Python {machine['python']}, torch {machine['torch']}, PyAV {machine['av']}, "
            f"OpenCV {machine['cv2']}, httpx {machine['httpx']}; {machine['os']}",
            f"profile {prof.name}: RTT {prof.rtt_s * 1000:.0f} ms, +{prof.new_conn_s * 1000:.0f} ms "
            f"per new connection, {_rate(prof.per_conn_bps)} per connection, "
            f"{_rate(prof.total_bps)} in total",
            f"clip: {video.name} ({video.stat().st_size / 1e6:.2f} MB); processor {a.processor}; "
            f"device {a.device or os.environ.get('ENGINE_DEVICE') or 'auto'}; runs {a.runs}"]
    print("\n".join(head), flush=True)

    # the warm engine's first job (imports, processor load, first segments) runs on a tiny
    # clip off the clock; a whole job, since every stage of the pipeline should have run once
    cdn, emu, tmp = local_cdn({name: video, "warmup.mp4": cached_clip("small")}, prof.name)
    old_ca = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(cdn.ca_file)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    eng = None
    runs: list[dict] = []
    notes: list[str] = []
    try:
        url, origin = emu.url("/" + name), emu.url("/")
        common = ["--url", url, "--processor", a.processor, "--ca", str(cdn.ca_file)]
        if a.device:
            common += ["--device", a.device]
        warm_startup = None
        if "engine-warm" in a.contenders:
            from engine.api import Engine
            print("starting the warm engine ...", file=sys.stderr)
            t = time.perf_counter()
            eng = Engine(processor=a.processor, device=a.device)
            eng.prewarm([origin])
            warm = eng.report(emu.url("/warmup.mp4"))
            warm_startup = time.perf_counter() - t
            if not warm.ok:
                notes.append(f"engine-warm: the warm-up job failed: {warm.error}")
        order = list(a.contenders)
        for rnd in range(a.runs):
            if rnd and time.monotonic() - started > a.budget:
                notes.append(f"stopped after {rnd} rounds: the {a.budget:.0f} s budget was spent")
                break
            k = rnd % len(order)
            for c in order[k:] + order[:k]:
                print(f"round {rnd + 1}/{a.runs}: {c} ...", file=sys.stderr, flush=True)
                before = emu.stats()
                if c == "engine-warm":
                    res = _measure_warm(eng, url, origin, emu)
                    before = res.pop("_emu_before")
                elif c == "limit":
                    local = run_worker("local", ["--video", str(video), "--processor", a.processor]
                                       + (["--device", a.device] if a.device else []),
                                       a.timeout, env)
                    if local.get("ok"):
                        res, pipelined = limit_from(local, prof)
                        runs.append(dict(pipelined, contender="limit-pipelined", round=rnd))
                    else:
                        res = local
                    res["local"] = local
                else:
                    extra = []
                    if c == "seed-fork":
                        extra = ["--prefix-bytes", str(int(a.prefix_mb * 1024 * 1024))]
                    elif c == "ffmpeg-cli":
                        extra = ["--video", str(video)]
                    res = run_worker(c, common + extra, a.timeout, env)
                if c != "limit":
                    res.update(_emu_delta(before, emu.stats()))
                if a.model_bound:
                    _model_time(res)
                res.update(contender=c, round=rnd)
                runs.append(res)
                status = (f"total {res['t']['total']:.2f} s, {res.get('frames')} frames"
                          if res.get("ok") and res.get("t", {}).get("total") is not None
                          else f"FAILED: {res.get('error')}")
                print(f"  {c}: {status}", file=sys.stderr, flush=True)
    finally:
        _teardown(eng, emu, cdn, tmp, old_ca)

    shown = list(a.contenders)
    if "limit" in shown:
        shown.insert(shown.index("limit") + 1, "limit-pipelined")
    summary = summarize(runs, shown)
    if warm_startup is not None:
        notes.insert(0, f"engine-warm: started once in {warm_startup:.2f} s (start, prewarm and a "
                     "50-frame warm-up job on another clip, all off the clock)")
    print()
    print(render(summary, shown))
    if a.model_bound:
        print()
        print(render_model(summary, shown))
    notes += _notes(summary, a, prof)
    for failed in (r for r in runs if not r.get("ok")):
        notes.append(f"{failed['contender']} round {failed['round'] + 1} failed: {failed.get('error')}")
    if notes:
        print()
        for n in notes:
            print(f"- {n}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"command": cmdline, "machine": machine,
                       "profile": {"name": prof.name, "rtt_s": prof.rtt_s,
                                   "new_conn_s": prof.new_conn_s,
                                   "per_conn_bps": prof.per_conn_bps, "total_bps": prof.total_bps},
                       "video": {"path": str(video), "bytes": video.stat().st_size},
                       "processor": a.processor, "device": a.device, "runs_per_contender": a.runs,
                       "contenders": a.contenders, "rows": shown, "runs": runs, "summary": summary,
                       "notes": notes, "elapsed_s": round(time.monotonic() - started, 1)},
                      fh, indent=1)
    if a.plot:
        plot(summary, shown, a.plot,
             f"{video.name} ({video.stat().st_size / 1e6:.1f} MB) on profile {prof.name}, "
             f"{a.processor}, {machine['cores_logical']} cores")
    print(f"\nbench finished in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0 if all(r.get("ok") for r in runs) else 1


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


def _measure_warm(eng, url: str, origin: str, emu) -> dict:
    eng.prewarm([origin])
    before = emu.stats()
    meter = TreeMeter(eng.pid).start()
    mono = time.monotonic()
    t0 = time.perf_counter()
    report = eng.report(url)
    wall = time.perf_counter() - t0
    out = _report_fields(report, wall)
    out.update(meter.stop())
    out["_emu_before"] = before
    timeline = report.video_result
    if report.ok and isinstance(timeline, dict) and timeline.get("first_call") is not None:
        # the wait processor's own timeline (engine.processors.Wait): where the model waited
        out["model_waits"] = {
            "to_first_call": round(timeline["first_call"] - mono, 4),
            "ramp_gaps": timeline["ramp_gaps_s"], "gaps": timeline["gaps_s"],
            "after_last": round(mono + report.timings_s["total"] - timeline["last_end"], 4),
            "held_s": timeline["held_s"], "calls": timeline["calls"]}
    return out


def _notes(summary: dict, a, prof) -> list[str]:
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


def _rate(bps) -> str:
    return "unlimited" if not bps else f"{bps / 1e6:g} MB/s"


# ----------------------------------------------------------------------------- --fetch
FETCH_CONTENDERS = ("engine-warm", "engine-cold", "httpx-get", "aria2", "link")
NULL_PROCESSOR = "engine.processors:null"


def parse_fetch_args(argv):
    from engine.demo.clips import PRESETS
    ap = argparse.ArgumentParser(
        prog="python -m engine bench --fetch",
        description="Fetch only: the time until every byte of the clip is local, for the "
                    "engine (warm and cold), one httpx GET, aria2c and the link's floor.")
    ap.add_argument("--profile", default="seed", help="CDN emulator profile (lan, seed, mobile)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--video", metavar="PATH", help="an MP4 file to serve instead of a preset clip")
    src.add_argument("--clip", default="sn44", choices=sorted(PRESETS), help="preset clip (sn44)")
    ap.add_argument("--runs", type=int, default=5, help="measurements per contender (5)")
    ap.add_argument("--device", help="the engines' device (default ENGINE_DEVICE or auto)")
    ap.add_argument("--contenders", default=",".join(FETCH_CONTENDERS),
                    help=f"comma-separated subset of {','.join(FETCH_CONTENDERS)}")
    ap.add_argument("--json", metavar="PATH", help="write every raw measurement as JSON")
    ap.add_argument("--timeout", type=float, default=60.0, help="per measurement, seconds (60)")
    ap.add_argument("--budget", type=float, default=180.0,
                    help="start no new round after this many seconds (180)")
    return _parse(ap, argv, FETCH_CONTENDERS)


def run_aria2(url: str, ca: str, size: int, timeout: float) -> dict:
    """``aria2c -x16 -s16 -k1M`` to a temp dir; the time is the subprocess's wall clock
    (process start-up included, a few ms)."""
    exe = shutil.which("aria2c")
    if exe is None:
        return {"ok": False, "skipped": True, "error": "aria2c is not installed (apt-get install aria2)"}
    d = tempfile.mkdtemp(prefix="bench-aria2-")
    cmd = [exe, "--no-conf", "-x16", "-s16", "-k1M", f"--ca-certificate={ca}",
           "--allow-overwrite=true", "--auto-file-renaming=false", "--file-allocation=none",
           "--summary-interval=0", "--console-log-level=warn", "--download-result=hide",
           "-d", d, "-o", "out.mp4", url]
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return {"ok": False, "error": f"aria2c timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        _kill_group(proc)
        got = os.path.getsize(os.path.join(d, "out.mp4")) if os.path.exists(os.path.join(d, "out.mp4")) else 0
        ok = proc.returncode == 0 and got == size
        res = {"ok": ok, "error": None if ok else
               f"aria2c exited {proc.returncode}, {got} of {size} bytes: {out.strip()[-300:]}",
               "t": {"download_done": round(wall, 4)}, "wall_s": round(wall, 4), "bytes": got,
               "http_version": "HTTP/1.1"}
        return res
    finally:
        shutil.rmtree(d, ignore_errors=True)


def fetch_link(prof, size: int) -> tuple[dict, dict]:
    """The floor: one RTT then the file at the link's aggregate rate (connections open);
    cold adds one new connection's set-up (``new_conn_s``)."""
    transfer = size / prof.total_bps if prof.total_bps else 0.0
    warm = {"ok": True, "error": None, "bytes": size, "transfer_s": round(transfer, 4),
            "t": {"first_byte": round(prof.rtt_s, 4), "download_done": round(prof.rtt_s + transfer, 4)}}
    cold_fb = prof.rtt_s + prof.new_conn_s
    cold = {"ok": True, "error": None, "bytes": size, "transfer_s": round(transfer, 4),
            "t": {"first_byte": round(cold_fb, 4), "download_done": round(cold_fb + transfer, 4)}}
    return warm, cold


def summarize_fetch(runs: list[dict], rows: list[str]) -> dict:
    out = {}
    for c in rows:
        rs = [r for r in runs if r["contender"] == c and r.get("ok")]
        s = {"runs_ok": len(rs), "runs_failed": sum(1 for r in runs if r["contender"] == c
                                                   and not r.get("ok") and not r.get("skipped")),
             "skipped": next((r["error"] for r in runs if r["contender"] == c and r.get("skipped")),
                             None)}
        for k in ("connect", "first_byte", "download_done"):
            vals = [r["t"][k] for r in rs if r.get("t") and r["t"].get(k) is not None]
            if vals:
                s[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        for k in ("wall_s", "startup_s", "bytes", "wire_bytes", "conns_accepted", "conns_new",
                  "conns_reused", "cpu_s"):
            m = _med(r.get(k) for r in rs)
            if m is not None:
                s[k] = m
        out[c] = s
    ref = out.get("engine-warm", {}).get("download_done")
    for s in out.values():
        if ref and ref["median"] and s.get("download_done"):
            s["ratio"] = s["download_done"]["median"] / ref["median"]
    return out


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


def render_fetch(summary: dict, rows: list[str], prof, size: int) -> str:
    def num(v, f="{:.2f}"):
        return "-" if v is None else f.format(v)

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
            conns = f"{s['conns_new']:.0f}/{num(s.get('conns_reused'), '{:.0f}')}"
        if s.get("conns_accepted") is not None:
            conns += f" ({s['conns_accepted']:.0f})"
        out.append([c + fail, _fmt_stage(s, "download_done"), num(s.get("ratio"), "{:.2f}x"),
                    _fmt_stage(s, "first_byte"), num(fb_rtt, "{:.2f}"),
                    num(size / dl["median"] / 1e6 if dl and dl["median"] else None, "{:.1f}"),
                    conns, num(s["wire_bytes"] / 1e6 if s.get("wire_bytes") else None),
                    num(s.get("startup_s"))])
    return _table(out, ["contender", "all bytes local s", "/warm", "first byte s", "fb/RTT",
                        "MB/s", "req new/reused (conns)", "MB wire", "start-up s"])


def fetch_main(argv: list[str]) -> int:
    a = parse_fetch_args(argv)
    from engine.demo import local_cdn
    from engine.errors import EngineError
    from engine.demo.emulator import profile as get_profile
    from engine.demo.clips import cached_clip

    try:
        prof = get_profile(a.profile)
    except ValueError as exc:
        raise EngineError(str(exc)) from None
    started = time.monotonic()
    print("preparing the clip (generated once, then cached) ...", file=sys.stderr)
    video = Path(a.video).resolve() if a.video else cached_clip(a.clip)
    if not video.is_file():
        raise EngineError(f"--video {a.video}: no such file")
    size = video.stat().st_size
    name = "bench.mp4"
    machine = machine_info()
    cmdline = "python -m engine bench --fetch " + " ".join(shlex.quote(x) for x in argv)
    head = [f"$ {cmdline}",
            f"machine: {machine['cpu']}, {machine['cores_logical']} logical cores (affinity "
            f"{machine['affinity']}), load average {' '.join(map(str, machine['loadavg']))} at start; "
            f"httpx {machine['httpx']}",
            f"profile {prof.name}: RTT {prof.rtt_s * 1000:.0f} ms, +{prof.new_conn_s * 1000:.0f} ms "
            f"per new connection, {_rate(prof.per_conn_bps)} per connection, "
            f"{_rate(prof.total_bps)} in total (the link's aggregate capacity)",
            f"clip: {video.name} ({size / 1e6:.2f} MB); runs {a.runs}; measured: the time until "
            "every byte is local (engine: report download_done, since submit)"]
    print("\n".join(head), flush=True)

    rows = [c for c in a.contenders]
    if "link" in rows:
        rows.insert(rows.index("link") + 1, "link-cold")
    measured = [c for c in a.contenders if c != "link"]
    runs: list[dict] = []
    notes: list[str] = []
    if "link" in a.contenders:
        lw, lc = fetch_link(prof, size)
        runs += [dict(lw, contender="link", round=0), dict(lc, contender="link-cold", round=0)]
    aria2_missing = "aria2" in measured and shutil.which("aria2c") is None
    if aria2_missing:
        print("aria2c is not installed: skipping the aria2 contender", file=sys.stderr)
        runs.append({"ok": False, "skipped": True, "contender": "aria2", "round": 0,
                     "error": "aria2c is not installed (apt-get install aria2)"})
        measured.remove("aria2")

    cdn, emu, tmp = local_cdn({name: video, "warmup.mp4": cached_clip("small")}, prof.name)
    old_ca = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(cdn.ca_file)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    eng = None
    warm_startup = None
    try:
        url, origin = emu.url("/" + name), emu.url("/")
        ca = str(cdn.ca_file)
        dev = ["--device", a.device] if a.device else []
        if "engine-warm" in measured:
            from engine.api import Engine
            print("starting the warm engine ...", file=sys.stderr)
            t = time.perf_counter()
            eng = Engine(processor=NULL_PROCESSOR, device=a.device)
            eng.prewarm([origin])
            warm = eng.report(emu.url("/warmup.mp4"))
            warm_startup = time.perf_counter() - t
            if not warm.ok:
                notes.append(f"engine-warm: the warm-up job failed: {warm.error}")
        for rnd in range(a.runs):
            if rnd and time.monotonic() - started > a.budget:
                notes.append(f"stopped after {rnd} rounds: the {a.budget:.0f} s budget was spent")
                break
            k = rnd % max(len(measured), 1)
            for c in measured[k:] + measured[:k]:
                print(f"round {rnd + 1}/{a.runs}: {c} ...", file=sys.stderr, flush=True)
                before = emu.stats()
                if c == "engine-warm":
                    res = _measure_warm(eng, url, origin, emu)
                    before = res.pop("_emu_before")
                elif c == "engine-cold":
                    res = run_worker("engine-cold", ["--url", url, "--processor", NULL_PROCESSOR,
                                                     "--ca", ca] + dev, a.timeout + 60, env)
                elif c == "httpx-get":
                    res = run_worker("httpx-get", ["--url", url, "--ca", ca], a.timeout, env)
                else:
                    res = run_aria2(url, ca, size, a.timeout)
                res.update(_emu_delta(before, emu.stats()))
                res.update(contender=c, round=rnd)
                runs.append(res)
                dl = (res.get("t") or {}).get("download_done")
                status = (f"all bytes local at {dl:.3f} s" if res.get("ok") and dl is not None
                          else f"FAILED: {res.get('error')}")
                print(f"  {c}: {status}", file=sys.stderr, flush=True)
    finally:
        _teardown(eng, emu, cdn, tmp, old_ca)

    summary = summarize_fetch(runs, rows)
    checks = fetch_checks(summary, prof, size)
    print()
    print("time until all bytes are local: median [min-max] over the runs, seconds; /warm = "
          "median over engine-warm's; fb/RTT = first byte / one RTT; MB/s = size / median; "
          "requests on new/reused connections as the client counts them, and in brackets the "
          "connections the emulator accepted during the run")
    print(render_fetch(summary, rows, prof, size))
    print()
    print(f"link: aggregate capacity {_rate(prof.total_bps)}"
          + (f" = {prof.total_bps / prof.per_conn_bps:g} connections at {_rate(prof.per_conn_bps)}"
             if prof.total_bps and prof.per_conn_bps else "")
          + f"; floor for {size / 1e6:.2f} MB = RTT + size/capacity "
          f"= {prof.rtt_s:.3f} + {(size / prof.total_bps if prof.total_bps else 0):.3f} s; "
          f"cold floor adds one new connection ({prof.new_conn_s:.3f} s; the emulator's TLS "
          "handshake round trips come on top of it)")
    print("goal checks (medians):")
    for ch in checks:
        verdict = {True: "PASS", False: "FAIL", None: "info"}[ch["pass"]]
        how = f" [{ch['how']}]" if ch.get("how") and ch["how"] != "-" else ""
        print(f"  {verdict:4}  {ch['goal']}{how}: {ch['text']}")
    if warm_startup is not None:
        notes.insert(0, f"engine-warm: started once in {warm_startup:.2f} s (start, prewarm and a "
                     "warm-up job on another clip, off the clock); prewarmed again before each run; "
                     f"processor {NULL_PROCESSOR}")
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
    for failed in (r for r in runs if not r.get("ok") and not r.get("skipped")):
        notes.append(f"{failed['contender']} round {failed['round'] + 1} failed: {failed.get('error')}")
    print()
    for n in notes:
        print(f"- {n}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"command": cmdline, "machine": machine,
                       "profile": {"name": prof.name, "rtt_s": prof.rtt_s,
                                   "new_conn_s": prof.new_conn_s,
                                   "per_conn_bps": prof.per_conn_bps, "total_bps": prof.total_bps},
                       "video": {"path": str(video), "bytes": size}, "runs_per_contender": a.runs,
                       "contenders": a.contenders, "rows": rows, "runs": runs, "summary": summary,
                       "checks": checks, "notes": notes,
                       "elapsed_s": round(time.monotonic() - started, 1)}, fh, indent=1)
    print(f"\nbench --fetch finished in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0 if all(r.get("ok") or r.get("skipped") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
