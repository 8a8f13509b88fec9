"""The byte-range plan of one job: what to fetch next, and in which order.

Order is what the decoder needs: the moov box first when it sits at the end of the
file, then ascending offsets. Pieces are chunk-aligned (see ``shm.availability``) and
at most ``ENGINE_RANGE_MB`` long; a decoder blocked on an offset moves that piece to
the front; a piece that failed half-way goes back to the front as its remainder.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from shm.availability import CHUNK


RAMP_MIN = 2 * CHUNK


def align_down(offset: int) -> int:
    return offset - offset % CHUNK


@dataclass
class Piece:
    offset: int
    end: int
    attempt: int = 0
    not_before: float = 0.0      # retry back-off


class RangePlan:
    def __init__(self, size: int, range_bytes: int):
        self.size = size
        self.range_bytes = range_bytes
        self.pending: deque[Piece] = deque()
        self.inflight: dict[int, Piece] = {}     # by offset
        self.planned_until = 0                   # [0, planned_until) is planned
        self.extra: list[tuple[int, int]] = []   # planned regions beyond it (the moov)

    def _pieces(self, start: int, end: int) -> list[Piece]:
        """Pieces grow with their offset (128 KiB at 128 KiB, 256 KiB at 256 KiB, ... up to
        ``range_bytes``): the first frames' bytes then arrive over several connections at
        once instead of at one connection's rate, while later pieces stay large."""
        out = []
        while start < end:
            size = min(self.range_bytes, max(RAMP_MIN, start - start % CHUNK))
            stop = min(end, start + size)
            out.append(Piece(start, stop))
            start = stop
        return out

    def extend(self, until: int) -> None:
        """Plan everything up to ``until`` (ascending, after what is already pending)."""
        until = min(-(-until // CHUNK) * CHUNK, self.size)   # whole chunks: see module doc
        start = self.planned_until
        for lo, hi in self.extra:     # skip a region that is already planned urgently
            if start < hi and lo < until:
                self.pending.extend(self._pieces(start, lo))
                start = max(start, hi)
        if start < until:
            self.pending.extend(self._pieces(start, until))
        self.planned_until = max(self.planned_until, until)

    def urgent(self, start: int, end: int) -> None:
        """Plan ``[start, end)`` ahead of everything (the moov box at the end)."""
        start = align_down(start)
        if start < self.planned_until:
            start = self.planned_until
        if start >= end:
            return
        self.extra.append((start, end))
        for piece in reversed(self._pieces(start, end)):
            self.pending.appendleft(piece)

    def raise_to_front(self, offset: int) -> bool:
        for piece in self.pending:
            if piece.offset <= offset < piece.end:
                self.pending.remove(piece)
                self.pending.appendleft(piece)
                return True
        return False

    def next(self) -> Piece | None:
        now = time.monotonic()
        for piece in self.pending:
            if piece.not_before <= now:
                self.pending.remove(piece)
                self.inflight[piece.offset] = piece
                return piece
        return None

    def done(self, offset: int) -> None:
        self.inflight.pop(offset, None)

    def retry(self, offset: int, written: int, backoff: float) -> Piece:
        piece = self.inflight.pop(offset)
        rest = Piece(max(piece.offset, align_down(written)), piece.end, piece.attempt + 1,
                     time.monotonic() + backoff)
        self.pending.appendleft(rest)
        return rest

    def requeue(self, offset: int) -> None:
        """The fetcher holding this piece died: fetch it again, first."""
        piece = self.inflight.pop(offset, None)
        if piece is not None:
            self.pending.appendleft(piece)

    def drop_pending(self) -> None:
        self.pending.clear()

    @property
    def finished(self) -> bool:
        return not self.pending and not self.inflight

    def regions(self) -> list[tuple[int, int]]:
        """The planned byte regions, sorted and merged."""
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted([(0, self.planned_until)] + self.extra):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            elif hi > lo:
                merged.append((lo, hi))
        return merged
