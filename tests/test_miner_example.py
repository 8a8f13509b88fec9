"""examples/sn44_miner.py end to end through the real nginx, with the stand-in models."""
from __future__ import annotations

import json
import os

import psutil
import pytest
import torch

from engine import EngineClosed, ProcessorError
from examples.sn44_miner import (STAND_IN_MODELS, Miner, adapt, main, miner_processor,
                                 origin_of, stand_in_models)

W, H = 320, 240


@pytest.fixture(scope="module")
def miner(cdn):
    with Miner(origin_of(cdn.url("")), models=STAND_IN_MODELS, device="cpu",
               fetchers=1, decoders=1) as m:
        yield m


def _check_frame(frame: dict) -> None:
    assert set(frame) == {"frame_number", "keypoints", "objects"}
    assert frame["keypoints"] and all(
        len(p) == 2 and 0 <= p[0] <= W and 0 <= p[1] <= H for p in frame["keypoints"])
    assert frame["objects"]
    assert len({obj["id"] for obj in frame["objects"]}) == len(frame["objects"])
    for obj in frame["objects"]:
        assert set(obj) == {"id", "bbox", "class_id"}
        assert obj["class_id"] == 0
        x1, y1, x2, y2 = obj["bbox"]
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H


def test_challenge_gives_the_validator_response_shape(miner, cdn):
    response = miner.handle_challenge({"challenge_id": "c1", "video_url": cdn.url("small.mp4")})
    json.dumps(response)                                   # what goes over the wire
    assert set(response) == {"challenge_id", "frames", "processing_time"}
    assert response["challenge_id"] == "c1"
    assert response["processing_time"] > 0
    assert [f["frame_number"] for f in response["frames"]] == list(range(50))
    for frame in response["frames"]:
        _check_frame(frame)
    # the clip has a green pitch: the stand-in keypoints are its four corners
    x1, y1 = response["frames"][0]["keypoints"][0]
    x2, y2 = response["frames"][0]["keypoints"][2]
    assert x1 < x2 and y1 < y2
    assert miner.last_report.ok and miner.last_report.frames_processed == 50
    assert miner.last_report.fetch["connections_new"] == 0     # pre-warmed at miner start


def test_second_challenge_reuses_pooled_connections(miner, cdn):
    miner.handle_challenge({"challenge_id": "c2a", "video_url": cdn.url("small.mp4")})
    response = miner.handle_challenge({"challenge_id": "c2b",
                                       "video_url": cdn.url("small-moov-end.mp4")})
    assert len(response["frames"]) == 50 and "error" not in response
    fetch = miner.last_report.fetch
    assert fetch["connections_new"] == 0 and fetch["connections_reused"] >= 1


def test_failed_challenge_returns_an_error_response_and_the_miner_carries_on(miner, cdn):
    response = miner.handle_challenge({"challenge_id": "c404",
                                       "video_url": cdn.url("missing.mp4")})
    assert response["challenge_id"] == "c404" and response["frames"] == []
    assert response["error"].startswith("FetchError") and "404" in response["error"]
    assert response["processing_time"] > 0
    assert miner.last_report is not None and not miner.last_report.ok
    again = miner.handle_challenge({"challenge_id": "c-after", "video_url": cdn.url("small.mp4")})
    assert len(again["frames"]) == 50 and "error" not in again


def test_close_leaves_no_process_and_then_raises(cdn):
    with Miner(None, models=STAND_IN_MODELS, device="cpu", fetchers=1, decoders=1) as m:
        supervisor = psutil.Process(m.engine.pid)
        procs = [supervisor] + supervisor.children(recursive=True)
        assert len(procs) >= 4                                # supervisor, fetcher, decoder, gpu
        engine = m.engine
    assert m.engine is None
    gone, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive, f"still running after close: {alive}"
    with pytest.raises(EngineClosed):
        engine.process(cdn.url("small.mp4"))


def test_bad_models_spec_fails_the_engine_start_clearly():
    before = os.environ.get("SN44_MODELS")
    with pytest.raises(ProcessorError, match="SN44_MODELS=.*no callable 'no_such_builder'"):
        Miner(None, models="examples.sn44_miner:no_such_builder", device="cpu",
              fetchers=1, decoders=1)
    assert os.environ.get("SN44_MODELS") == before         # only set while the engine spawned


def test_stand_ins_in_process_are_deterministic():
    frames = torch.zeros(2, H, W, 3, dtype=torch.uint8)
    frames[0, 100:200, 50:300, 1] = 200                       # a green "pitch"
    proc = adapt(*stand_in_models(torch.device("cpu")))
    out = proc(frames, [0, 1])
    assert out[0]["keypoints"] == [[50, 100], [300, 100], [300, 200], [50, 200]]
    assert out[1]["keypoints"] == [[80, 60], [240, 60], [240, 180], [80, 180]]   # fixed grid
    assert out == proc(frames, [0, 1])


