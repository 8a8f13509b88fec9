"""Processors used by the tests (loaded by the GPU worker as ``tests.processors:NAME``)."""
import os
import signal
import time
from pathlib import Path


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
_OPEN: set = set()          # handlers of every probe in this GPU worker, not ended or closed
_CLOSED = [0]
_CALLS = [0]


class _Probe:
    """Per-video processor that records what the engine gave each handler: its video, its
    frame numbers call by call, a checksum of its frames, and the worker-wide order of
    calls; ``end()`` returns that record, with how many handlers are open or were closed
    in this worker (a handler the engine forgets to end or close stays open)."""

    def __init__(self, fail_on=None, hold_s=0.0, end_value=None, gated=False):
        self.fail_on, self.hold_s, self.end_value = fail_on, hold_s, end_value
        self.gated = gated

    def begin(self, video):
        probe = self

        class Handler:
            def __init__(self):
                self.video, self.batches, self.order, self.pixels = video, [], [], 0
                _OPEN.add(self)

            def __call__(self, frames, frame_numbers):
                if probe.gated:
                    _gate(frame_numbers)
                _CALLS[0] += 1
                self.order.append(_CALLS[0])
                self.batches.append(list(frame_numbers))
                if probe.fail_on is not None and probe.fail_on in frame_numbers:
                    raise RuntimeError(f"stand-in model exploded on frame {probe.fail_on}")
                time.sleep(probe.hold_s * len(frame_numbers))
                self.pixels += int(frames[:, ::16, ::16].sum())
                return [{"n": n, "handler": id(self)} for n in frame_numbers]

            def end(self):
                _OPEN.discard(self)
                if probe.end_value is not None:
                    return probe.end_value()
                v = self.video
                return {"video": {"url": v.url, "width": v.width, "height": v.height,
                                  "fps": v.fps, "frames": v.frames, "codec": v.codec},
                        "batches": self.batches, "order": self.order, "pixels": self.pixels,
                        "handler": id(self), "open_after": len(_OPEN),
                        "closed_so_far": _CLOSED[0]}

            def close(self):
                _OPEN.discard(self)
                _CLOSED[0] += 1

        return Handler()


def per_video(device):
    return _Probe()


def _gate(frame_numbers) -> None:
    """A batch holding frame ENGINE_TEST_GATE_FRAME says so (the file GATE.reached) and
    waits until the test opens the gate (GATE.open): a test kills a worker at a known
    point of a job. Bounded: it gives up after a minute."""
    gate = Path(os.environ["ENGINE_TEST_GATE"])
    if int(os.environ["ENGINE_TEST_GATE_FRAME"]) not in frame_numbers:
        return
    opened = gate.with_suffix(".open")
    if not opened.exists():
        gate.with_suffix(".reached").touch()
    deadline = time.monotonic() + 60
    while not opened.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def gated(device):
    """``engine.processors:stats`` behind the gate."""
    from engine.processors import stats
    inner = stats(device)

    def proc(frames, frame_numbers):
        _gate(frame_numbers)
        return inner(frames, frame_numbers)
    return proc


def per_video_gated(device):
    return _Probe(gated=True)


def dies_on_frame_5(device):
    """A model that takes its process down (a segfault in a native library, an OOM
    kill) on the batch holding frame 5: a poison input for the GPU worker."""
    def proc(frames, frame_numbers):
        if 5 in frame_numbers:
            os.kill(os.getpid(), signal.SIGKILL)
        return [{} for _ in frame_numbers]
    return proc


def per_video_slow(device):
    """Holds 10 ms per frame, so two jobs' batches are in the worker at once."""
    return _Probe(hold_s=0.01)


def per_video_failing(device):
    return _Probe(fail_on=5)


def per_video_bad_end(device):
    """end() returns something JSON cannot carry."""
    return _Probe(end_value=lambda: {"not json": {1, 2}})


def per_video_end_raises(device):
    def boom():
        raise ValueError("no answer for this video")
    return _Probe(end_value=boom)


def color_box_models(device):
    """``SN44_MODELS`` builder for the tracking tests: the detector boxes the red and the
    blue pixels of a frame (class 0 both, in an order that alternates within the batch,
    so an index is no id), holds 5 ms a frame (two videos overlap in the worker), and
    raises on an all-white frame (a video that fails mid-way)."""
    import torch

    def bbox(mask):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1, 0.9, 0]

    def detector(x):
        out = []
        for i, frame in enumerate(x):
            if bool((frame > 0.9).all()):
                raise RuntimeError("white frame: the detector gives up")
            r, g, b = frame[0], frame[1], frame[2]
            red = bbox((r > 0.6) & (g < 0.4) & (b < 0.4))
            blue = bbox((b > 0.6) & (r < 0.4) & (g < 0.4))
            out.append(torch.tensor([red, blue] if i % 2 == 0 else [blue, red]))
        time.sleep(0.005 * len(out))
        return out

    def keypoints(x):
        return [torch.zeros((4, 2)) for _ in range(x.shape[0])]

    return detector, keypoints
