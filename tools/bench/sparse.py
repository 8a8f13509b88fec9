"""``python -m engine bench --sparse``: a few frames of a long video, side by side.

Part one: ``count=32`` frames (``numpy.linspace(0, n - 1, 32)``) of a 2-minute 720p clip
with a keyframe every 2 s, handed back to the caller as RGB arrays, by
- ``engine``: ``Engine.frames(url, count=32)`` on a warm engine (only the GOPs that hold
  the frames are fetched and decoded), the frames copied out to the caller;
- ``engine-1lane``: the same with ``ENGINE_DECODE_LANES=1`` (the spans one after another);
- ``engine-all``: the same engine decoding every frame (``engine.processors:null``);
- ``vllm-cv2``: vLLM's way: the whole body with one GET, then OpenCV ``grab`` on every
  frame and ``retrieve`` on the selected ones;
- ``pyav-whole``: the whole body, then PyAV decoding every frame, converting the selected;
- ``pyav-seek``: PyAV opening the URL and seeking to each selected frame.
Part two: ``every=5`` of the 750-frame clip (two lanes and one) against the engine's
all-frames run, all with ``engine.processors:null``.
After every engine job a one-frame job follows on the same engine: its new connections
show whether the partial job left the pool warm.
"""
from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np

from engine.tools.bench.contenders import Contender, Worker
from engine.tools.bench.context import Context, machine_info, options_parser, parse_options
from engine.report import TIMING_KEYS
from engine.tools.bench.measure import Clock, TreeMeter, decoded, report_fields
from engine.tools.bench.runner import Runner
from engine.tools.bench.tables import fmt_stage, num, summarize, table
from engine.tools.bench.workers import httpx_trace, temp_mp4

SPARSE_CONTENDERS = ("engine", "engine-1lane", "engine-all", "vllm-cv2", "pyav-whole", "pyav-seek")
COUNT = 32


def _linspace(n: int, count: int) -> list[int]:
    return sorted(set(np.linspace(0, n - 1, count).astype(int).tolist()))


def _whole_get(url: str, clock: Clock) -> bytes:
    import httpx
    with httpx.Client(timeout=60.0) as client:
        response = client.get(url, extensions={"trace": httpx_trace(clock, False)})
        response.raise_for_status()
    clock.mark("download_done")
    return response.content


def worker_vllm_cv2(a) -> dict:
    """vLLM's OpenCV video loader, after ``MediaConnector`` read the whole body."""
    import cv2
    meter = TreeMeter().start()
    clock = Clock()
    content = _whole_get(a.url, clock)
    with temp_mp4("vllm") as path:
        with open(path, "wb") as fh:
            fh.write(content)
        cap = cv2.VideoCapture(path)
        try:
            n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            wanted = set(_linspace(n, a.count))
            frames = []
            for idx in range(n):
                if not cap.grab():
                    break
                if idx in wanted:
                    ok, bgr = cap.retrieve()
                    if ok:
                        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                        clock.mark("first_frame")
        finally:
            cap.release()
    clock.mark("total")
    return decoded(clock, len(frames), meter, None if frames else "OpenCV gave no frame",
                   bytes=len(content), conns_new=1, conns_reused=0)


def worker_pyav_whole(a) -> dict:
    """The whole body, then PyAV decoding every frame, converting the selected ones."""
    import av
    from engine.workers.decoder import rgb24
    meter = TreeMeter().start()
    clock = Clock()
    content = _whole_get(a.url, clock)
    with av.open(io.BytesIO(content)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        wanted = set(_linspace(stream.frames, a.count))
        frames = []
        for i, frame in enumerate(c.decode(stream)):
            if i in wanted:
                frames.append(rgb24(frame))
                clock.mark("first_frame")     # the first time only
    clock.mark("total")
    return decoded(clock, len(frames), meter, None if frames else "PyAV gave no frame",
                   bytes=len(content), conns_new=1, conns_reused=0)


def worker_pyav_seek(a) -> dict:
    """PyAV on the URL: for each selected frame, seek to the keyframe before it and decode
    up to it (FFmpeg's HTTP reader asks for a new range at each seek)."""
    import av
    from engine.workers.decoder import rgb24
    meter = TreeMeter().start()
    clock = Clock()
    options = {"ca_file": a.ca, "tls_verify": "1"} if a.ca else {}
    frames = []
    with av.open(a.url, options=options, timeout=60.0) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        clock.mark("moov_ready")
        step = 1 / (float(stream.average_rate) * float(stream.time_base))
        for idx in _linspace(stream.frames, a.count):
            target = int(round(idx * step)) + (stream.start_time or 0)
            c.seek(target, stream=stream, backward=True, any_frame=False)
            for frame in c.decode(stream):
                if frame.pts is not None and frame.pts >= target:
                    frames.append(rgb24(frame))
                    clock.mark("first_frame")
                    break
    clock.mark("total")
    return decoded(clock, len(frames), meter, None if frames else "PyAV gave no frame",
                   bytes=None)


WORKERS = {"vllm-cv2": worker_vllm_cv2, "pyav-whole": worker_pyav_whole,
           "pyav-seek": worker_pyav_seek}


class EngineJob(Contender):
    """A job on the warm engine; then a one-frame job: its new connections are the pool
    the first one left (``next_conns_new``)."""

    def __init__(self, name: str, frames: bool = False, settings: dict | None = None,
                 **selection):
        super().__init__(name)
        self.frames, self.selection, self.settings = frames, selection, settings or {}

    def prepare(self, ctx):
        return ctx.start_engine(**self.settings)

    def run(self, ctx):
        eng = ctx.engine(**self.settings)
        before = ctx.emu.stats()
        meter = TreeMeter(eng.pid).start()
        t0 = time.perf_counter()
        if self.frames:
            try:
                got = eng.frames(ctx.url, **self.selection)
                report, frames = got.report, len(got.frame_numbers)
            except Exception as exc:            # noqa: BLE001 -- a failed run is a row
                report, frames = getattr(exc, "report", None), 0
                if report is None:
                    return {"ok": False, "error": str(exc)}
        else:
            report = eng.report(ctx.url, processor="engine.processors:null", **self.selection)
            frames = report.frames_processed
        out = report_fields(report, time.perf_counter() - t0)
        out.update(meter.stop(), _emu_before=before, frames=frames)
        out["t"]["total"] = out["wall_s"]
        nxt = eng.report(ctx.url, frames=[0], processor="engine.processors:null")
        out["next_conns_new"] = nxt.fetch["connections_new"]
        return out


def parse_args(argv):
    ap = options_parser("python -m engine bench --sparse", "A few frames of a long video: the "
                        "engine's selection against what VLM servers run today.", runs=3,
                        timeout=180.0, budget=900.0)
    ap.add_argument("--contenders", help=f"comma-separated subset of {','.join(SPARSE_CONTENDERS)}")
    ap.add_argument("--count", type=int, default=COUNT, help=f"frames selected ({COUNT})")
    ap.add_argument("--every-clip", default="sn44", help="part two's clip (sn44)")
    ap.add_argument("--every", type=int, default=5, help="part two's every=N (5)")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG waterfall per contender of "
                    "part one at PATH, of part two beside it (PATH's name + '-every')")
    ap.add_argument("--processor", default="engine.processors:null", help=argparse.SUPPRESS)
    ap.set_defaults(clip="long")
    a = parse_options(ap, argv, SPARSE_CONTENDERS, SPARSE_CONTENDERS)
    return a


