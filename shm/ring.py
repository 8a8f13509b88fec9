"""A ring of frame slots in shared memory between the decoder and the GPU worker.

One producer (the decoder of a job) and one consumer (the GPU worker), so each slot's
state byte has a single writer at a time and needs no lock:
FREE -> WRITING (producer reserved it) -> WRITTEN (published in a batch) -> FREE
(consumer released it). A full ring blocks the producer: backpressure, never a drop.
The producer cursor lives in the header, so a restarted producer continues
(``reclaim`` frees what the dead one held).

Slots are handed out in order and batches never wrap, so a batch is always a
contiguous run of slots and the consumer gets it as one zero-copy numpy view.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from engine.shm.block import SharedBlock
from engine.shm.futex import FutexWord, wait_until

FREE, WRITING, WRITTEN = 0, 1, 2
_HEADER = 4096  # word, state, slots, height, width, cursor; then slot states; frames page-aligned
_CANCELLED = 1


@dataclass(frozen=True)
class SlotRun:
    """A contiguous run of ring slots: what a batch descriptor carries."""
    first: int
    count: int

    @property
    def stop(self) -> int:
        return self.first + self.count


class FrameRing:
    def __init__(self, block: SharedBlock):
        self.block = block
        self.slots, self.height, self.width = struct.unpack_from("<III", block.mm, 8)
        self._word = FutexWord(block.mm, 0)
        self._state = np.frombuffer(block.mm, np.uint32, 1, 4)
        self._cursor = np.frombuffer(block.mm, np.uint32, 1, 20)
        self._slot_state = np.frombuffer(block.mm, np.uint8, self.slots, 64)
        self.frames = np.frombuffer(block.mm, np.uint8, self.slots * self.frame_bytes,
                                    _HEADER).reshape(self.slots, self.height, self.width, 3)

    @property
    def frame_bytes(self) -> int:
        return self.height * self.width * 3

    @staticmethod
    def bytes_for(slots: int, height: int, width: int) -> int:
        return _HEADER + slots * height * width * 3

    @classmethod
    def create(cls, name: str, slots: int, height: int, width: int) -> "FrameRing":
        if not 0 < slots <= _HEADER - 64:
            raise ValueError(f"slots must be in 1..{_HEADER - 64}")
        block = SharedBlock.create(name, cls.bytes_for(slots, height, width))
        struct.pack_into("<III", block.mm, 8, slots, height, width)
        return cls(block)

    @classmethod
    def attach(cls, name: str) -> "FrameRing":
        return cls(SharedBlock.attach(name))

    @property
    def name(self) -> str:
        return self.block.name

    # -- producer ------------------------------------------------------------------
    def reserve(self, timeout: float | None = None) -> int | None:
        """Wait for the slot at the cursor to be free and take it; None on timeout.
        Raises ``Cancelled`` when the ring is cancelled."""
        slot = int(self._cursor[0])
        states = self._slot_state
        if not wait_until(self._word, lambda: states[slot] == FREE,
                          lambda: self._state[0] == _CANCELLED, timeout):
            return None
        states[slot] = WRITING
        self._cursor[0] = (slot + 1) % self.slots
        return slot

    def publish(self, run: SlotRun) -> None:
        self._slot_state[run.first:run.stop] = WRITTEN

    # -- consumer ------------------------------------------------------------------
    def view(self, run: SlotRun) -> np.ndarray:
        """Zero-copy ``[count, H, W, 3]`` uint8 view of the run's frames."""
        return self.frames[run.first:run.stop]

    def release(self, run: SlotRun) -> None:
        self._slot_state[run.first:run.stop] = FREE
        self._word.bump()

    def states(self) -> np.ndarray:
        return self._slot_state.copy()

    # -- owner -----------------------------------------------------------------------
    def reset(self) -> None:
        """Make a finished job's ring new again for the next job (the owner reuses rings:
        reserving a ring's worth of /dev/shm is slow on the critical path)."""
        self._slot_state[:] = FREE
        self._cursor[0] = 0
        self._state[0] = 0

    def reclaim(self, keep=()) -> None:
        """Its producer died or was stopped mid-job (none is attached now): the slots it
        reserved or published that the consumer does not hold (the runs in ``keep``)
        are free again, and a cancelled ring takes frames again."""
        held = np.zeros(self.slots, bool)
        for run in keep:
            held[run.first:run.stop] = True
        self._slot_state[~held] = FREE
        self._state[0] = 0
        self._word.bump()

    # -- both ----------------------------------------------------------------------
    def cancel(self) -> None:
        self._state[0] = _CANCELLED
        self._word.bump()

    def close(self) -> None:
        self.frames = self._slot_state = self._state = self._cursor = None
        self._word.release()
        self.block.close()

    def unlink(self) -> None:
        self.block.unlink()
