"""The turbovision miner example: a real uvicorn serving the app, a real engine inside
it, the real nginx CDN, real clips and pictures; answers validated against the models.

What is checked:

* a 50 fps video: items on the 25 fps count, exactly the stand-in's answer on a plain
  PyAV decode of the frames the 25 fps selection picks;
* a PNG and a JPEG ``image_url``: decoded by the engine as one-frame videos;
* ``frames``: URLs through the engine, base64 decoded in memory, used in frame_id order
  whatever the order sent; a bad frame is left out and named;
* a failed job (404, an HTML page, nothing to do) answers at once, well-formed, the cause
  in ``X-Miner-Error``; a request without the test's signature is refused;
* a client that hangs up while its job runs: the job is cancelled, nothing of it is left,
  the next challenge is answered in full;
* inside a private 64 MB /dev/shm (Docker's default), a 720p challenge is answered;
* after the server stops, none of the engine's processes or segments remain.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import av
import httpx
import numpy as np
import psutil
import pytest
import torch
from fastapi import HTTPException

from engine.demo.clips import make_clip
from engine.demo.nginx import free_port
from engine.selection import Selection, pick
from engine.shm.sweep import owned_blocks
from examples.turbovision_miner import spotter
from examples.turbovision_miner.models import ChallengeResponse
from tests.conftest import BOUND_S, gone, in_small_shm, needs_root, run, wait_for

ROOT = Path(__file__).resolve().parents[1]
SIGNATURE = {"X-Test-Signature": "ok"}


def require_test_signature(request) -> None:
    """The tests' stand-in for the subnet's verification (``MINER_VERIFIER``)."""
    if request.headers.get("x-test-signature") != "ok":
        raise HTTPException(status_code=401, detail="bad signature")


# ------------------------------------------------------------------------- the server
class Miner:
    """``uvicorn examples.turbovision_miner.server:app`` in a subprocess of this test."""

    def __init__(self, log: Path, prefix=(), **env):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        full = dict(os.environ, ENGINE_DEVICE="cpu", ENGINE_FETCHERS="1",
                    ENGINE_DECODERS="1", ENGINE_LOG_LEVEL="WARNING", **env)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "uvicorn", "examples.turbovision_miner.server:app",
             "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=full, stdout=log.open("w"), stderr=subprocess.STDOUT)
        wait_for(self._ready, 120, "the miner to answer /health")
        self.tree = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(
            recursive=True)
        self.supervisor = next(p.pid for p in self.tree
                               if "engine.supervisor" in " ".join(p.cmdline()))

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the miner exited: {self.log()}")
        try:
            return httpx.get(self.base + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text()

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=30).json()

    def stop(self) -> None:
        """SIGINT as a user's Ctrl-C: the app's lifespan stops the engine."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the miner did not stop on SIGINT: {self.log()}")
        wait_for(lambda: all(gone(p) for p in self.tree), 20, "the engine's processes to exit")
        assert owned_blocks(self.supervisor) == [], "segments left after the miner stopped"


@pytest.fixture(scope="module")
def miner(cdn, tmp_path_factory):
    m = Miner(tmp_path_factory.mktemp("miner") / "uvicorn.log", MINER_PREWARM=cdn.url("/"),
              MINER_VERIFIER=f"{__name__}:require_test_signature", MINER_DEADLINE_S="120")
    try:
        yield m
    finally:
        m.stop()


async def post(miner: Miner, challenge: dict, headers=SIGNATURE) -> tuple[ChallengeResponse,
                                                                            str | None]:
    async with httpx.AsyncClient(timeout=BOUND_S) as client:
        r = await client.post(miner.base + "/challenge", json=challenge, headers=headers)
    assert r.status_code == 200, r.text
    return ChallengeResponse.model_validate(r.json()), r.headers.get("x-miner-error")


# -------------------------------------------------------------------------- the media
def picture(path: Path, shade: int, bar: int) -> Path:
    """A 160x120 picture, PNG or JPEG by its suffix, unlike the others."""
    img = np.full((120, 160, 3), shade, np.uint8)
    img[:, bar:bar + 40] = (20, 200, 40)
    codec = "png" if path.suffix == ".png" else "mjpeg"
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream(codec, rate=1)
        s.width, s.height = 160, 120
        s.pix_fmt = "rgb24" if codec == "png" else "yuvj420p"
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        for packet in (*s.encode(frame), *s.encode(None)):
            c.mux(packet)
    return path


