"""GPU worker process: frame batches from the ring through the processor.

It loads processors once (the engine's default at start, others on first use) and
keeps them, because model loading costs far more than a job. On a CPU device the
processor sees a zero-copy tensor over the ring slots; on CUDA the batch is copied
through a pinned staging buffer on a side stream, and the slots are released as soon
as the copy is done, so the decoder can refill them while the model runs.
"""
from __future__ import annotations

import logging
import os
import traceback

from engine.config import Config
from engine.messages import BatchReady, BatchResults, EndJob, GpuJob, Shutdown
from engine import processors
from shm import FrameRing, ShmError
from shm.ring import SlotRun
from workers.base import Link, worker_setup

log = logging.getLogger("engine.gpu")


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} requested but torch sees no CUDA device")
    return device


class Staging:
    """Pinned host buffers and a copy stream for host-to-device transfers."""

    def __init__(self, device):
        import torch
        self.torch = torch
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.buffers = {}

    def upload(self, view):
        torch = self.torch
        shape = tuple(view.shape)
        buf = self.buffers.get(shape[1:])
        if buf is None or buf.shape[0] < shape[0]:
            buf = self.buffers[shape[1:]] = torch.empty(
                (max(shape[0], 16),) + shape[1:], dtype=torch.uint8).pin_memory()
        host = buf[:shape[0]]
        host.copy_(torch.from_numpy(view))
        with torch.cuda.stream(self.stream):
            frames = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(done)
        return frames


class GpuWorker:
    def __init__(self, link: Link, config: Config, device):
        import torch
        self.torch = torch
        self.link = link
        self.device = device
        self.processors: dict[str, object] = {}
        self.rings: dict[int, FrameRing] = {}
        self.job_processor: dict[int, str] = {}
        self.staging = Staging(device) if device.type == "cuda" else None
        self.default = config.processor

    def processor(self, spec: str):
        proc = self.processors.get(spec)
        if proc is None:
            proc = self.processors[spec] = processors.load(spec, self.device)
        return proc

    def handle(self, msg) -> None:
        if isinstance(msg, GpuJob):
            self.job_processor[msg.job] = msg.processor
            try:
                self.rings[msg.job] = FrameRing.attach(msg.ring)
            except ShmError:
                pass
        elif isinstance(msg, BatchReady):
            self.run_batch(msg)
        elif isinstance(msg, EndJob):
            ring = self.rings.pop(msg.job, None)
            self.job_processor.pop(msg.job, None)
            if ring is not None:
                ring.close()

    def run_batch(self, msg: BatchReady) -> None:
        ring = self.rings.get(msg.job)
        if ring is None:
            return  # the job ended meanwhile
        run = SlotRun(msg.first_slot, msg.count)
        spec = self.job_processor.get(msg.job, self.default)
        reply = BatchResults(msg.job, run.first, run.count, msg.frame_numbers, [])
        released = False
        try:
            proc = self.processor(spec)
            view = ring.view(run)
            if self.staging is not None:
                frames = self.staging.upload(view)
                ring.release(run)   # the copy is done: the decoder may refill these slots
                released = True
            else:
                frames = self.torch.from_numpy(view)
            with self.torch.inference_mode():
                results = proc(frames, list(msg.frame_numbers))
            results = list(results)
            if len(results) != run.count:
                raise ValueError(f"returned {len(results)} results for {run.count} frames")
            reply.results = results
        except Exception as exc:
            log.debug("processor failed: %s", traceback.format_exc())
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            reply.error = f"processor {spec} failed: {type(exc).__name__}: {text}"
        finally:
            if not released:
                ring.release(run)
        self.link.send(reply)


def main(conn, config: Config, index: int = 0) -> None:
    worker_setup("gpu", config.log_level)
    link = Link(conn, "gpu")
    info = {}
    try:
        device = resolve_device(config.device)
        worker = GpuWorker(link, config, device)
        worker.processor(config.processor)
        info = {"device": str(device)}
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        link.start(error=f"cannot start the GPU worker: {text}")
        os._exit(3)
    link.start(**info)
    while True:
        msg = link.recv()
        if isinstance(msg, Shutdown):
            os._exit(0)
        worker.handle(msg)
