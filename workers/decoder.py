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
import threading
import time

import numpy as np

from engine.config import Config
from engine.errors import SelectionError, first_line
from engine.messages import (BatchReady, DecodeDone, DecodeJob, EndJob, NeedBytes, RingReady,
                             Shutdown, StreamInfo)
from engine.shm import AvailabilityMap, Cancelled, FrameRing, SharedBlock
from engine.selection import Picker, Selection, pick
from engine.shm.ring import SlotRun
from engine.workers.base import Link, worker_setup
from engine.workers.frames import SLICE_S, Lanes, Numbers, Stopped, frames_of

log = logging.getLogger("engine.decoder")

STALL_WAIT_S = 0.002  # a read that is not satisfied this fast counts as a stall
TICK_S = 1.0          # waits are cut into pieces this long, each a sign of life (Link.tick)
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


class Batcher:
    """Frames -> ring slots -> batch descriptors: the first frame alone, then a ramp."""

    def __init__(self, link: Link, job: DecodeJob, ring: FrameRing):
        self.link, self.job, self.ring = link, job, ring
        self.first = None
        self.numbers: list[int] = []
        self.frames = 0
        # a batch may never need more slots than the ring can give while others are busy
        self.batch = max(1, min(job.batch, ring.slots // 2))

    def slot(self) -> tuple[int, np.ndarray]:
        """A free slot for the next frame (blocks while the ring is full)."""
        slot = self.ring.reserve(TICK_S)
        while slot is None:        # the GPU worker has not freed a slot yet: still alive
            self.link.tick()
            slot = self.ring.reserve(TICK_S)
        if self.numbers and slot != self.first + len(self.numbers):
            self.flush()  # the ring wrapped: batches stay contiguous
        if not self.numbers:
            self.first = slot
        return slot, self.ring.frames[slot]

    def add(self, number: int) -> None:
        self.numbers.append(number)
        self.frames += 1
        # Batches ramp up 1, 1, 2, 4, 8 ... to the batch size: the model starts on the
        # first frame and, while it works on a batch, the decoder fills one twice its size,
        # instead of the model waiting for a whole batch right after the first frame.
        if len(self.numbers) >= min(self.batch, max(1, self.frames - len(self.numbers))):
            self.flush()

    def flush(self) -> None:
        if not self.numbers:
            return
        run = SlotRun(self.first, len(self.numbers))
        self.ring.publish(run)
        self.link.send(BatchReady(job=self.job.job, first_slot=run.first, count=run.count,
                                  frame_numbers=self.numbers, decoded_at=time.monotonic()))
        self.numbers = []


class SegmentReader:
    """A seekable, blocking file over the segment, for PyAV's custom IO.

    ``read`` returns only bytes that have arrived; past ``readable_end`` (bytes that a
    partial job never fetches) it reports end of file, except inside the moov box.
    """

    def __init__(self, link: Link, job: DecodeJob, block: SharedBlock, amap: AvailabilityMap,
                 on_stall, stop: threading.Event | None = None):
        self.link, self.job, self.mm, self.amap = link, job, block.mm, amap
        self.size = job.size
        self.pos = 0
        self.on_stall = on_stall
        self.stop = stop          # a lane's: its waits give up once it is set
        self._asked = -1

    def _limit(self, pos: int) -> int:
        if self.job.moov is not None:
            moov_start, moov_end = self.job.moov
            if moov_start <= pos < moov_end:
                return moov_end
        return min(self.job.readable_end, self.size) if pos < self.job.readable_end else pos

    def _region(self, pos: int) -> tuple[bool, int]:
        """Sparse jobs: whether ``pos`` lies in a fetched region, and where that region or
        the unfetched gap around it ends. A gap's bytes belong to packets that are
        demuxed but never decoded: they read as zeros."""
        for lo, hi in self.job.regions:
            if lo <= pos < hi:
                return True, hi
            if pos < lo:
                return False, lo
        return False, self.size

    def read(self, n: int = -1) -> bytes:
        limit = self._limit(self.pos)
        if self.job.spans is not None:
            fetched, until = self._region(self.pos)
            if not fetched:
                end = min(until, self.size) if n < 0 else min(self.pos + n, until, self.size)
                out = bytes(max(0, end - self.pos))
                self.pos = max(self.pos, end)
                return out
            limit = min(limit, until)
        end = limit if n < 0 else min(self.pos + n, limit)
        while True:
            length = self.amap.length      # None until a body of unknown length ends
            if length is not None:
                end = min(end, length)
            if end <= self.pos:
                return b""
            if self.wait(self.pos, end):
                break
        data = self.mm[self.pos:end]
        self.pos = end
        return data

    def wait(self, start: int, end: int) -> bool:
        """Until [start, end) is in: True; False when the body ended before ``end``."""
        if self.amap.present(start, end - start):
            return True
        if not self.amap.wait(start, end - start, STALL_WAIT_S):
            self.on_stall()
            missing = self.amap.first_missing(start, end - start)
            if missing is not None and missing // (1 << 20) != self._asked:
                self._asked = missing // (1 << 20)
                self.link.send(NeedBytes(job=self.job.job, offset=missing))
            while not self.amap.wait(start, end - start, self._slice()):
                self._tick()       # waiting for the network is progress, not a stall
        return self.amap.present(start, end - start)

    def _slice(self) -> float:
        return TICK_S if self.stop is None else SLICE_S

    def _tick(self) -> None:
        self.link.tick()
        if self.stop is not None and self.stop.is_set():
            raise Stopped("the job's decode ended")

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self.pos = offset
        elif whence == os.SEEK_CUR:
            self.pos += offset
        elif whence == os.SEEK_END:
            self.pos = self._length() + offset
        else:
            return -1
        return self.pos

    def _length(self) -> int:
        """The file's length; a body of unknown length has one once it has all arrived."""
        while self.amap.length is None:
            if not self.amap.wait(self.size - 1, 1, self._slice()):
                self._tick()       # waiting for the network is progress, not a stall
        return self.amap.length

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return self.job.seekable


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
        frames, self.held = {**self.held, number: frame}, {number: frame}
        return [(n, frames[n]) for n in self.picker.offer(number, t)]

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


def decode_pyav(link: Link, job: DecodeJob, block, amap, ring) -> DecodeDone:
    """FFmpeg probes the container itself (MP4, Matroska, WebM, MPEG-TS, ...): what the
    engine knows about the file only planned the fetch. ``ring`` is None for a streamed
    job: it is asked for once the picture size is known."""
    import av

    def reader(stop=None):
        # a lane's reader leaves the batcher to the thread that owns it
        on_stall = (lambda: None) if stop else (lambda: batcher and batcher.flush())
        return SegmentReader(link, job, block, amap, on_stall, stop)

    batcher = None
    lanes = None
    limit = job.frame_limit       # a partial job's cap; the table's count is only expected
    done: set[int] = set()
    error = None
    after = -1 if job.resume_after is None else job.resume_after
    passed = 0                    # frames an earlier decoder of the job delivered
    numbers = Numbers()
    try:
        sel = Selection.of(**job.selection) if job.selection else None
        wanted = job.selected
        if sel is not None and sel.needs_count:
            try:
                wanted = pick(sel, frame_times(job, reader))
            except SelectionError as exc:
                return _no_frames(job, str(exc))
        choice = Choice(sel, wanted)
        container = av.open(reader(), mode="r")
    except av.error.FFmpegError as exc:
        return _no_frames(job, f"not a video FFmpeg can read ({first_line(exc)})")
    try:
        stream = pick_stream(container, job.stream_index)
        if stream is None:
            return _no_frames(job, "no video track in the file")
        stream.thread_type = "AUTO"
        if ring is None:
            ctx = stream.codec_context
            if not ctx.width or not ctx.height:
                return _no_frames(job, f"the {ctx.name} video has no picture size")
            ring = ask_ring(link, job, StreamInfo(
                job=job.job, codec=ctx.name, width=ctx.width, height=ctx.height,
                fps=float(stream.average_rate) if stream.average_rate else None))
            if ring is None:
                return _no_frames(job, "cancelled")
        batcher = Batcher(link, job, ring)
        height, width = ring.height, ring.width

        def rgb(frame) -> np.ndarray:
            if frame.width == width and frame.height == height:
                return rgb24(frame)
            return rgb24(frame, width, height)

        def put(number, image) -> None:
            nonlocal passed
            if number <= after:
                passed += 1
                choice.chosen.add(number)
                return
            _, dest = batcher.slot()
            dest[...] = image if isinstance(image, np.ndarray) else rgb(image)
            batcher.add(number)
            done.add(number)
            choice.chosen.add(number)

        keep = set(job.keep) if job.keep is not None else None
        last = -1                     # the number of the last frame out
        base = float(stream.time_base) if stream.time_base else 0.0
        first_time = None
        try:
            if _lanes_pay(job) and choice.wanted is not None:
                lanes = _lanes(job, reader, keep, choice.wanted, rgb, ring.frame_bytes, link)
                frames = lanes.merged(batcher.flush)
            else:
                frames = frames_of(container, stream, numbers, job.spans, keep, link.tick)
            for number, frame in frames:
                if limit is not None and number >= limit:
                    break
                last = number
                if isinstance(frame, np.ndarray):     # a lane's: wanted, converted
                    put(number, frame)
                else:
                    t = frame.pts * base if frame.pts is not None and base else float(number)
                    first_time = t if first_time is None else first_time
                    for n, f in choice.offer(number, frame, t - first_time):
                        put(n, f)
                if (limit is not None and len(done) >= limit) or choice.done:
                    break
            for n, f in choice.finish():
                put(n, f)
        except (av.error.FFmpegError, EOFError) as exc:
            # what was decoded stays decoded: the report keeps it and names the rest
            error = (f"decoding stopped after {len(done)} frames: {first_line(exc)}" if done
                     else f"cannot decode the {stream.codec_context.name} video: {first_line(exc)}")
        finally:
            if lanes is not None:
                lanes.close()
        batcher.flush()
    finally:
        container.close()
        if ring is not None and job.ring is None:
            ring.close()
    if choice.wanted is not None or choice.picker is not None:
        missing, why = choice.missing(done, last)
        error = error or why
    else:
        expected = job.expected if limit is None else min(limit, job.expected or limit)
        if expected is None:      # streamed: only gaps below the last frame are known
            expected = max(done) + 1 if done else 0
        missing = sorted(set(range(expected)) - done)
    missing = [n for n in missing if n > after]   # the earlier decoders' gaps are known
    if not done and not passed and error is None:
        error = "no frame could be decoded (corrupt or unsupported video)"
    decoded = lanes.decoded if lanes is not None else numbers.decoded
    return DecodeDone(job=job.job, frames=len(done), missing=missing, error=error,
                      decoded=decoded)


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