def _render(summary: dict, rows: list[str], size: int) -> str:
    out = []
    for c in rows:
        s = summary[c]
        fail = f" ({s['runs_failed']} failed)" if s["runs_failed"] else ""
        share = f"{100 * s['wire_bytes'] / size:.0f}%" if s.get("wire_bytes") else "-"
        out.append([c + fail, fmt_stage(s, "total"), num(s.get("ratio_total"), "{:.2f}x"),
                    num(s.get("frames"), "{:.0f}"), num(s.get("frames_decoded"), "{:.0f}"),
                    share, num(s.get("cpu_s")),
                    num(s.get("next_conns_new"), "{:.0f}")])
    return table(out, ["contender", "total s", "total/engine", "frames", "decoded", "bytes of file",
                       "CPU s", "next job's new conns"])


def _part(a, argv, prog: str, contenders: list, ref: str) -> tuple[dict, list[str], int, Runner]:
    ctx = Context(a, prog, argv)
    ctx.head(f"clip: {ctx.video.name} ({ctx.size / 1e6:.2f} MB); {ctx.profile_line}")
    runner = Runner(ctx, "total")
    rows = runner.measure(contenders)
    summary = summarize(runner.runs, rows, TIMING_KEYS,
                        ("wall_s", "cpu_s", "bytes", "wire_bytes", "frames", "frames_decoded",
                         "next_conns_new"),
                        {})
    base = summary.get(ref, {}).get("total")
    for s in summary.values():
        if base and s.get("total"):
            s["ratio_total"] = s["total"]["median"] / base["median"]
    return summary, rows, ctx.size, runner


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    timeout = a.timeout
    made = {"engine": EngineJob("engine", frames=True, count=a.count),
            "engine-1lane": EngineJob("engine-1lane", frames=True, settings={"decode_lanes": 1},
                                      count=a.count),
            "engine-all": EngineJob("engine-all")}
    contenders = [made.get(c) or Worker(c, timeout, "--count", str(a.count),
                                        worker=f"sparse:{c}") for c in a.contenders]
    m = machine_info()
    print(f"machine: {m['cpu']}, {m['cores_logical']} logical cores, {m['memory_gb']} GB RAM, "
          f"GPU {m['gpu'] or 'none'}, load average {' '.join(map(str, m['loadavg']))}")
    print(f"\npart one: count={a.count}, ratios against engine")
    one, rows1, size1, r1 = _part(a, argv, "bench --sparse", contenders, "engine")
    print(_render(one, rows1, size1))
    a2 = argparse.Namespace(**{**vars(a), "clip": a.every_clip, "video": None, "json": None})
    print(f"\npart two: every={a.every}, ratios against engine-all")
    two, rows2, size2, r2 = _part(a2, argv, "bench --sparse", [
        EngineJob(f"engine-every{a.every}", every=a.every),
        EngineJob(f"engine-every{a.every}-1lane", settings={"decode_lanes": 1}, every=a.every),
        EngineJob("engine-all")], "engine-all")
    print(_render(two, rows2, size2))
    if a.plot:
        from pathlib import Path

        from engine.tools.bench.plot import plot
        path = Path(a.plot)
        title = f"python -m engine bench --sparse, profile {a.profile}: "
        plot(one, rows1, str(path), title + f"count={a.count} of clip {a.video or a.clip}",
             "the engine's")
        plot(two, rows2, str(path.with_name(path.stem + "-every" + path.suffix)),
             title + f"every={a.every} of clip {a.every_clip}", "all frames'")
    notes = [f"{r['contender']} round {r['round'] + 1} failed: {r.get('error')}"
             for r in r1.runs + r2.runs if not r.get("ok")]
    for n in notes:
        print(f"- {n}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"command": "python -m engine bench --sparse " + " ".join(argv),
                       "machine": m, "part_one": {"summary": one, "runs": r1.runs},
                       "part_two": {"summary": two, "runs": r2.runs}}, fh, indent=1)
    return 1 if notes else 0
