"""Soak: serve mode for N minutes under mixed traffic and random worker kills (not in CI).

    python -m engine.tools.soak --minutes 10 [--clients 4] [--kill-every 20] [--device cpu]

Starts a local nginx HTTPS CDN with the cached clips and ``python -m engine run`` on a
socket, then keeps ``--clients`` clients busy with good jobs (small clips, and a partial
720p one), bad ones (404, an HTML page, a bad scheme) and jobs whose client disconnects
after the first batch, while a killer SIGKILLs a random worker every ``--kill-every``
seconds. Every minute it prints one row: jobs done, failures by kind, restarts, and the
supervisor's RSS, open fds, threads and the engine's segments in /dev/shm; at the end, a
summary and whether anything was left behind. Exit 1 when a good job failed for any
reason other than a kill, a bad one did not fail, or anything was left behind.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from engine import Engine, EngineError
from engine.shm.sweep import owned_blocks
from engine.demo.clips import cached_clip
from engine.demo.nginx import NginxCDN

GOOD = [("small.mp4", None, 50), ("small-moov-end.mp4", None, 50), ("sn44.mp4", 40, 40),
        ("sn44-moov-end.mp4", 40, 40)]
BAD = ["missing.mp4", "page.html", "ftp://127.0.0.1/x.mp4"]


class Soak:
    def __init__(self, args, cdn: NginxCDN, sock: str, proc: subprocess.Popen):
        self.args, self.cdn, self.sock, self.proc = args, cdn, sock, proc
        self.counts = collections.Counter()
        self.lock = threading.Lock()
        self.kills = 0
        self.stop = threading.Event()
        self.killed_at = 0.0

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            try:
                with Engine.connect(self.sock) as c:
                    for _ in range(20):
                        if self.stop.is_set():
                            return
                        self.one_job(c, rng)
            except EngineError as exc:
                self.count(f"client error: {type(exc).__name__}")
                print(f"  client error: {exc}", flush=True)
                time.sleep(0.5)

    def one_job(self, c, rng) -> None:
        kind = rng.choices(["good", "bad", "drop"], [6, 2, 2])[0]
        if kind == "good":
            name, max_frames, frames = rng.choice(GOOD)
            started = time.monotonic()
            report = c.report(self.cdn.url(name), max_frames=max_frames)
            if report.ok and report.frames_processed == frames:
                self.count("good ok")
            elif not report.ok and self.killed_at >= started - 1:
                self.count(f"good failed by a kill: {report.error_kind}")
                print(f"  failed by a kill: {report.error}", flush=True)
            else:
                self.count("UNEXPECTED good failure")
                print(f"  unexpected: {report.error or report.frames_processed}", flush=True)
        elif kind == "bad":
            url = rng.choice(BAD)
            report = c.report(url if "://" in url else self.cdn.url(url))
            self.count(f"bad -> {report.error_kind}" if not report.ok else "UNEXPECTED bad ok")
        else:
            started = time.monotonic()
            try:
                with Engine.connect(self.sock) as other:
                    for _ in other.stream(self.cdn.url("sn44.mp4"), max_frames=60):
                        break
                self.count("dropped mid-stream")
            except EngineError as exc:
                if self.killed_at >= started - 1:
                    self.count(f"drop failed by a kill: {type(exc).__name__}")
                else:
                    self.count("UNEXPECTED drop failure")
                    print(f"  unexpected: {exc}", flush=True)

    def killer(self) -> None:
        rng = random.Random(1)
        while not self.stop.wait(self.args.kill_every):
            kids = psutil.Process(self.proc.pid).children()
            if kids:
                victim = rng.choice(kids)
                try:
                    self.killed_at = time.monotonic()
                    victim.kill()
                    self.kills += 1
                except psutil.Error:
                    pass

    def row(self, minute: int) -> str:
        sup = psutil.Process(self.proc.pid)
        with sup.oneshot():
            rss, fds, threads = sup.memory_info().rss / 2**20, sup.num_fds(), sup.num_threads()
        try:
            with Engine.connect(self.sock) as c:
                restarts = sum(p["restarts"] for p in c.status()["processes"])
        except EngineError:
            restarts = -1
        with self.lock:
            counts = dict(self.counts)
        done = sum(counts.values())
        fails = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "good ok")
        return (f"{minute:>4} {done:>6} {counts.get('good ok', 0):>6} {self.kills:>5} "
                f"{restarts:>8} {rss:>7.1f} {fds:>5} {threads:>7} "
                f"{len(owned_blocks(self.proc.pid)):>5}  {fails}")


def _soak(args, cdn, sock: str, proc, log_name: str) -> int:
    """Clients and a killer for ``--minutes``, a row a minute; then the engine stopped:
    0 when it exited cleanly, left no segment and no job failed unexpectedly."""
    soak = Soak(args, cdn, sock, proc)
    print(f"soak: {args.minutes:g} min, {args.clients} clients, a worker killed every "
          f"{args.kill_every:g} s; engine pid {proc.pid}, log {log_name}")
    print(f"{'min':>4} {'jobs':>6} {'ok':>6} {'kills':>5} {'restarts':>8} {'rss MB':>7} "
          f"{'fds':>5} {'threads':>7} {'segs':>5}  failures by kind")
    print(soak.row(0), flush=True)
    threads = [threading.Thread(target=soak.client, args=(i,), daemon=True)
               for i in range(args.clients)]
    threads.append(threading.Thread(target=soak.killer, daemon=True))
    for t in threads:
        t.start()
    start = time.monotonic()
    minute = 0
    while time.monotonic() - start < args.minutes * 60:
        if proc.poll() is not None:
            print(f"error: the engine exited with {proc.returncode} (log: {log_name})")
            return 1
        time.sleep(min(1.0, max(0.0, (minute + 1) * 60 - (time.monotonic() - start))))
        if time.monotonic() - start >= (minute + 1) * 60:
            minute += 1
            print(soak.row(minute), flush=True)
    soak.stop.set()
    for t in threads:
        t.join(90)
    print(soak.row(minute + 1 if time.monotonic() - start > minute * 60 + 1 else minute))
    unexpected = {k: v for k, v in soak.counts.items() if k.startswith("UNEXPECTED")}
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(15)
    left = owned_blocks(proc.pid)
    print(f"engine exit {rc}; segments left {left}; unexpected {unexpected or 'none'}")
    return 0 if rc == 0 and not left and not unexpected else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.tools.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--kill-every", type=float, default=20.0, help="seconds between kills")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="engine-soak-"))
    root = work / "root"
    root.mkdir()
    for name in ("small", "small-moov-end", "sn44", "sn44-moov-end"):
        os.symlink(cached_clip(name), root / f"{name}.mp4")
    (root / "page.html").write_text("<html>not a video</html>\n")
    cdn = NginxCDN(root, work / "nginx").start()
    os.environ["SSL_CERT_FILE"] = str(cdn.ca_file)
    sock = str(work / "engine.sock")
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "engine", "run", "--socket", sock,
                             "--processor", "engine.processors:stats"],
                            env=dict(os.environ, ENGINE_DEVICE=args.device,
                                     ENGINE_LOG_LEVEL="WARNING"), stdout=log, stderr=log)
    code = 1
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: the engine did not start (log: {log.name})")
            time.sleep(0.1)
        time.sleep(3)
        code = _soak(args, cdn, sock, proc, log.name)
    finally:
        if proc.poll() is None:
            proc.kill()
        cdn.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
