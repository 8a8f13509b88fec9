"""A per-video processor with a video-level answer: where the picture changes (camera cuts).

STAND-IN, not a trained shot-boundary model: each frame is reduced to a 9x16 grid of mean
RGB values on the engine's device, and a frame whose grid differs from the previous
frame's by more than ``CUT_THRESHOLD`` (mean absolute difference, 0..255) starts a new
shot. Per frame the result is ``{"change": difference}``; the video's result
(``Report.video_result``) is ``{"events": [{"frame": n, "kind": "cut"}, ...]}``.

It shows the engine's per-video protocol: ``begin(video)`` makes a handler holding the
previous frame's grid, so the comparison carries across batch boundaries and never
mixes two videos::

    python -m engine run URL --processor examples.cut_detector:cut_processor --json r.json
"""
from __future__ import annotations

import os

CUT_THRESHOLD = float(os.environ.get("CUT_THRESHOLD", "30"))
GRID = (9, 16)


class CutDetector:
    def __init__(self, device, threshold: float = CUT_THRESHOLD):
        self.device, self.threshold = device, threshold

    def begin(self, video):
        return _Shots(self.threshold)


class _Shots:
    def __init__(self, threshold: float):
        self.threshold = threshold
        self.previous = None          # the last frame's grid, from the previous batch too
        self.events: list[dict] = []

    def __call__(self, frames, frame_numbers):
        import torch
        x = frames.permute(0, 3, 1, 2).float()
        grids = torch.nn.functional.adaptive_avg_pool2d(x, GRID).flatten(1)   # [B, 3*9*16]
        if self.previous is not None:
            grids_before = torch.cat([self.previous[None], grids[:-1]])
        else:
            grids_before = torch.cat([grids[:1], grids[:-1]])     # frame 0 starts the video
        change = (grids - grids_before).abs().mean(dim=1).cpu().tolist()
        self.previous = grids[-1]
        out = []
        for n, c in zip(frame_numbers, change):
            if c > self.threshold:
                self.events.append({"frame": int(n), "kind": "cut"})
            out.append({"change": round(c, 2)})
        return out

    def end(self):
        return {"events": self.events}


def cut_processor(device):
    """Processor factory (``examples.cut_detector:cut_processor``)."""
    return CutDetector(device)