@pytest.fixture(scope="module")
def media(cdn, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tv")
    made = {"fifty": make_clip(tmp / "tv-fifty.mp4", frames=200, width=160, height=120, fps=50)}
    for i in range(6):
        made[f"p{i}"] = picture(tmp / f"tv-p{i}.{'png' if i % 2 else 'jpg'}", 30 * i, 20 * i)
    for path in made.values():
        (cdn.root / path.name).write_bytes(path.read_bytes())
    return made


def decoded(path: Path) -> tuple[list[np.ndarray], list[float]]:
    """Every frame and its time, decoding the whole file in order."""
    with av.open(str(path)) as c:
        pairs = [(f.to_ndarray(format="rgb24"), float(f.time)) for f in c.decode(video=0)]
    return [p for p, _ in pairs], [t - pairs[0][1] for _, t in pairs]


def stand_in_items(pictures: list[np.ndarray], frames: list[int], rounded=False) -> list[dict]:
    model = spotter.StandInSpotter()
    x = torch.from_numpy(np.stack(pictures))
    if rounded:
        return clean(spotter.clean_items(model.spot(torch.tensor(spotter.features_of(model, x)),
                                                    frames)))
    feats = model.features(x)
    return clean(spotter.clean_items(model.spot(feats, frames)))


def clean(items) -> list[tuple]:
    return [(i["frame"], i["action"], round(i["confidence"], 3)) for i in items]


def got(response: ChallengeResponse) -> list[tuple]:
    return clean(i.model_dump() for i in response.prediction.items)


# -------------------------------------------------------------------------- the tests
def test_video_items_on_the_25_fps_count(miner, cdn, media):
    pictures, times = decoded(media["fifty"])
    chosen = pick(Selection.of(fps=25.0), np.array(times))
    frames25 = [spotter.at_25fps(int(i), 50.0) for i in chosen]
    assert frames25 == list(range(len(pictures) // 2))       # source frame 2k is frame k
    want = stand_in_items([pictures[i] for i in chosen], frames25)
    response, error = run(post(miner, {"challenge_id": "v1", "video_url":
                                       cdn.url(media["fifty"].name)}))
    assert error is None and response.challenge_id == "v1"
    assert got(response) == want and len(want) == 2


@pytest.mark.parametrize("name", ["p1", "p2"])      # a PNG, a JPEG
def test_image_url_is_a_one_frame_video(miner, cdn, media, name):
    response, error = run(post(miner, {"challenge_id": "i", "image_url":
                                       cdn.url(media[name].name)}))
    assert error is None
    assert got(response) == stand_in_items(decoded(media[name])[0], [0])


def test_frames_urls_and_inline_in_frame_id_order(miner, cdn, media):
    ids = [0, 10, 60, 70, 120, 130]
    sent = []
    for i, frame_id in enumerate(ids):
        path = media[f"p{i}"]
        if i % 2:
            sent.append({"frame_id": frame_id, "url": cdn.url(path.name)})
        else:
            sent.append({"frame_id": frame_id, "data": base64.b64encode(path.read_bytes()).decode()})
    sent.append({"frame_id": 200, "data": "not base64!"})
    shuffled = [sent[k] for k in (3, 6, 0, 5, 1, 4, 2)]
    response, error = run(post(miner, {"challenge_id": "f", "frames": shuffled}))
    want = stand_in_items([decoded(media[f"p{i}"])[0][0] for i in range(6)], ids, rounded=True)
    assert got(response) == want and len(want) == 3
    assert error is not None and "frame 200" in error and "frame 0" not in error


@pytest.mark.parametrize("challenge, cause", [
    ({"video_url": "missing.mp4"}, "404"),
    ({"video_url": "page.html"}, "not a video"),
    ({"image_url": "missing.png"}, "404"),
    ({}, "no video_url"),
])
def test_a_failed_job_answers_empty_with_its_cause(miner, cdn, challenge, cause):
    challenge = {k: cdn.url(v) for k, v in challenge.items()}
    response, error = run(post(miner, {"challenge_id": "bad", **challenge}))
    assert response.prediction.items == [] and response.challenge_id == "bad"
    assert error is not None and cause in error, error
    assert cause in miner.log()


def test_a_request_without_the_signature_is_refused(miner, cdn, media):
    async def scenario():
        async with httpx.AsyncClient(timeout=BOUND_S) as client:
            return await client.post(miner.base + "/challenge", json={
                "challenge_id": "x", "video_url": cdn.url(media["fifty"].name)})
    assert run(scenario()).status_code == 401


def test_a_client_that_hangs_up_cancels_its_job(miner, cdn, media, slow_cdn):
    async def scenario():
        hanging = asyncio.create_task(post(miner, {"challenge_id": "gone",
                                                   "video_url": slow_cdn.url("/sn44.mp4")}))
        await asyncio.to_thread(wait_for, lambda: miner.health()["jobs_in_flight"] == 1,
                                60, "the job to be in flight")
        await asyncio.sleep(1.0)
        hanging.cancel()               # the client hangs up while bytes still arrive
        with contextlib.suppress(asyncio.CancelledError):
            await hanging
        await asyncio.to_thread(wait_for, lambda: miner.health()["jobs_in_flight"] == 0,
                                30, "the job to be cancelled")
        return await post(miner, {"challenge_id": "next",
                                  "video_url": cdn.url(media["fifty"].name)})
    response, error = run(scenario())
    assert "client hung up" in miner.log()
    leftover = [n for n in owned_blocks(miner.supervisor) if not n.endswith(".ring")]
    assert leftover == [], leftover
    assert error is None and len(response.prediction.items) == 2


@needs_root
def test_720p_challenge_in_a_64mb_dev_shm(cdn, sn44_clips, tmp_path):
    m = Miner(tmp_path / "uvicorn.log", prefix=in_small_shm("64m"), MINER_DEADLINE_S="120")
    try:
        response, error = run(post(m, {"challenge_id": "hd", "video_url": cdn.url("sn44.mp4")},
                                   headers={}))
    finally:
        m.stop()
    assert error is None, m.log()
    frames = [i.frame for i in response.prediction.items]
    assert len(frames) == 750 // 50 and all(0 <= f < 750 for f in frames)


def test_a_job_past_the_deadline_answers_empty_and_is_cancelled(cdn, slow_cdn, tmp_path):
    m = Miner(tmp_path / "uvicorn.log", MINER_DEADLINE_S="1")
    try:
        response, error = run(post(m, {"challenge_id": "late",
                                       "video_url": slow_cdn.url("/sn44.mp4")}, headers={}))
        assert response.prediction.items == [] and "MINER_DEADLINE_S" in error, error
        wait_for(lambda: m.health()["jobs_in_flight"] == 0, 30, "the late job to be cancelled")
    finally:
        m.stop()


# ------------------------------------------------------------------ the pure parts
def test_frame_numbers_count_at_25_fps():
    assert [spotter.at_25fps(n, 50.0) for n in (0, 1, 2, 3, 4)] == [0, 0, 1, 2, 2]
    assert [spotter.at_25fps(n, 25.0) for n in (0, 7)] == [0, 7]
    assert spotter.at_25fps(3, 12.5) == 6 and spotter.at_25fps(3, None) == 3


def test_model_output_is_made_valid():
    assert spotter.clean_items([(3, "shot", 1.7), (-1, "pass", 0.5), (4, "goal", -0.2)]) == [
        {"frame": 3, "action": "shot", "confidence": 1.0},
        {"frame": 4, "action": "goal", "confidence": 0.0}]


def test_the_bench_runs_both_miners(tmp_path):
    out = subprocess.run([sys.executable, "-m", "engine.tools.turbovision_bench", "--clip",
                          "small", "--runs", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=BOUND_S)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| reference",
                                                                          "| engine"))]
    assert len(rows) == 2 and all(row.endswith("| 1 | 0 |") for row in rows), out.stdout
