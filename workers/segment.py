"""The decoder's two ends: a file over the job's segment while it is still being filled
(``SegmentReader``), and frames into ring slots out as batch descriptors (``Batcher``).
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from engine.messages import BatchReady, DecodeJob, NeedBytes
from engine.shm import AvailabilityMap, FrameRing, SharedBlock
from engine.shm.ring import SlotRun
from engine.workers.base import Link
from engine.workers.frames import SLICE_S, Stopped

STALL_WAIT_S = 0.002  # a read that is not satisfied this fast counts as a stall
TICK_S = 1.0          # waits are cut into pieces this long, each a sign of life (Link.tick)


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
