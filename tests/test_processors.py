"""The built-in processors' arithmetic, on real tensors (no engine needed).

``stats`` has two code paths: numpy row blocks on the CPU and torch on CUDA. They must
give the same integers, and those integers must be the definition's (channel means,
and pixels whose green exceeds red and blue by more than 20)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.processors import BLOCK_ROWS, load


def definition(frames: np.ndarray):
    wide = frames.astype(np.int64)
    channel = wide.sum(axis=(1, 2)).tolist()
    r, g, b = wide[..., 0], wide[..., 1], wide[..., 2]
    green = ((g > r + 20) & (g > b + 20)).sum(axis=(1, 2)).tolist()
    return channel, green


@pytest.mark.parametrize("height, width", [(720, 1280), (BLOCK_ROWS + 7, 33), (1, 5)])
def test_stats_cpu_and_torch_paths_equal_the_definition(height, width):
    rng = np.random.default_rng(height * width)
    frames = rng.integers(0, 256, size=(3, height, width, 3), dtype=np.uint8)
    frames[0] = 255                        # sums near the top of the range
    frames[1, ..., 1] = 255                # all green, where r and b allow it
    frames[1, ..., 0] = frames[1, ..., 2] = 234
    proc = load("engine.processors:stats", torch.device("cpu"))
    tensor = torch.from_numpy(frames)
    expected = definition(frames)
    assert proc.sums_numpy(tensor) == expected
    assert proc.sums_torch(tensor) == expected
    results = proc(tensor, [0, 1, 2])
    pixels = height * width
    assert results[1]["green_ratio"] == 1.0
    assert results[0] == {"mean_rgb": [255.0, 255.0, 255.0], "green_ratio": 0.0}
    assert results[2]["mean_rgb"] == [round(c / pixels, 4) for c in expected[0][2]]


def test_null_returns_one_empty_result_per_frame():
    proc = load("engine.processors:null", torch.device("cpu"))
    assert proc(torch.zeros((4, 2, 2, 3), dtype=torch.uint8), [7, 8, 9, 10]) == [{}] * 4


# ------------------------------------------------------------------ per-video processors
# Through a real engine: nginx, fetchers, two decoders, the GPU worker on the CPU.

import threading                                   # noqa: E402

import av                                          # noqa: E402

from engine import Engine, ProcessorError, VideoResult   # noqa: E402
from engine.processors import Video                # noqa: E402

PROBE = "tests.processors:per_video"


@pytest.fixture(scope="module")
def small_batches(cdn):
    """Batches of 4 frames, so a 50-frame clip crosses many batch boundaries."""
    with Engine(processor="engine.processors:stats", device="cpu", fetchers=1, decoders=2,
                batch=4, ring_slots=12) as eng:
        yield eng


def _pixels(path, step=16) -> int:
    """What the probe sums over a job's frames, from a plain sequential decode."""
    total = 0
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            total += int(frame.to_ndarray(format="rgb24")[::step, ::step].sum())
    return total


def test_per_video_handler_sees_its_frames_in_order_and_ends_into_the_report(
        small_batches, cdn, small_clips):
    report = small_batches.process(cdn.url("small.mp4"), processor=PROBE)
    assert report.ok and report.frames_processed == 50
    result = report.video_result
    assert result["video"] == {"url": cdn.url("small.mp4"), "width": 320, "height": 240,
                               "fps": report.video["fps"], "frames": 50, "codec": "h264"}
    batches = result["batches"]
    assert len(batches) > 2                                   # the first frame, then 4s
    assert [n for b in batches for n in b] == list(range(50))
    assert result["pixels"] == _pixels(small_clips["small"])  # the same frames, same pixels
    assert {r["result"]["handler"] for r in report.results} == {result["handler"]}
    assert result["open_after"] == 0


def test_plain_processor_has_no_video_result(small_batches, cdn):
    report = small_batches.process(cdn.url("small.mp4"), processor="engine.processors:null")
    assert report.ok and report.video_result is None
    assert report.to_dict()["video_result"] is None


def test_max_frames_is_the_videos_expected_count(small_batches, cdn):
    report = small_batches.process(cdn.url("small.mp4"), processor=PROBE, max_frames=9)
    assert report.video_result["video"]["frames"] == 9
    assert [n for b in report.video_result["batches"] for n in b] == list(range(9))


