"""examples/cut_detector.py through a real engine: cuts of a clip made here with PyAV."""
from __future__ import annotations

import av
import numpy as np
import pytest

from engine import Engine

W, H = 320, 240
CUTS = (17, 30, 43)          # frames where a new shot starts; batch boundaries fall between


def _shot(n: int, shot: int) -> np.ndarray:
    """Shots differ in colour and layout; inside a shot a square moves 3 px a frame."""
    base = [(200, 60, 40), (30, 160, 60), (40, 50, 190), (230, 220, 90)][shot]
    img = np.empty((H, W, 3), np.uint8)
    img[:] = base
    img[:, : W // 2] //= 2 if shot % 2 else 1
    x = 20 + 3 * n
    img[100:140, x:x + 40] = 255 - np.array(base, np.uint8)
    return img


@pytest.fixture(scope="module")
def shots_clip(cdn):
    path = cdn.root / "shots.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for n in range(56):
            shot = sum(n >= cut for cut in CUTS)
            for p in s.encode(av.VideoFrame.from_ndarray(_shot(n, shot), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_cut_detector_reports_the_clips_cuts(cdn, shots_clip):
    with Engine(processor="examples.cut_detector:cut_processor", device="cpu", fetchers=1,
                decoders=1, batch=4, ring_slots=12) as eng:
        report = eng.process(cdn.url("shots.mp4"))
        again = eng.process(cdn.url("shots.mp4"))      # a fresh handler: same answer
    assert report.ok and report.frames_processed == 56
    assert report.video_result == {"events": [{"frame": n, "kind": "cut"} for n in CUTS]}
    assert again.video_result == report.video_result
    changes = [r["result"]["change"] for r in report.results]
    assert changes[0] == 0.0 and max(c for n, c in enumerate(changes) if n not in CUTS) < 30
