"""Reference results: PyAV decoding the whole local file, frame by frame."""
from __future__ import annotations

import functools
from pathlib import Path

import av
import numpy as np


def frame_stats(rgb: np.ndarray) -> dict:
    """The contract's ``stats`` result, computed the slow obvious way."""
    px = rgb.reshape(-1, 3).astype(np.int32)
    mean = px.mean(axis=0)
    r, g, b = px[:, 0], px[:, 1], px[:, 2]
    green = int(np.count_nonzero((g > r + 20) & (g > b + 20))) / len(px)
    return {"mean_rgb": [round(float(c), 4) for c in mean], "green_ratio": round(green, 6)}


@functools.lru_cache(maxsize=8)
def reference(path: Path, limit: int | None = None) -> list[dict]:
    out = []
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            out.append(frame_stats(frame.to_ndarray(format="rgb24")))
            if limit and len(out) >= limit:
                break
    return out


def assert_matches(report, ref: list[dict], tolerance: float = 0.0) -> None:
    """Every frame number present once, in order, with the reference's numbers."""
    numbers = [r["frame_number"] for r in report.results]
    assert numbers == list(range(len(ref))), numbers[:20]
    for item, want in zip(report.results, ref):
        got = item["result"]
        n = item["frame_number"]
        if tolerance == 0:
            assert got == want, f"frame {n}: {got} != {want}"
        else:
            diffs = [abs(a - b) for a, b in zip(got["mean_rgb"], want["mean_rgb"])]
            assert max(diffs) <= tolerance, f"frame {n}: {got} vs {want}"