def test_two_videos_at_once_get_a_handler_each(small_batches, cdn):
    reports = {}

    def run(name):
        reports[name] = small_batches.process(cdn.url(f"{name}.mp4"),
                                              processor="tests.processors:per_video_slow")
    threads = [threading.Thread(target=run, args=(n,)) for n in ("small", "small-moov-end")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    a, b = (reports[n].video_result for n in ("small", "small-moov-end"))
    assert a["handler"] != b["handler"]
    for name, r in (("small", a), ("small-moov-end", b)):
        assert r["video"]["url"] == cdn.url(f"{name}.mp4")
        assert [n for batch in r["batches"] for n in batch] == list(range(50))
    # the premise: the two jobs' batches really alternated in the worker
    assert min(b["order"]) < max(a["order"]) and min(a["order"]) < max(b["order"]), \
        "the two jobs did not overlap in the GPU worker"


def test_a_failing_video_closes_its_handler(small_batches, cdn):
    before = small_batches.process(cdn.url("small.mp4"), processor=PROBE).video_result
    with pytest.raises(ProcessorError, match="exploded on frame 5") as info:
        small_batches.process(cdn.url("small.mp4"), processor="tests.processors:per_video_failing")
    assert info.value.report.video_result is None and not info.value.report.ok
    after = small_batches.process(cdn.url("small.mp4"), processor=PROBE).video_result
    assert after["closed_so_far"] == before["closed_so_far"] + 1
    assert after["open_after"] == 0                      # nothing left of the failed job


def test_a_cancelled_stream_closes_its_handler(small_batches, cdn):
    before = small_batches.process(cdn.url("small.mp4"), processor=PROBE).video_result
    stream = small_batches.stream(cdn.url("small.mp4"),
                                  processor="tests.processors:per_video_slow")
    first = next(stream)
    assert first.frame_numbers == [0]
    stream.close()                                       # the client cancels the job
    after = small_batches.process(cdn.url("small.mp4"), processor=PROBE).video_result
    assert after["closed_so_far"] == before["closed_so_far"] + 1
    assert after["open_after"] == 0


def test_stream_ends_with_the_video_result(small_batches, cdn):
    items = list(small_batches.stream(cdn.url("small.mp4"), processor=PROBE))
    assert isinstance(items[-1], VideoResult)
    frames = [n for item in items[:-1] for n in item.frame_numbers]
    assert frames == list(range(50))
    assert items[-1].value == small_batches.last_report.video_result
    plain = list(small_batches.stream(cdn.url("small.mp4"), processor="engine.processors:null"))
    assert not any(isinstance(i, VideoResult) for i in plain)


@pytest.mark.parametrize("spec, why", [
    ("tests.processors:per_video_end_raises", r"end\(\) failed: ValueError: no answer"),
    ("tests.processors:per_video_bad_end", r"end\(\) failed: TypeError"),
])
def test_a_bad_end_fails_the_job_clearly(small_batches, cdn, spec, why):
    with pytest.raises(ProcessorError, match=why) as info:
        small_batches.process(cdn.url("small.mp4"), processor=spec)
    assert info.value.report.frames_processed == 50      # the frames' results are kept
    assert small_batches.process(cdn.url("small.mp4")).ok


def test_wait_holds_each_frame_asleep(monkeypatch):
    import time
    monkeypatch.setenv("ENGINE_WAIT_MS_PER_FRAME", "5")
    proc = load("engine.processors:wait", torch.device("cpu"))
    frames = torch.zeros((4, 2, 2, 3), dtype=torch.uint8)
    wall = time.perf_counter()
    assert proc(frames, [0, 1, 2, 3]) == [{}] * 4
    wall = time.perf_counter() - wall
    assert wall >= 0.020                                 # a sleep never ends early
    assert proc.seconds_per_frame == 0.005
    monkeypatch.setenv("ENGINE_WAIT_MS_PER_FRAME", "-1")
    with pytest.raises(ValueError, match="ENGINE_WAIT_MS_PER_FRAME"):
        load("engine.processors:wait", torch.device("cpu"))


def test_a_factory_must_return_a_processor():
    assert Video("u", 2, 2, 25.0, 3, "h264").frames == 3
    with pytest.raises(ValueError, match="neither a callable nor an object with begin"):
        load("tests.test_processors:_not_a_processor", torch.device("cpu"))


def _not_a_processor(device):
    return 42
