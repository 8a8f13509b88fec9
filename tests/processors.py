"""Processors used by the tests (loaded by the GPU worker as ``tests.processors:NAME``)."""
import time


def failing(device):
    """Raises on the batch holding frame 5: a model that crashes mid-video."""
    def proc(frames, frame_numbers):
        if 5 in frame_numbers:
            raise RuntimeError("stand-in model exploded on frame 5")
        return [{"n": n} for n in frame_numbers]
    return proc


def slow(device):
    """A consumer slower than the decoder: the ring must fill and block the decoder."""
    def proc(frames, frame_numbers):
        time.sleep(0.05 * len(frame_numbers))
        return [{"sum0": int(frames[i, 0, 0].sum())} for i in range(len(frame_numbers))]
    return proc


def broken_factory(device):
    raise RuntimeError("stand-in model weights missing")


def spin(device):
    """A processor caught in an endless loop (pure Python: the GIL is released between
    bytecodes, so the worker's heartbeat thread keeps beating)."""
    def proc(frames, frame_numbers):
        n = 0
        while True:
            n += 1
    return proc


def wait(device):
    """A GPU model's stand-in: holds each batch ENGINE_WAIT_MS_PER_FRAME ms (default 20) per
    frame without using the CPU (a model waits on the GPU, not on the cores)."""
    import os
    per_frame = float(os.environ.get("ENGINE_WAIT_MS_PER_FRAME", "20")) / 1000

    def proc(frames, frame_numbers):
        time.sleep(per_frame * len(frame_numbers))
        return [{"n": n} for n in frame_numbers]
    return proc
