"""The miner's HTTP face: ``POST /challenge`` (the validator's) and ``GET /health``.

Run it::

    uvicorn examples.turbovision_miner.server:app --port 8000

Environment:

* ``MINER_PREWARM``: CDN origins to open pooled connections to at start, comma separated;
* ``MINER_DEADLINE_S``: the longest a challenge may take before it is answered empty
  (default 25: the validator waits 30 s, and a late answer scores like an error);
* ``MINER_VERIFIER``: ``module:function`` checking each challenge's request (signing);
  unset, nothing is checked;
* ``TURBOVISION_MODEL``: the model (see ``spotter``); ``ENGINE_*``: the engine's settings.

One uvicorn worker: the engine inside it already runs jobs side by side, and each more
worker would start an engine of its own (its processes, its model, its memory).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import importlib
import inspect
import io
import logging
import os
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response

from engine import AsyncEngine, EngineError
from examples.turbovision_miner import spotter
from examples.turbovision_miner.models import ChallengeRequest, ChallengeResponse, Prediction

log = logging.getLogger("turbovision_miner")
ERROR_HEADER = "X-Miner-Error"       # why an answer is empty: the body stays the validator's


def deadline_s() -> float:
    return float(os.environ.get("MINER_DEADLINE_S", "25"))


def prewarm_origins() -> list[str]:
    return [o.strip() for o in os.environ.get("MINER_PREWARM", "").split(",") if o.strip()]


@asynccontextmanager
async def lifespan(app: FastAPI):
    if not logging.getLogger().handlers:    # uvicorn configures only its own loggers
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = await AsyncEngine(processor=spotter.VIDEO)
    try:
        if prewarm_origins():
            try:
                await engine.prewarm(prewarm_origins())
            except EngineError as exc:      # a CDN down at start must not stop the miner
                log.warning("prewarm %s failed: %s", prewarm_origins(), exc)
        app.state.engine = engine
        yield
    finally:
        await engine.close()


app = FastAPI(lifespan=lifespan)


# ---------------------------------------------------------------------------------------
# Request signing: the place for the subnet's verification
# ---------------------------------------------------------------------------------------
async def verify_request(request: Request) -> None:
    """Off by default. A miner puts the subnet's check here: ``MINER_VERIFIER`` names a
    function taking the ``Request`` (sync or async; ``await request.body()`` gives the
    signed bytes) that raises ``fastapi.HTTPException(401)`` when the signature is
    wrong. Or replace this dependency: ``app.dependency_overrides[verify_request]``."""
    spec = os.environ.get("MINER_VERIFIER", "").strip()
    if not spec:
        return
    module_name, _, attr = spec.partition(":")
    result = getattr(importlib.import_module(module_name), attr)(request)
    if inspect.isawaitable(result):
        await result


# ---------------------------------------------------------------------------------------
# The three kinds of challenge
# ---------------------------------------------------------------------------------------
async def video_items(engine, url: str) -> list[dict]:
    report = await engine.process(url, processor=spotter.VIDEO, fps=spotter.VALIDATOR_FPS)
    return report.video_result["items"]


async def image_items(engine, url: str) -> list[dict]:
    report = await engine.process(url, processor=spotter.VIDEO)
    return report.video_result["items"]


def decode_picture(data: str):
    """A base64 PNG or JPEG as an RGB uint8 array, decoded in memory."""
    import av
    try:
        raw = base64.b64decode(data, validate=True)
        with av.open(io.BytesIO(raw)) as container:
            return next(container.decode(video=0)).to_ndarray(format="rgb24")
    except (binascii.Error, av.FFmpegError, StopIteration, ValueError) as exc:
        raise EngineError(f"inline picture: not a PNG or JPEG ({exc})") from None


def local_features(data: str) -> list[float]:
    import torch
    frames = torch.from_numpy(decode_picture(data))[None]
    return spotter.features_of(spotter.local_model(), frames)[0]


async def frame_features(engine, frame) -> list[float]:
    if (frame.url is None) == (frame.data is None):
        raise EngineError(f"frame {frame.frame_id}: give one of url and data")
    if frame.data is not None:
        return await asyncio.to_thread(local_features, frame.data)
    report = await engine.process(frame.url, processor=spotter.FEATURES)
    return report.results[0]["result"]["features"]


async def frames_items(engine, frames) -> tuple[list[dict], str | None]:
    """Every frame's features (URLs through the engine, all at once), then the model's
    temporal head on them in frame_id order. A frame that fails is left out, and said."""
    frames = sorted(frames, key=lambda f: f.frame_id)
    got = await asyncio.gather(*(frame_features(engine, f) for f in frames),
                               return_exceptions=True)
    failed = [f"frame {f.frame_id}: {g}" for f, g in zip(frames, got) if isinstance(g, Exception)]
    kept = [(f.frame_id, g) for f, g in zip(frames, got) if not isinstance(g, Exception)]
    items = await asyncio.to_thread(spotter.spot_features, [g for _, g in kept],
                                    [i for i, _ in kept]) if kept else []
    return items, "; ".join(failed) or None


async def answer(engine, challenge: ChallengeRequest) -> tuple[list[dict], str | None]:
    if challenge.video_url:
        return await video_items(engine, challenge.video_url), None
    if challenge.image_url:
        return await image_items(engine, challenge.image_url), None
    if challenge.frames:
        return await frames_items(engine, challenge.frames)
    return [], "the challenge has no video_url, image_url or frames"


# ---------------------------------------------------------------------------------------
# Bounded, and cancelled when the validator hangs up
# ---------------------------------------------------------------------------------------
async def hung_up(request: Request) -> None:
    """Returns when the client disconnects. The body is read already, so the server's
    next ASGI message is the disconnect (uvicorn cancels nothing by itself)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def bounded(work, request: Request) -> tuple[list[dict], str | None]:
    """The work's answer; an empty one with the cause if it fails or outlasts the
    deadline. Cancelled (its engine job with it) if the client hangs up first."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(hung_up(request))
    try:
        await asyncio.wait({job, gone}, timeout=deadline_s(),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (job, gone):
            task.cancel()
        await asyncio.gather(job, gone, return_exceptions=True)
    if gone.done() and not gone.cancelled():
        return [], "the client hung up: job cancelled"
    if job.cancelled():
        return [], f"no answer within {deadline_s():g} s (MINER_DEADLINE_S): job cancelled"
    if isinstance(job.exception(), EngineError):
        return [], f"{type(job.exception()).__name__}: {job.exception()}"
    if job.exception() is not None:
        log.error("challenge failed", exc_info=job.exception())
        return [], f"{type(job.exception()).__name__}: {job.exception()}"
    return job.result()


@app.post("/challenge", response_model=ChallengeResponse,
          dependencies=[Depends(verify_request)])
async def challenge(body: ChallengeRequest, request: Request,
                    response: Response) -> ChallengeResponse:
    started = time.perf_counter()
    items, error = await bounded(answer(request.app.state.engine, body), request)
    if error is not None:
        log.warning("challenge %s: %s", body.challenge_id, error)
        response.headers[ERROR_HEADER] = " ".join(error.encode("ascii", "replace").decode().split())[:500]
    return ChallengeResponse(challenge_id=body.challenge_id,
                             prediction=Prediction(items=items),
                             processing_time=round(time.perf_counter() - started, 4))


@app.get("/health")
async def health(request: Request) -> dict:
    status = await request.app.state.engine.status()
    return {"ok": True, "jobs_in_flight": len(status["jobs_in_flight"]),
            "shared_memory": status["shared_memory"]}
