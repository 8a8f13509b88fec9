"""The byte-range plan of one job: what to fetch next, and in which order.

Order is what the decoder needs: the moov box first when it sits at the end of the
file, then ascending offsets. A decoder blocked on an offset moves that offset to the
front; a piece that failed half-way goes back to the front as its remainder.

Pending bytes are kept as regions and a piece is cut from the front region when a
connection is free, so its size can follow the state of the download:
- near the start pieces grow with their offset (128 KiB at 128 KiB, 256 KiB at 256 KiB,
  ...): the first frames' bytes arrive over several connections at once;
- after that a piece is the bytes still to come (pending, and what in-flight pieces
  still lack) divided by the connections, at most ``ENGINE_RANGE_MB``: connections
  finish at about the same time, instead of one last large range running alone while
  the others idle.
Pieces start on chunk boundaries (see ``shm.availability``).

A server that answers a range with the whole file (``200``) turns the plan to one body:
that body brings every byte, so nothing more is cut or asked for (``take_whole``).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from engine.shm.availability import CHUNK

RAMP_MIN = 2 * CHUNK


def align_down(offset: int) -> int:
    return offset - offset % CHUNK


def align_up(offset: int) -> int:
    return -(-offset // CHUNK) * CHUNK


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
        self.pending: deque[Piece] = deque()     # regions, in fetch order
        self.inflight: dict[int, Piece] = {}     # by offset
        self.planned_until = 0                   # [0, planned_until) is planned
        self.extra: list[tuple[int, int]] = []   # planned regions beyond it (the moov)
        self.single = False                      # one body brings every byte: no more ranges
        self.whole: int | None = None            # the request reading that body, in flight

    def extend(self, until: int) -> None:
        """Plan everything up to ``until`` (ascending, after what is already pending)."""
        until = min(align_up(until), self.size)
        start = self.planned_until
        for lo, hi in self.extra:     # skip a region that is already planned urgently
            if start < hi and lo < until:
                if start < lo:
                    self._add(Piece(start, lo))
                start = max(start, hi)
        if start < until:
            self._add(Piece(start, until))
        self.planned_until = max(self.planned_until, until)

    def _add(self, piece: Piece, first: bool = False) -> None:
        """The one place ``pending`` grows: with one body bringing every byte, nothing
        more is asked."""
        if not self.single:
            (self.pending.appendleft if first else self.pending.append)(piece)

    def urgent(self, start: int, end: int) -> None:
        """Plan ``[start, end)`` ahead of everything (the moov box at the end)."""
        start = max(align_down(start), self.planned_until)
        if start >= end:
            return
        self.extra.append((start, end))
        self._add(Piece(start, end), first=True)

    def add(self, start: int, end: int) -> None:
        """Plan ``[start, end)`` too, after what is pending (a span of a sparse selection);
        the parts already planned are not asked again."""
        start, end = align_down(start), min(align_up(end), self.size)
        for lo, hi in self.regions():
            if start >= end:
                return
            if hi <= start or lo >= end:
                continue
            if lo > start:
                self._add_piece(start, lo)
            start = max(start, hi)
        if start < end:
            self._add_piece(start, end)

    def _add_piece(self, start: int, end: int) -> None:
        self.extra.append((start, end))
        self._add(Piece(start, end))

    def raise_to_front(self, offset: int) -> bool:
        for region in self.pending:
            if region.offset <= offset < region.end:
                cut = max(region.offset, align_down(offset))
                self.pending.remove(region)
                self.pending.appendleft(Piece(cut, region.end, region.attempt, region.not_before))
                if cut > region.offset:
                    self.pending.insert(1, Piece(region.offset, cut, region.attempt,
                                                 region.not_before))
                return True
        return False

    def _size(self, start: int, slots: int, missing) -> int:
        # Share of the bytes not yet fetched: pending, and what in-flight pieces still
        # have to bring (``missing``; whole pieces without it).
        outstanding = sum(r.end - r.offset for r in self.pending)
        outstanding += sum(missing(p) for p in self.inflight.values())
        balanced = -(-outstanding // max(1, slots))
        ramp = max(RAMP_MIN, align_down(start))
        return align_up(max(RAMP_MIN, min(self.range_bytes, ramp, balanced)))

    def next(self, slots: int = 1, missing=lambda p: p.end - p.offset) -> Piece | None:
        """Cut the next piece for a free connection (``slots``: connections in all;
        ``missing(piece)``: bytes of an in-flight piece not yet arrived)."""
        now = time.monotonic()
        for region in self.pending:
            if region.not_before > now:
                continue
            size = self._size(region.offset, slots, missing)
            if self.single or region.end - region.offset <= size + RAMP_MIN:
                self.pending.remove(region)
                piece = region
            else:
                piece = Piece(region.offset, region.offset + size, region.attempt)
                region.offset += size
            self.inflight[piece.offset] = piece
            return piece
        return None

    def take_whole(self, offset: int) -> bool:
        """The request at ``offset`` was answered with the whole file: whether to read it.
        The first such body is read (to the end of the file) and, from then on, no range
        is cut; any other is dropped (only that body's retry is read)."""
        if self.single and self.whole != offset:
            return False
        piece = self.inflight.get(offset)
        self.single, self.whole = True, offset
        self.pending.clear()
        self.inflight[offset] = Piece(0, self.size, piece.attempt if piece else 0)
        return True

    def done(self, offset: int) -> None:
        if offset == self.whole:
            self.whole = None
        self.inflight.pop(offset, None)

    def retry(self, offset: int, written: int, backoff: float) -> Piece:
        piece = self.inflight.pop(offset)
        rest = Piece(max(piece.offset, align_down(written)), piece.end, piece.attempt + 1,
                     time.monotonic() + backoff)
        if offset == self.whole:
            self.whole = rest.offset
        self.pending.appendleft(rest)
        return rest

    def requeue(self, offset: int) -> None:
        """The fetcher holding this piece died: fetch it again, first (with one body
        bringing every byte, only that body)."""
        piece = self.inflight.pop(offset, None)
        if piece is not None and (not self.single or offset == self.whole):
            if offset == self.whole:      # the body's resend goes out at its piece's offset
                self.whole = piece.offset
            self.pending.appendleft(piece)

    def truncate(self, size: int) -> None:
        """A body of unknown length ended at ``size``: nothing past it exists."""
        self.size = size
        self.planned_until = min(self.planned_until, size)
        self.extra = [(lo, min(hi, size)) for lo, hi in self.extra if lo < size]
        for piece in self.inflight.values():
            piece.end = min(piece.end, size)

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


def fetch_end(backend: str, need_end, limit: int, size: int) -> int:
    """How far a partial job must fetch so that ``backend`` can output ``limit`` frames.

    PyAV reads exactly what the frames need. decord's open probes FFmpeg's probesize
    (5,000,000 bytes) and its demuxer reads ahead of the frames asked for, taking absent
    bytes for zeros; the margin below covers that read-ahead.
    """
    end = int(need_end[limit - 1])
    if backend == "decord":
        ahead = int(need_end[min(len(need_end) - 1, limit - 1 + 48)])
        end = max(end, ahead + (2 << 20), 5_000_000)
    return min(end, size)
