"""``python -m engine bench``: the engine side by side with the methods miners use today.

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
  (``--prefix-mb``) to a temp file, then OpenCV on that prefix: it only sees the frames
  inside it, so its frame count (coverage) matters as much as its time.
* ``pyav-url`` -- ``av.open(url)`` on FFmpeg's own HTTPS (verifying the CDN's CA via
  ``ca_file``/``tls_verify``), decode to rgb24, processor per frame.
* ``limit`` -- not a method but the physical floor for this file on this link and this
  machine: the transfer at the link's aggregate rate, and the decode+process time of the
  same file from local disk measured in this run (see ``limit_from``); ``limit-pipelined``,
  shown with it, lets decode and processor overlap perfectly (decode alone vs processor
  alone), the floor for a pipeline like the engine's.

``--model-bound`` is this mode with a model's stand-in as the processor (``model_bound``).
"""
from __future__ import annotations

import os

from engine.tools.bench.context import Context, options_parser, parse_options
from engine.tools.bench.contenders import EngineWarm, Limit, Worker
from engine.tools.bench.plot import plot
from engine.tools.bench.model_bound import (MODEL_CONTENDERS, WAIT_PROCESSOR, model_time,
                                            render_model)
from engine.tools.bench.runner import Runner
from engine.tools.bench.tables import fmt_stage, num, summarize, table

CONTENDERS = ("engine-warm", "engine-cold", "stock", "seed-fork", "pyav-url", "limit")
STAGE_KEYS = ("connect", "first_byte", "moov_ready", "first_frame", "first_result",
              "download_done", "decode_done", "total")


def render(summary: dict, rows: list[str]) -> str:
    t_rows, r_rows = [], []
    for c in rows:
        s = summary[c]
        fail = f" ({s['runs_failed']} failed)" if s["runs_failed"] else ""
        t_rows.append([c + fail, fmt_stage(s, "first_frame"), fmt_stage(s, "first_result"),
                       fmt_stage(s, "total"), num(s.get("ratio_first_result"), "{:.2f}x"),
                       num(s.get("ratio_total"), "{:.2f}x"), num(s.get("startup_s"))])
        new = s["conns_new"] if s.get("conns_new") is not None else s.get("conns_accepted")
        conns = "-" if new is None else f"{new:.0f}/{num(s.get('conns_reused'), '{:.0f}')}"
        r_rows.append([c, num(s.get("cpu_s")), num(s.get("peak_rss_mb"), "{:.0f}"),
                       num(s.get("peak_pss_mb"), "{:.0f}"),
                       num(s["bytes"] / 1e6 if s.get("bytes") else None),
                       num(s["wire_bytes"] / 1e6 if s.get("wire_bytes") else None),
                       conns, num(s.get("frames"), "{:.0f}")])
    t = table(t_rows, ["contender", "first frame s", "first result s", "total s",
                       "1st res/warm", "total/warm", "startup s"])
    r = table(r_rows, ["contender", "CPU s", "peak RSS MB", "peak PSS MB", "MB payload",
                       "MB wire", "conns new/reused", "frames"])
    return ("timings: median [min-max] over the runs, seconds since the job was submitted\n"
            + t + "\n\nresources (medians; CPU = user+sys of the process tree over the timed part)\n"
            + r)


def parse_args(argv):
    ap = options_parser("python -m engine bench", "The engine against the stock and seed miners, "
                        "PyAV on the URL, and the physical floor.", runs=3, timeout=120.0,
                        budget=540.0)
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
    a = parse_options(ap, argv, CONTENDERS + MODEL_CONTENDERS[1:],
                      MODEL_CONTENDERS if "--model-bound" in argv else CONTENDERS)
    if a.model_bound:
        a.processor = WAIT_PROCESSOR
    return a


def main(argv: list[str]) -> int:
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
    runner = Runner(ctx, "total", model_time if a.model_bound else None)
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
