"""Built-in processors and the ``module:factory`` loader.

A factory runs once in the GPU worker with the ``torch.device``; the callable it returns
takes ``frames`` (uint8 ``[B, H, W, 3]`` RGB on that device) and the frame numbers, and
returns one JSON-serialisable result per frame.

A factory may instead return a per-video processor: an object with ``begin(video)``
(``video`` a ``Video``) returning a handler for that job alone. The handler is called
like a plain processor with the job's batches, in frame order; then ``handler.end()``
gives the job's ``video_result``, or, if the job fails or is cancelled,
``handler.close()`` (when it has one) is called instead.
"""
from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass

import numpy as np

from engine.settings import setting

BLOCK_ROWS = 64     # stats on the CPU: a block of rows of a 720p frame stays in L2


def load(spec: str, device):
    """Import ``module:factory`` and call the factory with the device."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"processor {spec!r}: expected module:factory")
    module = importlib.import_module(module_name)
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"processor {spec!r}: {module_name} has no {attr!r}") from None
    proc = factory(device)
    if not callable(proc) and not callable(getattr(proc, "begin", None)):
        raise ValueError(f"processor {spec!r}: the factory returned neither a callable "
                         "nor an object with begin(video)")
    return proc


@dataclass(frozen=True)
class Video:
    """What a per-video processor's ``begin`` learns about its job (from the moov)."""
    url: str
    width: int
    height: int
    fps: float | None
    frames: int            # frames the job will process (its selection applied)
    codec: str | None
    selection: dict | None = None   # what the job selected (engine.selection.Selection)
    output: str | None = None       # Engine.frames: the block its frames go into


def wait(device):
    """A GPU model's stand-in for benchmarks: holds each batch
    ``ENGINE_WAIT_MS_PER_FRAME`` ms (default 4) per frame, asleep (no CPU), and returns
    ``{}`` per frame. Through the engine it is per-video, and its video result says
    where the model waited (``Wait``)."""
    default = f"{setting('ENGINE_WAIT_MS_PER_FRAME').default:g}"
    text = os.environ.get("ENGINE_WAIT_MS_PER_FRAME") or default
    try:
        seconds = float(text) / 1000.0
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"ENGINE_WAIT_MS_PER_FRAME={text!r}: expected a number of ms >= 0")
    return Wait(seconds)


class Wait:
    """``wait``'s processor. A sleep wakes late (more so on a loaded machine), so each
    hold is shortened by what the previous ones overran: over a video the model's time
    is frames x the setting, within one wake-up, as a benchmark's arithmetic assumes.

    Called directly it is a plain processor. ``begin`` gives a handler that also times
    its calls; its ``end()`` is ``{"first_call": t, "last_end": t, "held_s", "ramp_gaps_s",
    "gaps_s", "calls"}`` (``time.monotonic()`` values, which every process of a machine
    shares): the model's waits between batches, those before the first full batch apart.
    """

    def __init__(self, seconds_per_frame: float):
        self.seconds_per_frame = seconds_per_frame
        self.owed = 0.0           # held too long so far (s): taken off the next holds

    def __call__(self, frames, frame_numbers):
        want = self.seconds_per_frame * len(frame_numbers)
        start = time.perf_counter()
        time.sleep(max(0.0, want - self.owed))
        self.owed += time.perf_counter() - start - want
        return [{} for _ in frame_numbers]

    def begin(self, video):
        return _WaitTimeline(self)


class _WaitTimeline:
    def __init__(self, model: Wait):
        self.model = model
        self.first_call = self.last_end = None
        self.held = self.ramp_gaps = self.gaps = 0.0
        self.calls, self.largest = 0, 0

    def __call__(self, frames, frame_numbers):
        start = time.monotonic()
        if self.last_end is not None:
            gap = start - self.last_end
            if len(frame_numbers) > self.largest:
                self.ramp_gaps += gap        # still waiting for batches to grow
            else:
                self.gaps += gap
        self.largest = max(self.largest, len(frame_numbers))
        out = self.model(frames, frame_numbers)
        self.last_end = time.monotonic()
        if self.first_call is None:
            self.first_call = start
        self.held += self.last_end - start
        self.calls += 1
        return out

    def end(self):
        return {"first_call": self.first_call, "last_end": self.last_end,
                "held_s": round(self.held, 4), "ramp_gaps_s": round(self.ramp_gaps, 4),
                "gaps_s": round(self.gaps, 4), "calls": self.calls}


