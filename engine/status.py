"""The supervisor's view of itself, from psutil: what ``python -m engine status`` shows."""
from __future__ import annotations

import os
import time
from collections import Counter

import psutil

from engine.shm.block import SHM_DIR
from engine.shm.sweep import owned_blocks

_procs: dict[int, psutil.Process] = {}


def _proc(pid: int) -> psutil.Process | None:
    p = _procs.get(pid)
    if p is None:
        try:
            p = _procs[pid] = psutil.Process(pid)
            p.cpu_percent(None)   # first call primes the CPU counter
        except psutil.Error:
            return None
    return p


def process_info(role: str, pid: int | None, restarts: int = 0, causes=()) -> dict:
    info = {"role": role, "pid": pid, "state": "down", "cpu_percent": None, "rss_mb": None,
            "open_files": None, "threads": None, "restarts": restarts,
            "last_restart_cause": causes[-1] if causes else None}
    p = _proc(pid) if pid else None
    if p is None:
        return info
    try:
        with p.oneshot():
            info.update(state=p.status(), cpu_percent=p.cpu_percent(None),
                        rss_mb=round(p.memory_info().rss / 2**20, 1),
                        open_files=p.num_fds(), threads=p.num_threads())
    except psutil.Error:
        pass
    return info


def snapshot(sup) -> dict:
    me = os.getpid()
    live = {me} | {w.pid for w in sup.workers if w.pid}
    for pid in list(_procs):       # restarted workers: forget the dead ones
        if pid not in live:
            del _procs[pid]
    procs = [process_info("supervisor", me)]
    for w in sup.workers:
        procs.append(process_info(w.name, w.pid if w.alive else None, w.restarts, w.causes))
        procs[-1]["lifecycle"] = w.state.value   # the supervisor's view: starting, ready...
    blocks = owned_blocks(me)
    shm_bytes = 0
    for name in blocks:
        try:
            shm_bytes += os.stat(os.path.join(SHM_DIR, name)).st_blocks * 512
        except FileNotFoundError:
            pass
    conns = Counter()
    for w in sup.workers:
        p = _proc(w.pid) if w.alive else None
        if p is None:
            continue
        try:
            for c in p.net_connections(kind="tcp"):
                if c.raddr and c.status == psutil.CONN_ESTABLISHED:
                    conns[f"{c.raddr.ip}:{c.raddr.port}"] += 1
        except psutil.Error:
            pass
    jobs = [{"url": j.url, "phase": j.phase.value,
             "age_s": round(time.monotonic() - j.submitted, 2), "frames_done": len(j.results),
             "bytes": j.fetch.bytes}
            for j in sup.pipeline.live]
    return {"processes": procs, "shared_memory": {"segments": len(blocks), "bytes": shm_bytes},
            "jobs_in_flight": jobs, "connections": dict(conns)}
