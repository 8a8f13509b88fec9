"""Decoder process: frames out of a segment that is still being filled.

It starts once the moov box is in (the supervisor says so with a ``DecodeJob``) and
reads the segment through the availability map, blocking only on the bytes it needs
next, so decoding runs at the pace of the download instead of after it. Frames go into
the job's frame ring; each batch descriptor goes to the supervisor, which forwards it
to the GPU worker. The first batch leaves with one frame (early first result); later
ones double up to ``ENGINE_BATCH``, or leave early when decoding has to wait for bytes.

A sparse job (a selection planned on the sample table) decodes only the GOP spans that
hold its frames, skips the unselected non-reference frames in them, and decodes spans
that lie apart in several threads at once (``engine.workers.frames``).

A decoder backend that crashes (decord can segfault on bad input) takes down only this
process; the supervisor starts a new decoder, which goes on with the job after the last
frame this one handed on (``engine.resume``).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from engine.config import Config
from engine.errors import SelectionError, first_line
from engine.messages import DecodeDone, DecodeJob, EndJob, RingReady, Shutdown, StreamInfo
from engine.shm import AvailabilityMap, Cancelled, FrameRing, SharedBlock
from engine.selection import Picker, Selection, pick
from engine.workers.base import Link, worker_setup
from engine.workers.frames import Lanes, Numbers, frames_of
from engine.workers.segment import Batcher, SegmentReader

log = logging.getLogger("engine.decoder")

# swscale's threads for yuv420p -> rgb24 (ENGINE_SWS_THREADS, set at process start).
# PyAV's default (0: one per CPU) fights FFmpeg's frame threads for the cores; one thread
# gives the same pixels sooner (docs/performance.md, "One swscale thread").
SWS_THREADS = 1
# A sparse job's GOP spans decoded at once (ENGINE_DECODE_LANES, set at process start),
# each lane running at most this many bytes of converted frames ahead of the merge.
LANES = 2
LANE_BYTES = 64 << 20


def rgb24(frame, width: int | None = None, height: int | None = None) -> np.ndarray:
    """The frame as HxWx3 RGB, as every PyAV path of the engine and its bench converts."""
    return frame.to_ndarray(format="rgb24", width=width, height=height, threads=SWS_THREADS)


STILL = {"mjpeg", "png", "gif", "bmp", "tiff"}


def pick_stream(container, index: int | None = None):
    """The video: the planned track when the planner named one, else the first real
    video stream; never an attached picture or a still-image track (cover art). The
    planner (``engine.mp4.parse_moov``) applies the same rule. (FFmpeg marks the first
    track of a kind as default, cover art included, so "default" would pick the picture.)"""
    import av

    candidates = [s for s in container.streams.video
                  if not s.disposition & av.stream.Disposition.attached_pic]
    real = [s for s in candidates if s.codec_context.name not in STILL and s.frames != 1] \
        or [s for s in candidates if s.codec_context.name not in STILL] or candidates
    for s in real:
        if s.index == index:
            return s
    return real[0] if real else None


class Choice:
    """Which decoded frames go out: all, the planned selection's indices, or what a
    ``Picker`` decides as a streamed decode goes (it may hold a frame back: ``fps``)."""

    def __init__(self, sel: Selection | None, wanted=None):
        self.wanted = set(wanted) if wanted is not None else None
        self.picker = Picker(sel) if sel is not None and self.wanted is None else None
        self.sel = sel
        self.held = {}               # the frame on screen, while the picker decides it
        self.chosen: set[int] = set()

    def offer(self, number: int, frame, t: float) -> list:
        if self.wanted is not None:
            return [(number, frame)] if number in self.wanted else []
        if self.picker is None:
            return [(number, frame)]
        held, self.held = self.held, {number: frame}
        return [(n, frame if n == number else held[n]) for n in self.picker.offer(number, t)]

    def finish(self) -> list:
        if self.picker is None:
            return []
        return [(n, self.held[n]) for n in self.picker.finish()]

    @property
    def done(self) -> bool:
        if self.wanted is not None:
            return self.chosen >= self.wanted
        return self.picker is not None and self.picker.done

    def missing(self, done: set[int], last: int) -> tuple[list[int], str | None]:
        """Selected frames not delivered, and why when the video ended before them."""
        if self.wanted is not None:
            return sorted(self.wanted - done), None
        if self.sel is not None and self.sel.frames is not None:
            lost = sorted(set(self.sel.frames) - done)
            past = [i for i in lost if i > last]
            if past:
                return lost, (f"frame index {past[-1]} is past the video's last frame "
                              f"(it has {last + 1} frames)")
            return lost, None
        return [], None


def frame_times(job: DecodeJob, reader_factory) -> list[float]:
    """A first pass over a streamed file: every shown frame's time, in presentation
    order (what a ``count`` selection needs before it can pick)."""
    import av

    with av.open(reader_factory(), mode="r") as container:
        stream = pick_stream(container, job.stream_index)
        if stream is None:
            return []
        base = float(stream.time_base) if stream.time_base else 0.0
        pts = sorted(p.pts for p in container.demux(stream)
                     if p.pts is not None and p.pts >= 0 and p.size)
    return [(p - pts[0]) * base for p in pts] if pts else []


class PyavDecode:
    """One job decoded with PyAV: FFmpeg probes the container itself (MP4, Matroska, WebM,
    MPEG-TS, ...): what the engine knows about the file only planned the fetch. ``ring``
    is None for a streamed job: it is asked for once the picture size is known."""

    def __init__(self, link: Link, job: DecodeJob, block, amap, ring):
        self.link, self.job, self.block, self.amap, self.ring = link, job, block, amap, ring
        self.batcher: Batcher | None = None
        self.numbers = Numbers()
        self.lanes: Lanes | None = None
        self.done: set[int] = set()
        self.after = -1 if job.resume_after is None else job.resume_after
        self.passed = 0               # frames an earlier decoder of the job delivered
        self.last = -1                # the number of the last frame out

    def reader(self, stop=None) -> SegmentReader:
        # a lane's reader leaves the batcher to the thread that owns it
        on_stall = (lambda: None) if stop else (lambda: self.batcher and self.batcher.flush())
        return SegmentReader(self.link, self.job, self.block, self.amap, on_stall, stop)

    def run(self) -> DecodeDone:
        import av

        job = self.job
        try:
            sel = Selection.of(**job.selection) if job.selection else None
            wanted = job.selected
            if sel is not None and sel.needs_count:
                wanted = pick(sel, frame_times(job, self.reader))
            self.choice = Choice(sel, wanted)
            container = av.open(self.reader(), mode="r")
        except SelectionError as exc:
            return _no_frames(job, str(exc))
        except av.error.FFmpegError as exc:
            return _no_frames(job, f"not a video FFmpeg can read ({first_line(exc)})")
        try:
            stream = pick_stream(container, job.stream_index)
            refusal = "no video track in the file" if stream is None else self._ready(stream)
            if refusal:
                return _no_frames(job, refusal)
            error = self._deliver(container, stream)
        finally:
            container.close()
            if self.ring is not None and job.ring is None:
                self.ring.close()
        return self._outcome(error)

    def _ready(self, stream) -> str | None:
        """The ring (a streamed job asks for it now) and the batcher; or why not."""
        stream.thread_type = "AUTO"
        if self.ring is None:
            ctx = stream.codec_context
            if not ctx.width or not ctx.height:
                return f"the {ctx.name} video has no picture size"
            self.ring = ask_ring(self.link, self.job, StreamInfo(
                job=self.job.job, codec=ctx.name, width=ctx.width, height=ctx.height,
                fps=float(stream.average_rate) if stream.average_rate else None))
            if self.ring is None:
                return "cancelled"
        self.batcher = Batcher(self.link, self.job, self.ring)
        return None

    def rgb(self, frame) -> np.ndarray:
        height, width = self.ring.height, self.ring.width
        if frame.width == width and frame.height == height:
            return rgb24(frame)
        return rgb24(frame, width, height)

    def _put(self, number: int, image) -> None:
        self.choice.chosen.add(number)
        if number <= self.after:
            self.passed += 1
            return
        _, dest = self.batcher.slot()
        dest[...] = image if isinstance(image, np.ndarray) else self.rgb(image)
        self.batcher.add(number)
        self.done.add(number)

    def _frames(self, container, stream):
        """``(number, frame)``, or ``(number, RGB array)`` where lanes converted it."""
        job, keep = self.job, set(self.job.keep) if self.job.keep is not None else None
        if _lanes_pay(job) and self.choice.wanted is not None:
            self.lanes = _lanes(job, self.reader, keep, self.choice.wanted, self.rgb,
                                self.ring.frame_bytes, self.link)
            return self.lanes.merged(self.batcher.flush)
        return frames_of(container, stream, self.numbers, job.spans, keep, self.link.tick)

    def _deliver(self, container, stream) -> str | None:
        """Every chosen frame into the ring, in order; an error stops it, keeping what
        was decoded (the report keeps it and names the rest)."""
        import av

        limit, choice = self.job.frame_limit, self.choice
        base = float(stream.time_base) if stream.time_base else 0.0
        first_time = None
        error = None
        try:
            for number, frame in self._frames(container, stream):
                if limit is not None and number >= limit:
                    break
                self.last = number
                if isinstance(frame, np.ndarray):     # a lane's: chosen, converted
                    self._put(number, frame)
                else:
                    t = frame.pts * base if frame.pts is not None and base else float(number)
                    first_time = t if first_time is None else first_time
                    for n, f in choice.offer(number, frame, t - first_time):
                        self._put(n, f)
                if (limit is not None and len(self.done) >= limit) or choice.done:
                    break
            for n, f in choice.finish():
                self._put(n, f)
        except (av.error.FFmpegError, EOFError) as exc:
            error = (f"decoding stopped after {len(self.done)} frames: {first_line(exc)}"
                     if self.done else
                     f"cannot decode the {stream.codec_context.name} video: {first_line(exc)}")
        finally:
            if self.lanes is not None:
                self.lanes.close()
        self.batcher.flush()
        return error

    def _outcome(self, error: str | None) -> DecodeDone:
        job, choice, done, limit = self.job, self.choice, self.done, self.job.frame_limit
        if choice.wanted is not None or choice.picker is not None:
            missing, why = choice.missing(done, self.last)
            error = error or why
        else:
            expected = job.expected if limit is None else min(limit, job.expected or limit)
            if expected is None:      # streamed: only gaps below the last frame are known
                expected = max(done) + 1 if done else 0
            missing = sorted(set(range(expected)) - done)
        missing = [n for n in missing if n > self.after]   # earlier decoders' gaps are known
        if not done and not self.passed and error is None:
            error = "no frame could be decoded (corrupt or unsupported video)"
        decoded = self.lanes.decoded if self.lanes is not None else self.numbers.decoded
        return DecodeDone(job=job.job, frames=len(done), missing=missing, error=error,
                          decoded=decoded)


def decode_pyav(link: Link, job: DecodeJob, block, amap, ring) -> DecodeDone:
    return PyavDecode(link, job, block, amap, ring).run()


def _lanes_pay(job: DecodeJob) -> bool:
    """Lanes pay where the spans are apart: each lane demuxes the whole file, and spans
    that cover most of it give a second lane little to do alone (docs/performance.md,
    "Decode lanes")."""
    if LANES < 2 or job.spans is None or len(job.spans) < 2 or not job.expected:
        return False
    return 2 * sum(last - first + 1 for first, last in job.spans) <= job.expected


def _lanes(job: DecodeJob, reader, keep, wanted: set, rgb, frame_bytes: int,
           link: Link) -> Lanes:
    """The spans in ``LANES`` threads, each with its own reader and container."""
    import av

    def open_stream(stop):
        container = av.open(reader(stop), mode="r")
        stream = pick_stream(container, job.stream_index)
        stream.thread_type = "AUTO"
        return container, stream

    def convert(number, frame):
        return rgb(frame) if number in wanted else None

    depth = max(2, min(job.batch, LANE_BYTES // frame_bytes))
    return Lanes(open_stream, job.spans, keep, min(LANES, len(job.spans)), convert, depth,
                 link.tick)


def ask_ring(link: Link, job: DecodeJob, info: StreamInfo):
    """Send the picture size, wait for the ring the supervisor makes for it."""
    link.send(info)
    while True:
        msg = link.recv()
        if isinstance(msg, Shutdown):
            os._exit(0)
        if isinstance(msg, RingReady) and msg.job == job.job:
            return FrameRing.attach(msg.ring) if msg.ring else None
        if isinstance(msg, EndJob) and msg.job == job.job:
            return None


def _no_frames(job: DecodeJob, error: str) -> DecodeDone:
    return DecodeDone(job=job.job, frames=0, missing=[], error=error)


def decode_decord(link: Link, job: DecodeJob, block, amap, ring) -> DecodeDone:
    import decord

    batcher = Batcher(link, job, ring)
    reader = SegmentReader(link, job, block, amap, batcher.flush)
    # decord cannot stream: bytes written into the file after VideoReader opened it are
    # not seen (it decodes zeros -- "Invalid NAL unit size" -- just past what was present
    # at open, however far behind the arrival front it reads). So it opens once every
    # byte the job uses is in; PyAV is the streaming backend.
    for lo, hi in job.regions:
        reader.wait(lo, hi)
    vr = decord.VideoReader(block.path, ctx=decord.cpu(0))
    shape = vr[0].shape[:2] if len(vr) else (ring.height, ring.width)
    if shape != (ring.height, ring.width):
        # decord applies the rotation metadata; the frames of the file (a plain decode,
        # PyAV) are as coded. Refuse rather than give other pixels than PyAV would.
        return _no_frames(job, (
            f"decord cannot take this input: it gives {shape[1]}x{shape[0]} frames for a "
            f"{ring.width}x{ring.height} video (rotation metadata); ENGINE_DECODER=auto "
            "or pyav decodes it"))
    limit = min(len(vr), job.frame_limit or len(vr))
    numbers = job.selected if job.selected is not None else list(range(limit))
    i = 0
    while i < len(numbers):
        take = numbers[i:i + (1 if i == 0 else job.batch)]
        frames = vr.get_batch(take).asnumpy()
        for k, number in enumerate(take):
            _, dest = batcher.slot()
            dest[...] = frames[k]
            batcher.add(number)
        i += len(take)
    batcher.flush()
    del vr
    if job.selected is not None:
        return DecodeDone(job=job.job, frames=len(numbers), missing=[], error=None)
    expected = min(job.expected or limit, job.frame_limit or limit) if job.expected else limit
    return DecodeDone(job=job.job, frames=limit, missing=list(range(limit, expected)), error=None)


BACKENDS = {"pyav": decode_pyav, "decord": decode_decord}


def run_job(link: Link, job: DecodeJob) -> DecodeDone:
    block = SharedBlock.attach(job.segment)
    amap = AvailabilityMap.attach(job.amap)
    ring = FrameRing.attach(job.ring) if job.ring else None
    backend = job.backend if ring is not None else "pyav"   # only PyAV can stream
    try:
        return BACKENDS[backend](link, job, block, amap, ring)
    except Cancelled:
        return _no_frames(job, "cancelled")
    except Exception as exc:
        if isinstance(exc.__context__, Cancelled) or amap.cancelled:
            return _no_frames(job, "cancelled")
        return _no_frames(job, f"{backend} cannot decode the video: {first_line(exc)}")
    finally:
        if ring is not None:
            ring.close()
        amap.close()
        block.close()


def main(conn, config: Config, index: int = 0) -> None:
    global SWS_THREADS, LANES
    worker_setup(f"decoder{index}", config.log_level)
    SWS_THREADS, LANES = config.sws_threads, config.decode_lanes
    import av  # noqa: F401  (imported now, not on the first job's critical path)
    link = Link(conn, "decoder")
    link.start(sws_threads=SWS_THREADS)
    while True:
        msg = link.recv()
        if isinstance(msg, Shutdown):
            os._exit(0)
        if isinstance(msg, DecodeJob):
            link.send(run_job(link, msg))