def null(device):
    """Pipeline speed alone: ``{}`` per frame."""
    def proc(frames, frame_numbers):
        return [{} for _ in frame_numbers]
    return proc


def stats(device):
    """``{"mean_rgb": [r, g, b], "green_ratio": x}`` per frame.

    A green pixel has g > r + 20 and g > b + 20, i.e. g > min(max(r, b), 235) + 20 in
    uint8 arithmetic that cannot wrap. Everything stays integer, so the CPU path (numpy,
    several times faster than torch's on uint8 here) and the CUDA path (torch) give the
    same numbers.
    """
    import torch

    def sums_numpy(frames):
        # Blocks of rows that stay in cache: the channel sums and the green test read
        # each block once, where whole-batch numpy passes read the batch several times.
        a = frames.numpy()
        _, h, w, _ = a.shape
        acc = np.empty(w * 3, np.uint32)      # BLOCK_ROWS * 255 per column: no overflow
        limit = np.empty((BLOCK_ROWS, w), np.uint8)
        green_px = np.empty((BLOCK_ROWS, w), bool)
        channel, green = [], []
        for frame in a:
            columns = np.zeros(w * 3, np.uint64)
            count = 0
            for y in range(0, h, BLOCK_ROWS):
                block = frame[y:y + BLOCK_ROWS]
                n = block.shape[0]
                np.add.reduce(block.reshape(n, w * 3), axis=0, dtype=np.uint32, out=acc)
                columns += acc
                m = limit[:n]
                np.maximum(block[..., 0], block[..., 2], out=m)
                np.minimum(m, 235, out=m)
                m += 20
                np.greater(block[..., 1], m, out=green_px[:n])
                count += int(np.count_nonzero(green_px[:n]))
            channel.append(columns.reshape(w, 3).sum(axis=0).tolist())
            green.append(count)
        return channel, green

    def sums_torch(frames):
        b = frames.shape[0]
        channel = frames.reshape(b, -1, 3).sum(dim=1, dtype=torch.int64)
        m = torch.maximum(frames[..., 0], frames[..., 2]).clamp_(max=235) + 20
        green = (frames[..., 1] > m).reshape(b, -1).sum(dim=1)
        return channel.cpu().tolist(), green.cpu().tolist()

    def proc(frames, frame_numbers):
        pixels = frames.shape[1] * frames.shape[2]
        sums = sums_numpy if frames.device.type == "cpu" else sums_torch
        channel, green = sums(frames)
        return [{"mean_rgb": [round(c / pixels, 4) for c in ch], "green_ratio": round(gr / pixels, 6)}
                for ch, gr in zip(channel, green)]

    proc.sums_numpy, proc.sums_torch = sums_numpy, sums_torch   # for the tests
    return proc


def collect(device):
    """``Engine.frames``' processor: each selected frame, in order, into the job's output
    block (``video.output``, made by the supervisor), for the client to copy out. Its
    video result says where they are."""
    return Collect()


class Collect:
    def begin(self, video):
        return _Collector(video)


class _Collector:
    def __init__(self, video):
        from engine.shm import SharedBlock
        self.block = SharedBlock.attach(video.output)
        self.frame_bytes = video.width * video.height * 3
        self.shape = (video.height, video.width, 3)
        self.numbers: list[int] = []

    def __call__(self, frames, frame_numbers):
        start = len(self.numbers) * self.frame_bytes
        end = start + len(frame_numbers) * self.frame_bytes
        if end > self.block.size:
            raise ValueError(f"the output block holds {self.block.size // self.frame_bytes} "
                             "frames: more were selected")
        self.block.grow(end, start)   # a streamed job's block is reserved as it fills
        data = frames.cpu().numpy() if hasattr(frames, "cpu") else np.asarray(frames)
        self.block.mm[start:end] = data.reshape(-1).data
        self.numbers += [int(n) for n in frame_numbers]
        return [{} for _ in frame_numbers]

    def end(self):
        self.block.close()
        return {"output": self.block.name, "frame_numbers": self.numbers,
                "shape": [len(self.numbers), *self.shape]}

    def close(self):
        self.block.close()
