"""What the runner measures: a ``Contender`` is prepared once off the clock and run once a
round; the warm engine runs in this process, the others as subprocess workers, and the
floors (``limit``, ``link``) are computed from a local decode or the network profile.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from engine.tools.bench.context import REPO, Context, sweep
from engine.tools.bench.measure import TreeMeter, report_fields
from engine.tools.bench.workers import RESULT_TAG


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
        kill_group(proc)
        out, err = proc.communicate()
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "stderr": err[-2000:]}
    finally:
        kill_group(proc)                       # whatever it left behind (an engine, say)
        sweep()
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


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


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
        out = report_fields(report, time.perf_counter() - t0)
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
                kill_group(proc)
            out_path = os.path.join(d, "out.mp4")
            got = os.path.getsize(out_path) if os.path.exists(out_path) else 0
        ok = proc.returncode == 0 and got == ctx.size
        return {"ok": ok, "error": None if ok else
                f"aria2c exited {proc.returncode}, {got} of {ctx.size} bytes: {out.strip()[-300:]}",
                "t": {"download_done": round(wall, 4)}, "wall_s": round(wall, 4), "bytes": got,
                "http_version": "HTTP/1.1"}


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
