"""GPU worker process: frame batches from the ring through the processor.

It loads processors once (the engine's default at start, others on first use) and
keeps them, because model loading costs far more than a job. On a CPU device the
processor sees a zero-copy tensor over the ring slots; on CUDA the batch is copied
through pinned staging buffers on a side stream, and the slots are released as soon
as the host copy is done, so the decoder can refill them while the model runs; batches
are handled two deep, so the device copy of batch k+1 overlaps the processing of k.

Per-video processors (``begin(video)``, see ``engine.processors``) get one handler per
job, made when the job arrives. Batches reach the worker in each job's frame order (the
decoder sends them in order over one relay), so a handler sees its frames in order and
only its own; after a handler fails it is not called again.
"""
from __future__ import annotations

import json
import logging
import os
import traceback
from dataclasses import dataclass

from engine.config import Config
from engine.errors import first_line
from engine.messages import (BatchReady, BatchResults, EndJob, EndVideo, GpuJob, Shutdown,
                             VideoEnded)
from engine import processors
from engine.shm import FrameRing, ShmError
from engine.shm.ring import SlotRun
from engine.workers.base import Link, worker_setup

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
    """Two pinned host buffers used in turn, and a copy stream: the copy of batch k+1 to
    the device runs while the processor works on batch k (see ``main``)."""

    def __init__(self, device):
        import torch
        self.torch = torch
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.buffers = [None, None]
        self.events = [None, None]
        self.turn = 0

    def upload(self, view):
        """Copy ``view`` (ring slots) into pinned memory, then start the device copy.
        Returns the device tensor and the event its copy completes."""
        torch = self.torch
        i, self.turn = self.turn, self.turn ^ 1
        n, shape = view.shape[0], tuple(view.shape[1:])
        buf = self.buffers[i]
        if buf is None or tuple(buf.shape[1:]) != shape or buf.shape[0] < n:
            buf = self.buffers[i] = torch.empty((max(n, 16),) + shape, dtype=torch.uint8,
                                                pin_memory=True)
        elif self.events[i] is not None:
            self.events[i].synchronize()   # its previous copy must be done before reuse
        host = buf[:n]
        host.copy_(torch.from_numpy(view))
        with torch.cuda.stream(self.stream):
            frames = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.events[i] = done
        return frames, done


@dataclass
class JobState:
    """What the worker holds for one job."""
    spec: str
    ring: FrameRing | None = None
    handler: object = None       # per-video processor: begin()'s handler, until end/close
    error: str | None = None     # the processor failed on this job: the job's answer


@dataclass
class Staged:
    """A batch on its way to the processor."""
    msg: BatchReady
    ring: FrameRing
    run: SlotRun
    state: JobState
    frames: object = None
    copied: object = None        # CUDA event: the device copy is done
    released: bool = False
    error: str | None = None