def test_default_models_need_ultralytics_and_say_so(monkeypatch):
    try:
        import ultralytics  # noqa: F401
        pytest.skip("ultralytics is installed")
    except ImportError:
        pass
    monkeypatch.delenv("SN44_MODELS", raising=False)
    with pytest.raises(ProcessorError, match="pip install ultralytics"):
        miner_processor(torch.device("cpu"))


def test_command_line_prints_a_truncated_response(cdn, capsys):
    assert main([cdn.url("small.mp4"), "--stand-in", "--device", "cpu", "--show", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [f["frame_number"] for f in out["frames"]] == [0, 1]
    assert out["frames_not_shown"] == 48 and out["processing_time"] > 0


# ------------------------------------------------------------------ tracking
# Clips with a red and a blue box that move, made here with PyAV and served by nginx.

import threading                                       # noqa: E402

import av                                              # noqa: E402
import numpy as np                                     # noqa: E402

BOX = 30


def _box_clip(path, rows, frames=40, white_at=None):
    """320x240 H.264: a red box at y=rows[0] moving right, a blue one at y=rows[1] moving
    left, 2 px a frame; frame ``white_at`` is all white."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for n in range(frames):
            img = np.full((H, W, 3), 40, np.uint8)
            if n == white_at:
                img[:] = 255
            else:
                rx, bx = 10 + 2 * n, 280 - 2 * n
                img[rows[0]:rows[0] + BOX, rx:rx + BOX] = (220, 30, 30)
                img[rows[1]:rows[1] + BOX, bx:bx + BOX] = (30, 30, 220)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def box_clips(cdn):
    _box_clip(cdn.root / "boxes-top.mp4", (20, 70))
    _box_clip(cdn.root / "boxes-bottom.mp4", (140, 190))
    _box_clip(cdn.root / "boxes-white.mp4", (20, 70), white_at=12)
    return {"top": (20, 70), "bottom": (140, 190)}


@pytest.fixture(scope="module")
def box_miner(cdn, box_clips):
    with Miner(origin_of(cdn.url("")), models="tests.processors:color_box_models",
               device="cpu", fetchers=1, decoders=2, batch=4, ring_slots=12) as m:
        yield m


def _ids_by_colour(response, rows) -> dict:
    """{"red": {ids}, "blue": {ids}} over all frames, telling the boxes apart by row."""
    ids = {"red": set(), "blue": set()}
    for frame in response["frames"]:
        assert len(frame["objects"]) == 2, frame
        for obj in frame["objects"]:
            y1 = obj["bbox"][1]
            colour = "red" if abs(y1 - rows[0]) < 4 else "blue"
            assert abs(y1 - rows[0 if colour == "red" else 1]) < 4, obj
            ids[colour].add(obj["id"])
    return ids


def test_object_ids_stay_stable_across_frames_and_batches(box_miner, cdn, box_clips):
    response = box_miner.handle_challenge({"challenge_id": "t1",
                                           "video_url": cdn.url("boxes-top.mp4")})
    assert "error" not in response and len(response["frames"]) == 40   # 11 batches of <= 4
    ids = _ids_by_colour(response, box_clips["top"])
    assert len(ids["red"]) == 1 and len(ids["blue"]) == 1 and ids["red"] != ids["blue"]
    assert box_miner.last_report.video_result == {"tracks": 2, "videos_in_progress": 0}


def test_two_videos_at_once_never_share_a_tracker(box_miner, cdn, box_clips):
    out = {}

    def run(name):
        out[name] = box_miner.handle_challenge({"challenge_id": name,
                                                "video_url": cdn.url(f"boxes-{name}.mp4")})
    threads = [threading.Thread(target=run, args=(n,)) for n in ("top", "bottom")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for name in ("top", "bottom"):
        ids = _ids_by_colour(out[name], box_clips[name])
        # a tracker of its own: ids from 0, one per box (a shared one would hand the
        # second video new ids, its boxes overlapping none of the first's)
        assert ids["red"] | ids["blue"] == {0, 1} and len(ids["red"]) == 1, (name, ids)


def test_a_failing_video_does_not_leak_its_tracker(box_miner, cdn, box_clips):
    failed = box_miner.handle_challenge({"challenge_id": "w",
                                         "video_url": cdn.url("boxes-white.mp4")})
    assert "white frame" in failed["error"]
    box_miner.handle_challenge({"challenge_id": "t2", "video_url": cdn.url("boxes-top.mp4")})
    assert box_miner.last_report.video_result["videos_in_progress"] == 0
