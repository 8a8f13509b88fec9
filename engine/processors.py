"""Built-in processors and the ``module:factory`` loader.

A factory runs once in the GPU worker with the ``torch.device``; the callable it returns
takes ``frames`` (uint8 ``[B, H, W, 3]`` RGB on that device) and the frame numbers, and
returns one JSON-serialisable result per frame.
"""
from __future__ import annotations

import importlib


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
    if not callable(proc):
        raise ValueError(f"processor {spec!r}: the factory did not return a callable")
    return proc


def null(device):
    """Pipeline speed alone: ``{}`` per frame."""
    def proc(frames, frame_numbers):
        return [{} for _ in frame_numbers]
    return proc


def stats(device):
    """``{"mean_rgb": [r, g, b], "green_ratio": x}`` per frame.

    Stays in uint8 where it can (a green pixel: g > r + 20 and g > b + 20, computed as
    g - 20 > r on pixels with g > 20, where the subtraction cannot wrap), because
    widening 16 full frames to float costs more than the whole decode on a CPU.
    """
    import torch

    def proc(frames, frame_numbers):
        b, h, w, _ = frames.shape
        pixels = h * w
        sums = frames.reshape(b, pixels, 3).sum(dim=1, dtype=torch.int64)
        r, g, bl = frames[..., 0], frames[..., 1], frames[..., 2]
        g20 = g - 20
        green = (g > 20) & (g20 > r) & (g20 > bl)
        counts = green.reshape(b, pixels).sum(dim=1)
        means = (sums.double() / pixels).cpu().tolist()
        ratios = (counts.double() / pixels).cpu().tolist()
        return [{"mean_rgb": [round(c, 4) for c in m], "green_ratio": round(x, 6)}
                for m, x in zip(means, ratios)]
    return proc
