"""``run --demo``: the whole pipeline on a local CDN that behaves like a distant one.

nginx serves a generated 750-frame 1280x720 H.264 clip over HTTPS (HTTP/2, Range);
the CDN emulator in front of it adds the seed CDN's latency, slow new connections and
bandwidth caps. Everything is local, so it works offline.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from engine.errors import EngineError


def local_cdn(clips: dict[str, Path], profile: str):
    """Start nginx over the clips and the emulator in front; returns (cdn, emulator, tmp)."""
    from engine.demo.emulator import CdnEmulator
    from engine.demo.nginx import NginxCDN

    if not shutil.which("nginx") and not os.path.exists("/usr/sbin/nginx"):
        raise EngineError("nginx is not installed (the README's set-up command installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="engine-demo-"))
    root = tmp / "www"
    root.mkdir()
    for name, path in clips.items():
        os.symlink(path, root / name)
    try:
        cdn = NginxCDN(root, tmp / "nginx").start()
    except RuntimeError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EngineError(str(exc)) from None
    emulator = CdnEmulator("127.0.0.1", cdn.port, profile).start()
    return cdn, emulator, tmp


def run_demo(args, run_jobs) -> int:
    """The demo: the bundled CDN serving the sample clip, one engine, ``run_jobs`` (the
    CLI's, handed in so that the demo does not import the CLI) on it."""
    from engine.api import Engine
    from engine.demo.emulator import profile as get_profile
    from engine.demo.clips import cached_clip

    try:
        prof = get_profile(args.profile)
    except ValueError as exc:
        raise EngineError(str(exc)) from None
    print("preparing the sample clip (generated once, then cached) ...", file=sys.stderr)
    clip = cached_clip("sn44")
    cdn, emulator, tmp = local_cdn({"sn44.mp4": clip}, prof.name)
    os.environ["SSL_CERT_FILE"] = str(cdn.ca_file)   # the demo CDN's own certificate
    try:
        url = emulator.url("/sn44.mp4")
        origin = emulator.url("/")
        print(f"local CDN {url} with profile {prof.name}: RTT {prof.rtt_s * 1000:.0f} ms, "
              f"+{prof.new_conn_s * 1000:.0f} ms per new connection, "
              f"{_rate(prof.per_conn_bps)} per connection, {_rate(prof.total_bps)} in total",
              file=sys.stderr)
        with Engine(processor=args.processor, device=args.device) as eng:
            opened = eng.prewarm([origin])
            print(f"engine up: prewarmed {opened} connections to {origin}", file=sys.stderr)
            return run_jobs(eng, [url], args)
    finally:
        emulator.stop()
        cdn.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _rate(bps) -> str:
    return "unlimited" if not bps else f"{bps / 1e6:g} MB/s"
