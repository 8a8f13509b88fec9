"""A turbovision video challenge, side by side: the reference miner's way against the
example miner on the engine, both answering ``POST /challenge`` from a uvicorn of their
own with the same stand-in model, over the same emulated CDN link.

* ``reference``: the whole file with ``httpx.AsyncClient(timeout=60)`` into a temp file,
  then OpenCV frame by frame, frames counted at 25 fps, the model on each;
* ``engine``: ``examples.turbovision_miner`` (pre-warmed to the CDN, the ``fps=25``
  selection, ranges decoded as they arrive).

Each contender answers one small challenge off the clock first; then rounds, the order
alternating, until ``--runs`` each or ``--budget`` seconds. The figure is the time from
the POST to the answer, as the validator's client sees it. Run from a checkout::

    python -m engine.tools.turbovision_bench            # seed profile, the 720p sn44 clip
"""
import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from engine.tools.bench.context import REPO, Context, options_parser

CONTENDERS = ("reference", "engine")


# ---------------------------------------------------------------------------------------
# The reference miner (its download and decode), with the example's stand-in model
# ---------------------------------------------------------------------------------------
def reference_items(path: str) -> list[dict]:
    """OpenCV frame by frame; a frame whose 25 fps number is new goes to the model."""
    import cv2
    import torch
    from examples.turbovision_miner import spotter
    device = os.environ.get("ENGINE_DEVICE", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = spotter.load_model(torch.device(device))
    cap = cv2.VideoCapture(path)
    fps = cap.get(cv2.CAP_PROP_FPS) or None
    feats, frames, n = [], [], 0
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            k = spotter.at_25fps(n, fps)
            n += 1
            if frames and frames[-1] == k:
                continue
            rgb = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)[None]).to(device)
            feats.append(model.features(rgb).cpu())
            frames.append(k)
    finally:
        cap.release()
    return spotter.clean_items(model.spot(torch.cat(feats), frames)) if frames else []


def reference_app():
    """``uvicorn --factory engine.tools.turbovision_bench:reference_app``."""
    from fastapi import FastAPI
    from examples.turbovision_miner.models import (ChallengeRequest, ChallengeResponse,
                                                   Prediction)
    app = FastAPI()
    # (no ``from __future__ import annotations`` in this module: FastAPI reads the
    # handler's annotations, and these classes are local to this function)

    @app.post("/challenge", response_model=ChallengeResponse)
    async def challenge(body: ChallengeRequest) -> ChallengeResponse:
        started = time.perf_counter()
        with tempfile.NamedTemporaryFile(suffix=".mp4") as fh:
            async with httpx.AsyncClient(timeout=60) as client:
                async with client.stream("GET", body.video_url) as r:
                    r.raise_for_status()
                    async for chunk in r.aiter_bytes():
                        fh.write(chunk)
            fh.flush()
            items = await asyncio.to_thread(reference_items, fh.name)
        return ChallengeResponse(challenge_id=body.challenge_id, prediction=Prediction(items=items),
                                 processing_time=round(time.perf_counter() - started, 4))

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    return app


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------
class Server:
    """One contender's uvicorn on a free port, in a process group of its own."""

    def __init__(self, name: str, env: dict, log):
        from engine.demo.nginx import free_port
        self.name, self.port = name, free_port()
        target = (["engine.tools.turbovision_bench:reference_app", "--factory"]
                  if name == "reference" else ["examples.turbovision_miner.server:app"])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *target, "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: the server exited ({self.proc.returncode})")
            try:
                if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: not ready after {timeout:g} s")

    def stop(self) -> None:
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)    # the engine's lifespan stops it
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def challenge(server: Server, url: str, timeout: float) -> dict:
    """POST one challenge; the time to the answer, and what it said."""
    async def go():
        async with httpx.AsyncClient(timeout=timeout) as client:
            t = time.perf_counter()
            r = await client.post(server.base + "/challenge",
                                  json={"challenge_id": "bench", "video_url": url})
            return time.perf_counter() - t, r
    elapsed, r = asyncio.run(go())
    body = r.json() if r.status_code == 200 else {}
    return {"s": elapsed, "status": r.status_code, "error": r.headers.get("x-miner-error"),
            "items": len(body.get("prediction", {}).get("items", []))}


def measure(ctx: Context, servers: list[Server], a) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {s.name: [] for s in servers}
    for s in servers:
        warm = challenge(s, ctx.emu.url("/warmup.mp4"), a.timeout)
        print(f"{s.name}: warm-up {warm}", file=sys.stderr)
    for i in range(a.runs):
        if time.monotonic() - ctx.started > a.budget:
            break
        for s in servers if i % 2 == 0 else servers[::-1]:
            runs[s.name].append(challenge(s, ctx.url, a.timeout))
            print(f"{s.name} run {i + 1}: {runs[s.name][-1]}", file=sys.stderr)
    return runs


def render(runs: dict[str, list[dict]], ctx: Context) -> str:
    lines = [f"{ctx.profile_line}; clip {ctx.video.name} ({ctx.size / 1e6:.1f} MB)",
             f"machine: {ctx.machine['cpu']}, {ctx.machine['cores_logical']} cores, "
             f"load {ctx.load}",
             "| miner | POST to answer, median (s) | runs (s) | items | errors |",
             "|---|---|---|---|---|"]
    for name, rs in runs.items():
        ok = [r["s"] for r in rs]
        med = f"{statistics.median(ok):.2f}" if ok else "-"
        errors = sum(1 for r in rs if r["status"] != 200 or r["error"])
        lines.append(f"| {name} | {med} | {', '.join(f'{s:.2f}' for s in ok)} | "
                     f"{', '.join(str(r['items']) for r in rs)} | {errors} |")
    return "\n".join(lines)


def parse_args(argv) -> argparse.Namespace:
    ap = options_parser("python -m engine.tools.turbovision_bench", __doc__.split("\n\n")[0],
                        runs=3, timeout=120.0, budget=600.0)
    a = ap.parse_args(argv)
    a.processor = "examples.turbovision_miner.spotter:video_spotter"
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    with Context(a, "tools.turbovision_bench", argv) as ctx, \
            tempfile.TemporaryFile("w+") as log:
        env = dict(ctx.env, MINER_PREWARM=ctx.origin, ENGINE_LOG_LEVEL="WARNING",
                   MINER_DEADLINE_S=str(a.timeout),     # measure the time, not the deadline
                   **({"ENGINE_DEVICE": a.device} if a.device else {}))
        servers = [Server(name, env, log) for name in CONTENDERS]
        try:
            for s in servers:
                s.wait_ready(a.timeout)
            runs = measure(ctx, servers, a)
        finally:
            for s in servers:
                s.stop()
            log.seek(0)
            sys.stderr.write(log.read())
        print(f"$ python -m engine.tools.turbovision_bench {' '.join(argv)}".rstrip())
        print(render(runs, ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
