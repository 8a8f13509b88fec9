"""``python -m engine``: run, submit, status, diagnose, bench.

Every failure a user can cause (bad URL, server errors, bad options, no engine on the
socket) ends in one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from engine.config import Config, ConfigError, check_device
from engine.errors import EngineError
from engine.report import TIMINGS
from engine.selection import Selection, options_of

def bounding_stage(t: dict) -> str:
    """Which stage the job waited on last: the network, the decoder or the processor."""
    total, dl, dec = t.get("total"), t.get("download_done"), t.get("decode_done")
    if not total or dl is None or dec is None:
        return "unknown"
    if total - dec > 0.15 * total:
        return "processor (results came well after the last frame was decoded)"
    if dec - dl < 0.1 * total:
        return "download (decoding kept pace with the arriving bytes)"
    return "decode (bytes were in long before the frames were decoded)"


def summary(report) -> str:
    r = report if isinstance(report, dict) else report.to_dict()
    v, f, t = r["video"], r["fetch"], r["timings_s"]
    head = "OK" if r["ok"] else "FAILED"
    lines = [f"{head}  {r['url']}"]
    if not r["ok"]:
        lines.append(f"  error: {r['error']}")
    if v.get("frames") is not None:
        lines.append(f"  video: {v['codec']} {v['width']}x{v['height']} {v['fps']} fps, "
                     f"{v['frames']} frames, {v['bytes'] / 1e6:.2f} MB, moov at {v['moov']}")
    asked = {k: v for k, v in (r.get("selection") or {}).items() if v is not None}
    if asked:
        lines.append("  selection: " + ", ".join(f"{k}={v}" for k, v in asked.items())
                     + f" ({r.get('frames_selected')} frames selected, plan {r.get('plan')})")
    lines.append(f"  frames processed: {r['frames_processed']}"
                 + (f" (missing {len(r['missing_frames'])})" if r.get("missing_frames") else "")
                 + (f", decoder {r['decoder']}" if r.get("decoder") else "")
                 + (f", {r['frames_decoded']} decoded" if r.get("frames_decoded") is not None
                    else ""))
    lines.append(f"  fetch: {f['http_version'] or '-'}, connections new {f['connections_new']} / "
                 f"reused {f['connections_reused']}, {f['ranges']} ranges, {f['retries']} retries, "
                 f"{f['bytes'] / 1e6:.2f} MB")
    total = t.get("total") or 0
    width = 40
    for key, label in TIMINGS:
        at = t.get(key)
        if at is None:
            lines.append(f"  {label:<14}      -")
            continue
        bar = "#" * max(1, round(width * at / total)) if total else ""
        lines.append(f"  {label:<14}{at:7.3f} s  {bar}")
    if r["ok"]:
        lines.append(f"  bounded by: {bounding_stage(t)}")
    return "\n".join(lines)


def _write_json(path: str | None, reports: list, single: bool) -> None:
    if not path:
        return
    data = reports[0] if single and len(reports) == 1 else reports
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processor", help="module:factory (default: the engine's, "
                   "engine.processors:stats)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default ENGINE_DEVICE or auto)")
    # Selection values are checked by engine.selection (one line, exit 1), not argparse.
    p.add_argument("--max-frames", help="process only the first N frames (of the selection)")
    p.add_argument("--every", metavar="N", help="frames 0, N, 2N, ...")
    p.add_argument("--fps", metavar="F", help="the frame shown at each time k/F")
    p.add_argument("--count", metavar="N", help="N frames spread evenly (numpy.linspace)")
    p.add_argument("--frames", metavar="I,J,...", help="these frame indices")
    p.add_argument("--start", dest="start_s", metavar="S",
                   help="only frames shown at or after S seconds")
    p.add_argument("--end", dest="end_s", metavar="S", help="only frames shown before S seconds")
    p.add_argument("--json", metavar="PATH", help="write the report(s) as JSON")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show frames advancing on stderr (default: when stderr is a terminal)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m engine",
                                 description="Video URL -> decoded frames -> GPU model, overlapped.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run jobs on a new engine (or serve on a socket with no URL)")
    run.add_argument("urls", nargs="*", metavar="URL")
    run.add_argument("--demo", action="store_true",
                     help="serve a generated 750-frame clip from a local emulated CDN and run on it")
    run.add_argument("--profile", default="seed", help="network profile for --demo (lan, seed, ...)")
    run.add_argument("--socket", help="serve-mode socket path")
    run.add_argument("--metrics-port", type=int,
                     help="serve mode: Prometheus text metrics on 127.0.0.1:PORT/metrics")
    run.add_argument("--cluster", metavar="ADDRESS",
                     help="run on a Ray cluster, one engine per GPU (default ENGINE_CLUSTER)")
    _job_options(run)
    submit = sub.add_parser("submit", help="send a job to a running engine")
    submit.add_argument("url", metavar="URL")
    submit.add_argument("--socket", help="socket of the running engine")
    _job_options(submit)
    status = sub.add_parser("status", help="processes, memory, jobs and connections of an engine")
    status.add_argument("--socket")
    status.add_argument("--json", action="store_true", help="print JSON")
    diag = sub.add_parser("diagnose", help="where the time goes, cold then warm")
    diag.add_argument("url", metavar="URL")
    # listed for --help; main() hands "bench ..." to engine.tools.bench, which parses its own options
    sub.add_parser("bench", help="side-by-side benchmark against other methods", add_help=False)
    return ap


def _progress_printer(enabled: bool):
    def show(url, frames, batch):
        if enabled:
            sys.stderr.write(f"\r  {frames}/{batch.frames_total or '?'} frames  "
                             f"{batch.bytes_done / 1e6:.1f}/{batch.bytes_total / 1e6:.1f} MB  "
                             f"{url[-50:]}")
            sys.stderr.flush()
    return show


def run_jobs(client, urls, args) -> int:
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    show = _progress_printer(progress and not args.quiet)
    reports, failed = [], 0
    for url in urls:
        report = None
        done = 0
        for item in client.submit(url, processor=args.processor, stream=progress,
                                  **Selection.of(**options_of(args)).to_dict()):
            if hasattr(item, "frame_numbers"):
                done += len(item.frame_numbers)
                show(url, done, item)
            else:
                report = item
        if progress and not args.quiet:
            sys.stderr.write("\r" + " " * 90 + "\r")
        reports.append(report.to_dict())
        if not report.ok:
            failed += 1
            print(f"error: {report.error}", file=sys.stderr)
        if not args.quiet:
            print(summary(report))
            first = report.results[:3]
            if first:
                print("  first results: " + "; ".join(
                    f"#{r['frame_number']} {json.dumps(r['result'])}" for r in first))
    _write_json(args.json, reports, single=len(urls) == 1)
    return 1 if failed else 0


def cmd_run(args) -> int:
    from engine.api import Engine
    if args.demo:
        from engine.demo import run_demo
        return run_demo(args, run_jobs)
    if not args.urls:
        from engine.serve import serve
        return serve(args)
    with Engine(processor=args.processor, device=args.device, cluster=args.cluster) as eng:
        return run_jobs(eng, args.urls, args)


def cmd_submit(args) -> int:
    from engine.api import Engine
    with Engine.connect(args.socket) as client:
        return run_jobs(client, [args.url], args)


def cmd_status(args) -> int:
    from engine.api import Engine
    with Engine.connect(args.socket) as client:
        st = client.status()
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    if "engines" in st:     # an engine serving over a cluster
        from engine.cluster.server import format_status
        print(format_status(st))
        return 0
    print(f"{'role':<12}{'pid':>8}  {'state':<10}{'cpu%':>6}{'rss MB':>9}{'fds':>6}"
          f"{'threads':>8}{'restarts':>9}  last restart cause")
    for p in st["processes"]:
        print(f"{p['role']:<12}{p['pid'] or '-':>8}  {p['state']:<10}"
              f"{'-' if p['cpu_percent'] is None else p['cpu_percent']:>6}"
              f"{'-' if p['rss_mb'] is None else p['rss_mb']:>9}"
              f"{'-' if p['open_files'] is None else p['open_files']:>6}"
              f"{'-' if p['threads'] is None else p['threads']:>8}{p['restarts']:>9}  "
              f"{p['last_restart_cause'] or ''}")
    shm = st["shared_memory"]
    print(f"shared memory: {shm['segments']} segments, {shm['bytes'] / 1e6:.1f} MB")
    print(f"jobs in flight: {len(st['jobs_in_flight'])}")
    for j in st["jobs_in_flight"]:
        print(f"  {j['url']}  {j.get('phase', '')}  {j['age_s']} s  {j['frames_done']} frames  "
              f"{j['bytes']} bytes")
    conns = st["connections"]
    print("connections: " + (", ".join(f"{h} x{n}" for h, n in conns.items()) or "none"))
    return 0


def cmd_diagnose(args) -> int:
    from engine.tools.diagnose import diagnose
    return diagnose(args.url)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:   # bench parses its own options (argparse REMAINDER drops --x)
        from engine.tools.bench import main as bench_main
        return bench_main(argv[1:])
    ap = parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    quiet = getattr(args, "quiet", False) or args.command in ("status",)
    level = "WARNING" if quiet else os.environ.get("ENGINE_LOG_LEVEL", "WARNING").upper()
    os.environ.setdefault("ENGINE_LOG_LEVEL", level)
    logging.basicConfig(level=level, format="%(message)s")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        if getattr(args, "device", None):
            check_device(args.device)
        if hasattr(args, "every"):
            Selection.of(**options_of(args))     # a bad selection ends here, before any work
        Config.from_env()
        return {"run": cmd_run, "submit": cmd_submit, "status": cmd_status,
                "diagnose": cmd_diagnose}[args.command](args)
    except (EngineError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
