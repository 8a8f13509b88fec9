"""The shared memory of the jobs in flight: admission, the segments, frame rings and
output blocks, and the pool of finished rings.

The pipeline decides what a job does next; this decides whether it fits, and is the one
place that creates or unlinks a segment or reads how much of /dev/shm is free. What is
in use is counted from the blocks held, never kept in step by hand. ``free`` is
injectable so a test can give it a small budget without a real /dev/shm of that size.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

from engine.config import Config
from engine.shm import (AvailabilityMap, FrameRing, SharedBlock, ShmError, ShmFullError,
                        segment_name)
from engine.shm.block import free_bytes, unlink_block

log = logging.getLogger("engine.supervisor")

RING_POOL = 2          # finished rings kept per frame size
SMALL_RING = 4 << 20   # a few frames: what a job alone may start with (the ring shrinks at the moov)
OUTPUT_MAX_BYTES = 1 << 40   # a streamed job's output block, reserved only as frames fill it
ADMITTED, WAIT = "admitted", "wait"


class Memory:
    def __init__(self, config: Config, free: Callable[[], int] = free_bytes):
        self.config = config
        self.free = free
        self.held: dict[int, object] = {}       # job id -> the job whose segment exists
        self.reserved: dict[int, int] = {}      # job id -> bytes held for its ring until moov
        self.pool: dict[tuple, list] = {}       # (slots, height, width) -> idle rings
        self.outputs: dict[str, tuple] = {}     # output block -> (its client, its size)
        self.warned_small_ring = False

    # ------------------------------------------------------------------ counting
    @property
    def videos(self) -> int:
        return sum(job.video_bytes() for job in self.held.values())

    @property
    def in_use(self) -> int:
        """The engine's blocks in /dev/shm: the jobs', the idle pooled rings and the frames
        kept for clients to take."""
        pooled = sum(ring.block.size for rings in self.pool.values() for ring in rings)
        kept = sum(size for _, size in self.outputs.values())
        return pooled + kept + sum(job.shm_bytes() for job in self.held.values())

    @property
    def busy(self) -> bool:
        return bool(self.reserved or self.in_use)

    def room(self, need: int = 0) -> int:
        """Bytes a new block may take in /dev/shm now (other programs use it too), less
        what admitted jobs hold for rings they have yet to create. Idle pooled rings are
        given back when they stand in the way."""
        if self.free() - sum(self.reserved.values()) < need:
            self.drop_pool()
        return self.free() - sum(self.reserved.values())

    # ------------------------------------------------------------------ admission
    def admit(self, job_id: int, size: int) -> str:
        """Room for a video of ``size`` (ENGINE_MAX_BYTES for the videos of all jobs in
        flight) and a frame ring: ADMITTED (its ring's room held until the moov), WAIT
        (other jobs hold the memory), or why it cannot fit even alone."""
        ring = self.config.ring_bytes
        room = self.room(size + ring)
        busy = self.busy
        if self.videos + size <= self.config.max_bytes and \
                (size + ring <= room or (not busy and size + SMALL_RING <= room)):
            self.reserved[job_id] = min(ring, room - size)
            return ADMITTED
        if busy:
            return WAIT
        return (f"the video ({size / 1e6:.0f} MB) and its frames do not fit in the "
                f"{max(room, 0) / 1e6:.0f} MB of shared memory free (/dev/shm; a container "
                "needs a larger --shm-size)")

    def back(self, size: int) -> bool:
        """Worth fetching a waiting job's head again: its video would be admitted now."""
        if not self.busy:
            return True    # alone: admitted with what there is, or failed clearly
        need = size + self.config.ring_bytes
        return self.videos + size <= self.config.max_bytes and need <= self.room(need)

    # ------------------------------------------------------------------ blocks
    def create_segment(self, job) -> None:
        """The video's segment and availability map (``ShmError`` if they cannot be)."""
        name = segment_name(os.getpid(), job.id)
        job.segment = SharedBlock.create(name, job.size, reserve=job.segment_bytes)
        job.amap = AvailabilityMap.create(name + ".map", job.size,
                                          length_known=not job.unknown_length)
        self.held[job.id] = job

    def create_ring(self, job, height: int, width: int) -> None:
        """The job's frame ring, an idle pooled one of its shape if there is one
        (``ShmError`` if there is no room)."""
        self.reserved.pop(job.id, None)   # the ring itself is counted from now on
        slots = self._ring_slots(height, width)
        pooled = self.pool.get((slots, height, width))
        if pooled:
            job.ring = pooled.pop()
            job.ring.reset()
        else:
            try:
                job.ring = FrameRing.create(segment_name(os.getpid(), job.id, ".ring"),
                                            slots, height, width)
            except ShmError as exc:
                if "--shm-size" in str(exc):
                    raise
                raise type(exc)(f"{exc}; a container needs a larger --shm-size") from None
        self.held[job.id] = job

    def _ring_slots(self, height: int, width: int) -> int:
        """Two batches of frames, bounded by ENGINE_RING_MB and what was reserved for the
        ring at admission; smaller (the decoder's batches shrink with it) when memory is
        tight. ``ShmFullError`` when not even two frames fit."""
        cfg = self.config
        if cfg.ring_slots:
            return cfg.ring_slots
        want = 2 * cfg.batch
        frame = height * width * 3
        room = min(cfg.ring_bytes, self.room(FrameRing.bytes_for(want, height, width)))
        fit = (room - FrameRing.bytes_for(0, height, width)) // frame
        if fit >= want:
            return want
        if fit < 2:
            raise ShmFullError(f"no room in shared memory for the frames of a {width}x{height}"
                               " video (/dev/shm; a container needs a larger --shm-size)")
        if not self.warned_small_ring:
            self.warned_small_ring = True
            log.warning("shared memory is tight: a %dx%d frame ring gets %d slots (%.0f MB), "
                        "batches shrink to %d frames; give the engine more /dev/shm "
                        "(docker run --shm-size=1g) or raise ENGINE_RING_MB", width, height,
                        fit, fit * frame / 1e6, fit // 2)
        return int(fit)

    def create_output(self, job, height: int, width: int, most: int | None) -> None:
        """Engine.frames: the block the selected frames go into, all reserved when their
        count is known (planned), else reserved as they come (streamed)."""
        frame = height * width * 3
        # streamed, the decode goes one frame past ENGINE_MAX_SELECTED to refuse the job
        count = job.frames_selected or (most + 1 if most is not None else None)
        size = frame * count if count else OUTPUT_MAX_BYTES // frame * frame
        try:
            job.output = SharedBlock.create(segment_name(os.getpid(), job.id, ".out"), size,
                                            reserve=size if job.frames_selected else frame)
        except ShmError as exc:
            raise ShmError(f"no room in shared memory for the {count or ''} selected frames "
                           f"({exc}; a container needs a larger --shm-size)") from None

    # ------------------------------------------------------------------ giving back
    def release(self, job, clean: bool) -> None:
        """The job ended: its blocks go. After a ``clean`` end its ring is kept for the
        next job of the same frame size, and its output block for its client."""
        keep = self._poolable(job.ring) if clean and job.outstanding == 0 else None
        for shared in (job.amap, job.ring):
            if shared is not None and shared is not keep:
                shared.cancel()
        self.held.pop(job.id, None)
        self.reserved.pop(job.id, None)
        if keep is not None:
            self.pool[(keep.slots, keep.height, keep.width)].append(keep)
        for shared in (job.segment, job.amap, job.ring):
            if shared is not None and shared is not keep:
                shared.unlink()
                shared.close()
        job.segment = job.amap = job.ring = None
        if job.output is not None:   # kept for its client to copy out (ReleaseFrames)
            if clean and job.client is not None:
                self.outputs[job.output.name] = (job.client, job.output.size)
            else:
                job.output.unlink()
            job.output.close()
            job.output = None

    def _poolable(self, ring):
        if ring is None:
            return None
        return ring if len(self.pool.setdefault((ring.slots, ring.height, ring.width), [])) \
            < RING_POOL else None

    def release_output(self, client, name: str) -> None:
        """A client copied its frames out (or went away): the block goes."""
        if name in self.outputs and (client is None or self.outputs[name][0] is client):
            del self.outputs[name]
            unlink_block(name)

    def release_outputs_of(self, client) -> None:
        for name, (owner, _) in list(self.outputs.items()):
            if owner is client:
                self.release_output(client, name)

    def drop_pool(self) -> None:
        """Give back the idle pooled rings (a job needs their room)."""
        for rings in self.pool.values():
            for ring in rings:
                ring.unlink()
                ring.close()
            rings.clear()

    def close(self) -> None:
        """The engine stops: give back the pooled rings and frames nobody took."""
        self.drop_pool()
        for name in list(self.outputs):
            self.release_output(None, name)
