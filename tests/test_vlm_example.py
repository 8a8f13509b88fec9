"""examples/vlm_frames.py: a VLM's frames of a URL, exact, through the real nginx."""
from __future__ import annotations

import subprocess
import sys

import av
import numpy as np


def test_load_video_gives_linspace_frames_exactly(cdn, small_clips):
    from examples import vlm_frames
    try:
        frames, meta = vlm_frames.load_video(cdn.url("small-moov-end.mp4"), num_frames=8)
        tensor = vlm_frames.as_model_input(frames)
    finally:
        vlm_frames.close()
    want = np.linspace(0, 49, 8).astype(int).tolist()
    assert meta["frames_indices"] == want and meta["total_num_frames"] == 50
    with av.open(str(small_clips["small-moov-end"])) as c:
        plain = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert np.array_equal(frames, np.stack([plain[i] for i in want]))
    assert tuple(tensor.shape) == (8, 3, 240, 320) and float(tensor.max()) <= 1.0


def test_command_line(cdn):
    done = subprocess.run([sys.executable, "-m", "examples.vlm_frames", cdn.url("small.mp4"),
                           "--fps", "2"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "4 frames (4, 3, 240, 320) of 50 at 25.0 fps: [0, 12, 25, 37]" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "examples.vlm_frames", cdn.url("small.mp4"),
                          "--count", "0"], capture_output=True, text=True, timeout=180)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: count must be > 0, not 0"
