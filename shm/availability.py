"""Which bytes of a video segment have arrived, at fixed chunk granularity.

Fetchers write ranges in any order and from several processes; the decoder must read
only bytes that are in. One flag byte per chunk (set once, never cleared) needs no
lock: each chunk has exactly one writer at a time. A futex word in the header wakes
blocked readers within microseconds of a write.

Ranges handed to writers start on chunk boundaries, so a chunk is complete exactly
when a writer has passed its end (or the end of the file).

A body whose length the server did not say (chunked transfer, no Content-Length) gets a
map of ``ENGINE_MAX_BYTES`` whose ``length`` is unknown until its writer calls ``end``;
readers then see end of file there.
"""
from __future__ import annotations

import struct

import numpy as np

from engine.shm.block import SharedBlock
from engine.shm.futex import Cancelled, FutexWord, wait_until

CHUNK = 64 * 1024
_HEADER = 64
_LIVE, _CANCELLED = 0, 1
UNKNOWN = (1 << 64) - 1     # the length, until the writer has seen the end of the body


class AvailabilityMap:
    def __init__(self, block: SharedBlock):
        self.block = block
        self.size, self.chunk = struct.unpack_from("<QQ", block.mm, 8)
        self.n_chunks = -(-self.size // self.chunk)
        self._flags = np.frombuffer(block.mm, np.uint8, self.n_chunks, _HEADER)
        self._state = np.frombuffer(block.mm, np.uint32, 1, 4)
        self._length = np.frombuffer(block.mm, np.uint64, 1, 24)
        self._word = FutexWord(block.mm, 0)

    @classmethod
    def create(cls, name: str, size: int, chunk: int = CHUNK,
               length_known: bool = True) -> "AvailabilityMap":
        """``size`` bytes; with ``length_known=False`` that is only the most the body
        may have (see ``end``)."""
        block = SharedBlock.create(name, _HEADER + -(-size // chunk))
        struct.pack_into("<QQQ", block.mm, 8, size, chunk, size if length_known else UNKNOWN)
        return cls(block)

    @property
    def length(self) -> int | None:
        """The body's length: ``size``, or None while a body of unknown length arrives."""
        n = int(self._length[0])
        return None if n == UNKNOWN else n

    def end(self, length: int) -> None:
        """A body of unknown length ended after ``length`` bytes (all of them marked):
        readers see end of file there."""
        if length % self.chunk:
            self._flags[length // self.chunk] = 1
        self._length[0] = length
        self._word.bump()

    @classmethod
    def attach(cls, name: str) -> "AvailabilityMap":
        return cls(SharedBlock.attach(name))

    @property
    def name(self) -> str:
        return self.block.name

    # -- writers -------------------------------------------------------------------
    def mark(self, offset: int, end: int) -> None:
        """Bytes [offset, end) are written: flag every chunk they complete, wake readers."""
        first = -(-offset // self.chunk)
        last = self.n_chunks if end >= self.size else end // self.chunk
        if last > first:
            self._flags[first:last] = 1
            self._word.bump()

    def cancel(self) -> None:
        """Make every current and future ``wait`` raise ``Cancelled``."""
        self._state[0] = _CANCELLED
        self._word.bump()

    # -- readers -------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return bool(self._state[0] == _CANCELLED)

    def _chunks(self, offset: int, length: int) -> tuple[int, int]:
        end = min(offset + length, self.size)
        return offset // self.chunk, -(-end // self.chunk)

    def present(self, offset: int, length: int) -> bool:
        first, last = self._chunks(offset, length)
        return bool(self._flags[first:last].all())

    def first_missing(self, offset: int = 0, length: int | None = None) -> int | None:
        """Offset of the first absent chunk in the range, or None when all is in."""
        first, last = self._chunks(offset, self.size if length is None else length)
        holes = np.flatnonzero(self._flags[first:last] == 0)
        return None if holes.size == 0 else (first + int(holes[0])) * self.chunk

    def missing(self, offset: int, end: int) -> int:
        """About how many bytes of [offset, end) have not arrived (whole chunks)."""
        first, last = self._chunks(offset, end - offset)
        return int(np.count_nonzero(self._flags[first:last] == 0)) * self.chunk

    def bytes_present(self) -> int:
        n = int(np.count_nonzero(self._flags))
        if n and self._flags[-1]:
            n -= 1
            return n * self.chunk + (self.size - (self.n_chunks - 1) * self.chunk)
        return n * self.chunk

    def complete(self) -> bool:
        return bool(self._flags.all())

    def wait(self, offset: int, length: int, timeout: float | None = None) -> bool:
        """Block until bytes [offset, offset+length) are in, or the body is known to end
        before them (the caller reads ``length`` again). False on timeout; raises
        ``Cancelled`` if the map is cancelled meanwhile."""
        first, last = self._chunks(offset, length)
        flags, known, end = self._flags, self._length, min(offset + length, self.size)
        return wait_until(self._word, lambda: flags[first:last].all() or known[0] < end,
                          lambda: self._state[0] == _CANCELLED, timeout)

    def close(self) -> None:
        self._flags = self._state = self._length = None
        self._word.release()
        self.block.close()

    def unlink(self) -> None:
        self.block.unlink()
