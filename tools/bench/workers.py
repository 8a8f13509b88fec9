"""The subprocess contenders: ``python -m engine.tools.bench --worker NAME ...`` runs one
measurement in a fresh interpreter and prints one JSON line tagged ``RESULT_TAG``; imports
and the processor's load happen before its clock starts.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.tools.bench.measure import Clock, TreeMeter, decoded, report_fields

RESULT_TAG = "BENCH-RESULT "


def load_processor(a):
    """The worker's processor on its device (``--device``, else ENGINE_DEVICE, else auto)."""
    import torch
    from engine.processors import load
    d = (a.device or os.environ.get("ENGINE_DEVICE") or "auto").lower()
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    return load(a.processor, torch.device(d)), torch.device(d)


def httpx_trace(clock: Clock, is_async: bool):
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
    with temp_mp4(tag) as path:
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
def temp_mp4(tag: str):
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
        with client.stream("GET", url, extensions={"trace": httpx_trace(clock, False)}) as r:
            r.raise_for_status()
            clock.mark("first_byte")
            for chunk in r.iter_raw():
                fh.write(chunk)
            fh.flush()
            clock.mark("download_done")
            return clock, fh.tell(), r.http_version


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
    out = report_fields(report, wall)
    out.update(res, startup_s=round(startup, 4), startup_cpu_s=startup_res["cpu_s"])
    return out


def worker_stock(a) -> dict:
    import httpx
    proc, dev = load_processor(a)
    meter = TreeMeter().start()
    clock = Clock()

    async def fetch() -> bytes:                 # the SN44 miner's download, as it is
        async with httpx.AsyncClient(timeout=60.0) as client:
            response = await client.get(a.url, extensions={"trace": httpx_trace(clock, True)})
            response.raise_for_status()
            return response.content, response.http_version

    content, http_version = asyncio.run(fetch())
    clock.mark("download_done")
    frames = _cv2_loop(content, clock, proc, dev, "stock")
    return decoded(clock, frames, meter, None if frames else "OpenCV decoded no frame",
                   bytes=len(content), http_version=http_version, conns_new=1, conns_reused=0)


def worker_seed_fork(a) -> dict:
    import httpx
    proc, dev = load_processor(a)
    client = httpx.Client(http2=True, timeout=60.0)
    try:
        t = time.perf_counter()                 # a running miner's pool is already warm
        client.get(a.url, headers={"Range": "bytes=0-0"}).raise_for_status()
        warmup = time.perf_counter() - t
        meter = TreeMeter().start()
        clock = Clock()
        response = client.get(a.url, headers={"Range": f"bytes=0-{a.prefix_bytes - 1}"},
                              extensions={"trace": httpx_trace(clock, False)})
        response.raise_for_status()
        clock.mark("first_byte")
        content = response.content
        clock.mark("download_done")
    finally:
        client.close()
    frames = _cv2_loop(content, clock, proc, dev, "seed")
    return decoded(clock, frames, meter,
                   None if frames else "OpenCV decoded no frame from the prefix",
                   bytes=len(content), http_version=response.http_version, conns_new=0,
                   conns_reused=1, pool_warmup_s=round(warmup, 4))


def worker_pyav_url(a) -> dict:
    import av
    proc, dev = load_processor(a)
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
    return decoded(clock, frames, meter, None if frames else "PyAV decoded no frame",
                   bytes=None, http_version="HTTP/1.1", note=note)


def worker_local(a) -> dict:
    """The decode side of the floor: the same file from local disk, same processor."""
    import av
    from engine.workers.decoder import rgb24
    proc, dev = load_processor(a)
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
    with temp_mp4("httpx") as path:
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
    proc, dev = load_processor(a)
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
    return decoded(clock, n, meter, None if rc == 0 and n else f"ffmpeg exited {rc}: {err[-300:]}",
                   bytes=None, conns_new=1, conns_reused=0)


def worker_decord_file(a) -> dict:
    """One streamed GET to a temp file (new connection), then decord on the file,
    ``get_batch`` of ``--batch`` frames into the processor (the first batch one frame)."""
    import torch
    try:
        import decord
    except ImportError:
        return {"ok": False, "error": "decord is not installed"}
    proc, dev = load_processor(a)
    meter = TreeMeter().start()
    with temp_mp4("decord") as path:
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
    return decoded(clock, n, meter, None if n else "decord decoded no frame", bytes=size,
                   conns_new=1, conns_reused=0)


WORKERS = {"ffmpeg-cli": worker_ffmpeg_cli, "decord-file": worker_decord_file,
           "engine-cold": worker_engine_cold, "httpx-get": worker_httpx_get,
           "stock": worker_stock, "seed-fork": worker_seed_fork,
           "pyav-url": worker_pyav_url, "local": worker_local}


def worker_main(argv: list[str], find) -> int:
    """Run the worker that ``find(NAME)`` gives and print its result line."""
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
        out = find(a.worker)(a)
    except Exception as exc:                    # one line back to the parent, not a traceback
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    import resource
    out["worker_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    sys.stdout.write(RESULT_TAG + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0
