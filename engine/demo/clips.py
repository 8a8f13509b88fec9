"""Deterministic sample videos for tests, the demo and benchmarks.

Why: the engine must be exercised on a real H.264 MP4 with B-frames (so
decode order differs from presentation order), both with the moov atom at
the front ("faststart") and at the end (the fetcher must then find it
before it can plan ranges).  Shipping such a file in the repository would
add megabytes of binary, so we synthesise it with PyAV instead and cache it.

Content is synthetic but not trivial: a slowly drifting gradient, a green
"pitch" whose size oscillates (so a green-pixel ratio changes frame to
frame), moving coloured rectangles (so per-channel means change every
frame) and two layers of grain moving in different directions (so the
encoder cannot predict it away and the full-size clip lands near the bitrate
we ask for, ~14 MB for 750 frames of 1280x720 -- a realistic payload for
parallel range fetching).  Everything is a pure function of (frame index,
seed), built with whole-array numpy operations.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import av
import numpy as np

# Bump when the generator's output changes: cache names include it, so old
# cached files are simply never looked at again.
GENERATOR_VERSION = "v1"

# x264 is bit-exact for a fixed thread count, so pinning it makes the cached
# file identical on every machine (benchmarks compare like with like).
_X264_OPTIONS = {"bf": "3", "preset": "veryfast", "g": "50", "threads": "4"}
_BITS_PER_PIXEL_FRAME = 3_700_000 / (1280 * 720 * 25)  # ~3.7 Mbit/s at 720p25

PRESETS: dict[str, dict] = {
    "sn44": dict(frames=750, width=1280, height=720, faststart=True),
    "sn44-moov-end": dict(frames=750, width=1280, height=720, faststart=False),
    "small": dict(frames=50, width=320, height=240, faststart=True),
    "small-moov-end": dict(frames=50, width=320, height=240, faststart=False),
    # bench --sparse: two minutes of 720p at the bit rate of a typical long web video
    "long": dict(frames=3000, width=1280, height=720, faststart=True, bit_rate=1_150_000),
}


class _Scene:
    """Precomputed pieces of the synthetic scene; frame(i) composes them."""

    def __init__(self, width: int, height: int, seed: int):
        self.w, self.h = width, height
        rng = np.random.default_rng(seed)
        # Grain tiles larger than the frame so they can be panned by slicing.
        self.pad = 64
        shape = (height + self.pad, width + self.pad)
        self.grain_a = rng.integers(-14, 15, size=shape, dtype=np.int16)
        self.grain_b = rng.integers(-10, 11, size=shape, dtype=np.int16)
        self.xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
        self.ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
        # Rectangles: size, colour, speed and phase all drawn from the seed.
        self.rects = [
            dict(
                w=int(width * rng.uniform(0.06, 0.2)),
                h=int(height * rng.uniform(0.08, 0.25)),
                color=rng.integers(30, 256, size=3).astype(np.int16),
                vx=rng.uniform(0.002, 0.012) * rng.choice([-1, 1]),
                vy=rng.uniform(0.002, 0.012) * rng.choice([-1, 1]),
                px=rng.uniform(0, 1),
                py=rng.uniform(0, 1),
            )
            for _ in range(6)
        ]

    def frame(self, i: int) -> np.ndarray:
        """Return frame i as an (h, w, 3) uint8 RGB array."""
        w, h, t = self.w, self.h, i / 25.0
        img = np.empty((h, w, 3), dtype=np.int16)
        # Slowly changing gradient background.
        img[..., 0] = 90 + 80 * np.sin(2.1 * self.xs + 0.31 * t)  # broadcasts down
        img[..., 1] = 60 + 40 * self.ys + 20 * np.sin(0.17 * t)
        img[..., 2] = 120 + 70 * np.cos(1.7 * self.ys + 0.23 * t)  # broadcasts across
        # Green field whose top edge moves, so the green share varies.
        top = int(h * (0.55 + 0.3 * np.sin(0.4 * t)))
        img[top:, :, 0] = 40
        img[top:, :, 1] = 150 + (20 * np.sin(8.0 * self.xs + 0.5 * t)).astype(np.int16)
        img[top:, :, 2] = 45
        # Moving rectangles bouncing around.
        for r in self.rects:
            x = int(_bounce(r["px"] + r["vx"] * i) * (w - r["w"]))
            y = int(_bounce(r["py"] + r["vy"] * i) * (h - r["h"]))
            img[y : y + r["h"], x : x + r["w"]] = r["color"]
        # Two grain layers panning in different directions.
        p = self.pad
        ax, ay = (3 * i) % p, (2 * i) % p
        bx, by = p - 1 - (5 * i) % p, (7 * i) % p
        grain = self.grain_a[ay : ay + h, ax : ax + w] + self.grain_b[by : by + h, bx : bx + w]
        img += grain[..., None]
        return np.clip(img, 0, 255).astype(np.uint8)


def _bounce(u: float) -> float:
    """Map an unbounded position to [0, 1] by reflecting off the edges."""
    u = u % 2.0
    return 2.0 - u if u > 1.0 else u


def make_clip(
    path,
    *,
    frames: int = 750,
    width: int = 1280,
    height: int = 720,
    fps: int = 25,
    faststart: bool = True,
    seed: int = 0,
    bit_rate: int | None = None,
) -> Path:
    """Encode a synthetic H.264/MP4 clip to ``path`` and return it as a Path.

    The file appears atomically: we write to a temporary name in the same
    directory and ``os.replace`` it, so a crash never leaves a half file that
    a cache lookup would mistake for a finished one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    options = {"movflags": "faststart"} if faststart else {}
    scene = _Scene(width, height, seed)
    try:
        with av.open(str(tmp), mode="w", format="mp4", options=options) as container:
            stream = container.add_stream("libx264", rate=fps, options=dict(_X264_OPTIONS))
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p"
            stream.bit_rate = bit_rate or int(_BITS_PER_PIXEL_FRAME * width * height * fps)
            for i in range(frames):
                frame = av.VideoFrame.from_ndarray(scene.frame(i), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def cache_dir() -> Path:
    """Where cached clips live: $ENGINE_CACHE_DIR or ~/.cache/engine/clips."""
    env = os.environ.get("ENGINE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "engine" / "clips"


def cached_clip(name: str) -> Path:
    """Return the path of preset ``name`` (see PRESETS), generating it if missing."""
    if name not in PRESETS:
        raise KeyError(f"unknown clip {name!r}; known: {sorted(PRESETS)}")
    path = cache_dir() / f"{name}-{GENERATOR_VERSION}.mp4"
    if not path.exists():
        make_clip(path, **PRESETS[name])
    return path


if __name__ == "__main__":  # python -m engine.demo.clips [names...]: build and time
    import sys

    for clip in sys.argv[1:] or list(PRESETS):
        start = time.perf_counter()
        out = cached_clip(clip)
        print(f"{clip}: {out} {out.stat().st_size:,} bytes {time.perf_counter() - start:.1f}s")
