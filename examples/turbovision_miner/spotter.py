"""The action spotter: the model behind the miner, and the engine processors around it.

The model comes from ``TURBOVISION_MODEL=module:builder`` (default: the STAND-IN
below). ``builder(device)`` returns an object with two methods, the usual split of an
action-spotting network:

* ``features(frames)``: ``frames`` the decoded pictures as the engine hands them, uint8
  ``[B, H, W, 3]`` RGB on ``device`` (the model scales and normalises them as it was
  trained to: shrinking first is far cheaper than converting a 720p frame to floats);
  returns ``[B, D]``, one feature vector per frame (the per-frame backbone);
* ``spot(features, frames)``: ``features`` ``[T, D]`` on the CPU, ``frames`` the T frame
  numbers on the 25 fps count; returns the actions as ``(frame, action, confidence)``
  (the temporal head, which sees the whole sequence).

Where they run:

* ``VIDEO`` (per-video processor, in the engine's GPU worker): features batch by batch
  as frames arrive, ``spot`` once the video ends; the job's ``video_result`` is
  ``{"items": [...]}``. A video URL and an image URL (a one-frame video) go this way.
* ``FEATURES`` (plain processor, GPU worker): ``{"features": [...]}`` per frame, for a
  ``frames`` challenge's URLs; the miner then calls ``spot`` on the whole sequence.
* ``local_model()``: the same model in the miner's own process, for a ``frames``
  challenge's inline (base64) pictures and its ``spot``.
"""
from __future__ import annotations

import functools
import importlib
import os

from engine import ProcessorError

MODEL_ENV = "TURBOVISION_MODEL"
STAND_IN = "examples.turbovision_miner.spotter:stand_in"
VIDEO = "examples.turbovision_miner.spotter:video_spotter"
FEATURES = "examples.turbovision_miner.spotter:frame_features"
VALIDATOR_FPS = 25.0
# SoccerNet ball-action labels: the stand-in's vocabulary (a real model brings its own).
ACTIONS = ("pass", "drive", "header", "high_pass", "out", "cross", "throw_in", "shot",
           "ball_player_block", "player_successful_tackle", "free_kick", "goal")


def at_25fps(frame_number: int, source_fps: float | None) -> int:
    """The validator's frame number (25 fps count) of a source frame, from its time."""
    if not source_fps:
        return frame_number
    return round(frame_number / source_fps * VALIDATOR_FPS)


def clean_items(items) -> list[dict]:
    """A model's ``(frame, action, confidence)`` rows as the response's items: confidence
    clamped to [0, 1], a negative frame dropped (the validator rejects either)."""
    out = []
    for frame, action, confidence in items:
        if int(frame) >= 0:
            out.append({"frame": int(frame), "action": str(action),
                        "confidence": round(min(1.0, max(0.0, float(confidence))), 4)})
    return out


@functools.lru_cache(maxsize=None)
def load_model(device):
    """The model named by ``TURBOVISION_MODEL``, built once per process and device (both
    processors of the GPU worker share it)."""
    spec = os.environ.get(MODEL_ENV, "").strip() or STAND_IN
    module_name, _, attr = spec.partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ProcessorError(f"{MODEL_ENV}={spec!r}: cannot load it ({exc})") from None
    return builder(device)


def local_model():
    """The model in the miner's own process, on the CPU, built on first use."""
    import torch
    return load_model(torch.device("cpu"))


# ---------------------------------------------------------------------------------------
# The engine processors
# ---------------------------------------------------------------------------------------
def video_spotter(device):
    return Spotter(load_model(device))


def features_of(model, frames) -> list[list[float]]:
    """Per frame of uint8 ``[B, H, W, 3]``, its features as a list, rounded so that the
    engine's and the miner's copies of the model hand ``spot`` the same numbers."""
    feats = model.features(frames).detach().float().cpu()
    return [[round(v, 6) for v in row] for row in feats.tolist()]


def spot_features(features: list[list[float]], frames: list[int]) -> list[dict]:
    """The temporal head in the miner's process, on features gathered frame by frame."""
    import torch
    return clean_items(local_model().spot(torch.tensor(features), frames))


def frame_features(device):
    model = load_model(device)

    def proc(frames, frame_numbers):
        return [{"features": f} for f in features_of(model, frames)]
    return proc


class Spotter:
    """Per-video: each job's features kept in order, ``spot`` on them when it ends."""

    def __init__(self, model):
        self.model = model

    def begin(self, video):
        return _Clip(self.model, video.fps)


class _Clip:
    def __init__(self, model, fps):
        self.model, self.fps = model, fps
        self.features, self.frames = [], []

    def __call__(self, frames, frame_numbers):
        self.features.append(self.model.features(frames).detach().float().cpu())
        self.frames += [at_25fps(n, self.fps) for n in frame_numbers]
        return [{} for _ in frame_numbers]

    def end(self):
        import torch
        if not self.frames:
            return {"items": []}
        items = self.model.spot(torch.cat(self.features), self.frames)
        return {"items": clean_items(items)}


# ---------------------------------------------------------------------------------------
# STAND-IN (not a model): deterministic, weight-free, for the example and its tests
# ---------------------------------------------------------------------------------------
class StandInSpotter:
    """STAND-IN, not an action spotter. Features: the luma of a 4x4 grid, from every
    ``step``-th pixel of every ``step``-th row. Actions: in each
    ``window`` frames (25 fps count), the frame that changes most from the one before;
    its label picks the grid cell that changed most, its confidence the amount of change.
    Its output means nothing to a validator."""

    grid, window, step = 4, 50, 8

    def features(self, frames):
        import torch.nn.functional as F
        x = frames[:, ::self.step, ::self.step].float().div_(255.0)
        luma = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
        return F.adaptive_avg_pool2d(luma[:, None], self.grid).flatten(1)

    def spot(self, features, frames):
        change = (features[1:] - features[:-1]).abs()
        change = [[0.0] * features.shape[1]] + change.tolist()
        best: dict[int, tuple[float, int]] = {}
        for i, frame in enumerate(frames):
            amount = sum(change[i]) / len(change[i])
            window = frame // self.window
            if window not in best or amount > best[window][0]:
                best[window] = (amount, i)
        out = []
        for window in sorted(best):
            amount, i = best[window]
            cell = max(range(len(change[i])), key=change[i].__getitem__)
            out.append((frames[i], ACTIONS[cell % len(ACTIONS)], min(1.0, amount * 10)))
        return out


def stand_in(device):
    """Builder for ``TURBOVISION_MODEL`` (the default): the STAND-IN spotter."""
    return StandInSpotter()
