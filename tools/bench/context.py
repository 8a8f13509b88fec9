"""Where the contenders run (``Context``), the options every mode shares, and the machine
the figures come from.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

from engine.tools.bench.tables import rate

REPO = Path(__file__).resolve().parents[2]


class Context:
    """Where the contenders run: the clip served as ``bench.mp4`` by the local CDN (nginx
    behind the emulator with the profile), SSL_CERT_FILE naming the CDN's CA while it is up
    and given back after, the environment and arguments of subprocess workers, and the warm
    engines once contenders start them (``eng``: the one with the default settings). A
    ``with`` block holds the CDN up."""

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
                             f"{rate(p.per_conn_bps)} per connection, {rate(p.total_bps)} in total")
        self.eng = self.warm_startup = None
        self.engines: dict[tuple, object] = {}

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
        for eng in self.engines.values():
            eng.close()
        self.emu.stop()
        self.cdn.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.old_ca is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = self.old_ca
        sweep()

    def engine(self, **settings):
        """The warm engine with these settings (None until ``start_engine`` made it)."""
        return self.engines.get(tuple(sorted(settings.items())))

    def start_engine(self, **settings) -> str | None:
        from engine.api import Engine
        if self.engine(**settings) is not None:
            return None
        print(f"starting a warm engine {settings or ''}...", file=sys.stderr)
        t = time.perf_counter()
        eng = Engine(processor=self.a.processor, device=self.a.device, **settings)
        self.engines[tuple(sorted(settings.items()))] = eng
        eng.prewarm([self.origin])
        warm = eng.report(self.emu.url("/warmup.mp4"))
        if not settings:
            self.eng, self.warm_startup = eng, time.perf_counter() - t
        return None if warm.ok else f"engine-warm: the warm-up job failed: {warm.error}"


def options_parser(prog: str, description: str, runs: int, timeout: float, budget: float):
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


def parse_options(ap, argv, known, default) -> argparse.Namespace:
    """Parse, then check the contender list (``default`` if none) and the run count."""
    a = ap.parse_args(argv)
    a.contenders = [c.strip() for c in (a.contenders or ",".join(default)).split(",") if c.strip()]
    bad = [c for c in a.contenders if c not in known]
    if bad or not a.contenders:
        ap.error(f"unknown contender(s) {bad}; known: {', '.join(known)}")
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    return a


def sweep() -> None:
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
