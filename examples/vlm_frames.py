"""Frames of a video URL for a vision-language model, without downloading the whole file.

A VLM server samples a few frames (vLLM: ``numpy.linspace(0, n - 1, N).astype(int)``,
Qwen-VL style: a fixed rate) and today reads the whole body before decoding. With the
engine, only the GOPs that hold those frames are fetched and decoded, and the frames
arrive through shared memory:

    python -m examples.vlm_frames URL [--count 32 | --fps 1]

The swap a vLLM or SGLang user makes is one function: where the server loads a video
URL into ``(frames [N, H, W, 3] uint8, metadata)`` (vLLM's video loader behind
``MediaConnector.fetch_video``; SGLang's ``load_video``), call ``load_video`` below
instead. One ``Engine`` per server process keeps its connections warm across requests.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from engine import Engine, EngineError

_engine: Engine | None = None


def engine() -> Engine:
    """The process's engine, started on first use (its pool then serves every request)."""
    global _engine
    if _engine is None:
        _engine = Engine(processor="engine.processors:null")
    return _engine


def close() -> None:
    """Stop the process's engine (a later call starts a new one)."""
    global _engine
    if _engine is not None:
        _engine.close()
        _engine = None


def load_video(url: str, num_frames: int = 32, fps: float | None = None) -> tuple[np.ndarray, dict]:
    """``(frames, metadata)`` as a VLM video loader returns them: uint8 ``[N, H, W, 3]``
    RGB, and the source frame numbers, rate and length."""
    got = engine().frames(url, **({"fps": fps} if fps else {"count": num_frames}))
    video = got.report.video
    return got.array, {"frames_indices": got.frame_numbers, "fps": video["fps"],
                       "total_num_frames": video["frames"], "width": video["width"],
                       "height": video["height"]}


def as_model_input(frames: np.ndarray) -> torch.Tensor:
    """``[N, 3, H, W]`` float in [0, 1]: what an image processor's resize and normalise
    take next."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.vlm_frames")
    ap.add_argument("url")
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--fps", type=float)
    args = ap.parse_args(argv)
    try:
        frames, meta = load_video(args.url, args.count, args.fps)
    except (EngineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        close()
    tensor = as_model_input(frames)
    print(f"{len(frames)} frames {tuple(tensor.shape)} of {meta['total_num_frames']} "
          f"at {meta['fps']} fps: {meta['frames_indices']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