class GpuWorker:
    def __init__(self, link: Link, config: Config, device):
        import torch
        self.torch = torch
        self.link = link
        self.device = device
        self.processors: dict[str, object] = {}
        self.jobs: dict[int, JobState] = {}
        self.staging = Staging(device) if device.type == "cuda" else None
        self.default = config.processor

    def processor(self, spec: str):
        proc = self.processors.get(spec)
        if proc is None:
            proc = self.processors[spec] = processors.load(spec, self.device)
        return proc

    def handle(self, msg) -> None:
        {GpuJob: self.start_job, EndVideo: self.end_video, EndJob: self.end_job}[type(msg)](msg)

    def end_job(self, msg: EndJob) -> None:
        state = self.jobs.pop(msg.job, None)
        if state is None:
            return
        if state.handler is not None:   # the job failed or was cancelled
            close = getattr(state.handler, "close", None)
            state.handler = None
            if callable(close):
                try:
                    close()
                except Exception:
                    log.warning("processor %s: close() failed: %s", state.spec,
                                traceback.format_exc())
        if state.ring is not None:
            state.ring.close()

    def start_job(self, msg: GpuJob) -> None:
        state = self.jobs[msg.job] = JobState(msg.processor or self.default)
        try:
            state.ring = FrameRing.attach(msg.ring)
        except ShmError:
            pass   # the job ended meanwhile
        try:
            proc = self.processor(state.spec)
            if callable(getattr(proc, "begin", None)):
                state.handler = proc.begin(processors.Video(**msg.video))
                if not callable(state.handler):
                    raise TypeError("begin(video) did not return a callable handler")
        except Exception as exc:
            state.error = self._failed(state.spec, exc)

    def end_video(self, msg: EndVideo) -> None:
        state = self.jobs.get(msg.job)
        value = error = None
        if state is None:
            error = "the GPU worker has no such job (restarted?)"
        elif state.error:
            error = state.error
        elif state.handler is not None:
            handler, state.handler = state.handler, None
            try:
                with self.torch.inference_mode():
                    value = handler.end()
                json.dumps(value)     # fail here, clearly, rather than in the report's writer
            except Exception as exc:
                value, error = None, self._failed(state.spec, exc, "end()")
        self.link.send(VideoEnded(job=msg.job, value=value, error=error))

    @staticmethod
    def _failed(spec: str, exc: Exception, where: str = "") -> str:
        log.debug("processor failed: %s", traceback.format_exc())
        return (f"processor {spec}{' ' + where if where else ''} failed: "
                f"{type(exc).__name__}: {first_line(exc)}")

    def stage(self, msg: BatchReady) -> Staged | None:
        """First half of a batch: get its frames onto the device (CUDA: start the copy
        and free the ring slots at once; CPU: a zero-copy view of the slots)."""
        state = self.jobs.get(msg.job)
        if state is None or state.ring is None:
            return None  # the job ended meanwhile
        staged = Staged(msg, state.ring, SlotRun(msg.first_slot, msg.count), state)
        if state.error:
            return staged
        try:
            view = state.ring.view(staged.run)
            if self.staging is not None:
                staged.frames, staged.copied = self.staging.upload(view)
                state.ring.release(staged.run)   # in pinned memory now: the decoder may refill
                staged.released = True
            else:
                staged.frames = self.torch.from_numpy(view)
        except Exception as exc:
            staged.error = first_line(exc)
        return staged

    def finish(self, staged: Staged) -> None:
        """Second half: run the processor (the job's handler, if per-video) and send the
        results."""
        msg, run, state = staged.msg, staged.run, staged.state
        results, error = [], None
        try:
            if state.error:
                error = state.error
                return
            if staged.error:
                raise RuntimeError(staged.error)
            proc = state.handler or self.processor(state.spec)
            frames = staged.frames
            if staged.copied is not None:
                stream = self.torch.cuda.current_stream(self.device)
                stream.wait_event(staged.copied)
                frames.record_stream(stream)
            with self.torch.inference_mode():
                results = list(proc(frames, list(msg.frame_numbers)))
            if len(results) != run.count:
                raise ValueError(f"returned {len(results)} results for {run.count} frames")
        except Exception as exc:
            results, error = [], self._failed(state.spec, exc)
            if state.handler is not None:
                state.error = error   # a failed handler is not called again
        finally:
            if not staged.released:
                staged.ring.release(run)
            self.link.send(BatchResults(job=msg.job, first_slot=run.first, count=run.count,
                                        frame_numbers=msg.frame_numbers, results=results,
                                        error=error, per_video=state.handler is not None))


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
        link.start(error=f"cannot start the GPU worker: {first_line(exc)}")
        os._exit(3)
    link.start(**info)
    # Two batches deep: a staged batch is processed once the next one has been staged
    # (its device copy then overlaps this processing) or as soon as nothing else waits.
    pending: Staged | None = None
    while True:
        if pending is not None and not conn.poll(0):
            worker.finish(pending)
            pending = None
            continue
        msg = link.recv()
        if isinstance(msg, Shutdown):
            os._exit(0)
        if isinstance(msg, BatchReady):
            staged = worker.stage(msg)
            if pending is not None:
                worker.finish(pending)
            pending = staged
        else:
            # An ended job's staged batch is dropped, not run: after a cancel the model
            # must be free for the next job at once.
            ended = isinstance(msg, EndJob) and pending is not None and msg.job == pending.msg.job
            if pending is not None and not ended:
                worker.finish(pending)
            pending = None
            worker.handle(msg)
