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
