"""What every contender measures with: a clock of milestones, the CPU and memory of a
process tree, and a measurement made from an engine's report or a decoding worker's run.

CPU is user+sys of the measured process tree over the timed part; memory is the peak of
the tree's summed RSS (shared memory counted once per process that maps it) and summed PSS
(shared pages split between the processes mapping them), sampled every few ticks.
"""
from __future__ import annotations

import os
import threading
import time


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


def decoded(clock: Clock, frames: int, meter: TreeMeter, error: str | None, **fields) -> dict:
    """A decoding worker's measurement; ``error`` is None when it worked."""
    out = {"ok": error is None, "error": error, "t": clock.t, "wall_s": clock.t["total"],
           "frames": frames, **fields}
    out.update(meter.stop())
    return out


def report_fields(report, wall_s: float) -> dict:
    r = report.to_dict()
    return {"ok": r["ok"], "error": r["error"], "t": dict(r["timings_s"]), "wall_s": round(wall_s, 4),
            "frames": r["frames_processed"], "bytes": r["fetch"].get("bytes"),
            "http_version": r["fetch"].get("http_version"),
            "conns_new": r["fetch"].get("connections_new"),
            "conns_reused": r["fetch"].get("connections_reused"),
            "ranges": r["fetch"].get("ranges"), "decoder": r.get("decoder"),
            "frames_decoded": r.get("frames_decoded"),
            "video": r.get("video")}
