"""Locating a job's moov and choosing its way through: planned or streamed.

Planned: the sample table is read, so only the bytes of the wanted frames are fetched
and the decoder knows every frame in advance. Streamed: what cannot be planned (not
MP4, no moov, a fragmented file, a body without ranges) is fetched front to back and
decoded as it arrives, its frame count learned by decoding.

The pipeline asks after each event that brought bytes; the answer is an outcome it acts
on (``Stream``, ``Refuse``, ``PLANNED``, or None: wait for more bytes). Nothing here
sends or creates anything: it reads the bytes that arrived and fills in the job's plan.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from engine import mp4
from engine.config import Config
from engine.errors import ErrorKind, SelectionError
from engine.job import Job, Phase
from engine.plan import fetch_end
from engine.selection import byte_regions, gop_spans, pick

log = logging.getLogger("engine.supervisor")

HTML_TYPES = ("text/html", "application/xhtml+xml")
PROBE_BYTES = 64 * 1024  # a partial job reads this much at a header past the head


def sparse_decode(track, chosen) -> tuple[list, list[int]]:
    """What a decoder needs for the ``chosen`` presentation indices: the decode-index spans
    that output them, and their own decode indices (the frames it must not skip)."""
    chosen = np.asarray(chosen, dtype=np.int64)
    order = track.presentation_order()
    return gop_spans(track.keyframes, order, track.pts, chosen), order[chosen].tolist()


@dataclass(frozen=True)
class Stream:
    """The job is to be streamed, for this reason."""
    why: str
    seekable: bool = True


@dataclass(frozen=True)
class Refuse:
    """The job ends with this error."""
    kind: ErrorKind
    why: str


PLANNED = "planned"     # the sample table is read and the plan made: on to the ring


def looks_like_html(head: bytes) -> bool:
    """An error or landing page where a video was expected (whatever its Content-Type)."""
    text = bytes(head[:512]).lstrip().lower()
    return text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml"))


def head_refusal(msg, max_bytes: int) -> Refuse | None:
    """What the head's answer (``HeadInfo``) says against the job, if anything."""
    if msg.size is not None and msg.size > max_bytes:
        return Refuse(ErrorKind.FETCH, f"file is {msg.size} bytes, over the limit of "
                      f"{max_bytes} (ENGINE_MAX_BYTES)")
    if msg.size == 0:
        return Refuse(ErrorKind.FETCH, "empty file (the server sent 0 bytes)")
    # Content-Type is only a hint (text/plain, octet-stream or none may carry a video);
    # an HTML page is what a server sends instead of one, and is refused.
    kind = msg.content_type.split(";")[0].strip().lower()
    if kind in HTML_TYPES or looks_like_html(msg.prefix):
        return Refuse(ErrorKind.DECODE, "server sent "
                      f"{msg.content_type.split(';')[0] or 'an HTML page'}, not a video")
    return None


def needs_seeking(prefix: bytes) -> bool:
    """An MP4 whose mdat comes before its moov cannot be read front to back (FFmpeg
    needs the moov before the samples): its decoder may seek, and waits for the end
    of a body of unknown length where it seeks there."""
    try:
        return mp4.walk(mp4.reader_of(prefix), 1 << 62).layout == "end"
    except mp4.NotMP4:
        return False


def present_reader(job: Job):
    """``read`` for ``mp4.walk`` over the bytes of the segment that have arrived."""
    mm, amap = job.segment.mm, job.amap
    return lambda pos, n: bytes(mm[pos:pos + n]) if amap.present(pos, n) else None


def selected_refusal(job: Job, most: int | None) -> Refuse | None:
    if most is not None and job.frames_selected is not None and job.frames_selected > most:
        return Refuse(ErrorKind.SELECTION, f"the job selects {job.frames_selected} frames, "
                      f"over the limit of {most} (ENGINE_MAX_SELECTED)")
    return None


def choose_streamed(job: Job, why: str, seekable: bool, most: int | None) -> Refuse | None:
    """Set the job on the streamed way: fetch front to back, let FFmpeg probe and decode
    while the bytes arrive."""
    n = min(512, job.size)
    head = bytes(job.segment.mm[:n]) if job.amap.present(0, n) else b""
    if looks_like_html(head):
        return Refuse(ErrorKind.DECODE, "server sent an HTML page, not a video")
    log.info("%s: streamed, not planned (%s)", job.url, why)
    if why.startswith("truncated file"):
        job.truncated = why
    job.to(Phase.STREAMED)
    job.way, job.moov, job.moov_layout, job.track = "streamed", None, None, None
    job.plan.extend(job.size)
    job.linear = not seekable
    job.frame_limit = job.max_frames if job.selection.everything else None
    if most is not None and job.selection.everything:
        # its count is learned by decoding: stop one past the limit, then refuse
        job.frame_limit = min(job.frame_limit or most + 1, most + 1)
    job.readable_end = job.size
    return None


class Locator:
    """Walks a job's box headers as its bytes arrive and plans what to fetch next."""

    def __init__(self, config: Config, backend: str):
        self.config = config
        self.backend = backend

    def after_head(self, job: Job, prefix=None):
        """Walk the box headers and plan the remaining ranges: from the first bytes of the
        head as soon as they arrive (``prefix``, in ``HeadInfo``), else from the whole head.
        What cannot be planned (not MP4, no moov, a fragmented file) is streamed."""
        if job.phase is not Phase.HEAD:
            return None
        final = prefix is None
        try:
            found = mp4.walk(present_reader(job) if final else mp4.reader_of(prefix), job.size)
        except mp4.NotMP4 as exc:
            return Stream(str(exc))
        if found.moov is None and found.need is not None and not final:
            return None                 # the prefix says too little: wait for the head
        if found.moov is not None:
            return self._found_moov(job, found)
        if found.need is None:
            return Stream("no moov box")
        # The next header lies past the head (a long mdat or free box): fetch from there
        # first -- all of the rest for a full job, which needs it anyway.
        job.to(Phase.LOCATING)
        job.moov_layout = found.layout
        end = job.size if not job.partial else min(job.size, found.need + PROBE_BYTES)
        job.plan.urgent(found.need, end)
        job.probed_until = end
        if not job.partial:
            job.plan.extend(job.size)
        return None

    def on_bytes(self, job: Job):
        """More bytes are in: read the moov once it is all there, and plan."""
        if job.phase is not Phase.LOCATING:
            return None
        if job.moov is None:
            return self._walk_on(job) if job.head_done else None
        start, end = job.moov
        if not job.amap.present(start, end - start):
            return None
        job.mark("moov_ready")
        try:
            # parsed once: it is kept while the boxes after the moov are awaited
            track = job.track or mp4.parse_moov(memoryview(job.segment.mm)[start:end])
        except mp4.NotMP4 as exc:
            return Stream(str(exc))
        why = self._why_not_planned(job, track)
        if why and why is not mp4.NOT_YET:
            # seekable, FFmpeg would visit every fragment's header before the first frame,
            # i.e. wait for nearly the whole file: it is read front to back
            return Stream(why, seekable=False)
        job.track = track
        return None if why is mp4.NOT_YET else self._plan(job, track)

    def _walk_on(self, job: Job):
        """More bytes are in while the moov is still unknown: walk the headers again."""
        try:
            found = mp4.walk(present_reader(job), job.size)
        except mp4.NotMP4 as exc:
            return Stream(str(exc))
        if found.moov is not None:
            return self._found_moov(job, found)
        if found.need is None:
            return Stream("no moov box")
        if job.partial and found.need >= job.probed_until:
            job.probed_until = min(job.size, found.need + PROBE_BYTES)
            job.plan.urgent(found.need, job.probed_until)
        return None

    def _found_moov(self, job: Job, found):
        if job.phase is Phase.HEAD:
            job.to(Phase.LOCATING)
        moov = found.moov
        job.moov_layout = found.layout
        job.moov = (moov.offset, moov.offset + moov.size)
        if found.layout == "end":
            job.plan.urgent(max(moov.offset, job.probed_until), job.moov[1])
            if not job.partial:
                job.plan.extend(moov.offset)
        else:
            job.plan.extend(job.moov[1] if job.partial else job.size)
        return self.on_bytes(job)

    def _why_not_planned(self, job: Job, track) -> str | None:
        """``mp4.why_not_planned`` on the boxes here; while it is not yet known, the next
        box header after the moov is fetched first."""
        try:
            found = mp4.walk(present_reader(job), job.size)
        except mp4.NotMP4 as exc:
            return str(exc)
        why = mp4.why_not_planned(track, found)
        if why is mp4.NOT_YET:
            if found.need >= job.probed_until:
                job.probed_until = min(job.size, found.need + PROBE_BYTES)
                job.plan.urgent(found.need, job.probed_until)
            job.plan.raise_to_front(found.need)
        return why

    def _plan(self, job: Job, track):
        """The sample table is read: which frames, and the bytes that hold them."""
        job.to(Phase.PLANNED)
        data_end = int((track.offsets + track.sizes).max())
        if data_end > job.size:
            # decode what is there; the report names the frames past the end
            job.truncated = (f"truncated file: it ends at byte {job.size} but its frames "
                             f"need {data_end} bytes")
        limit = self._frame_limit(job, track)
        job.frame_limit = limit
        job.readable_end = job.size
        if limit and (limit < track.frame_count or job.max_frames is not None):
            # The decoder sees end-of-file exactly at a sample boundary (a cut inside the
            # next sample would hand it a truncated packet); the plan rounds up to chunks.
            job.readable_end = fetch_end(self.backend, track.need_end(), limit, job.size)
            job.plan.extend(job.readable_end)
        if limit == 0:
            return Refuse(ErrorKind.DECODE, "no frame fits the partial download limit")
        if not job.selection.everything:
            refused = self._plan_selection(job, track, limit)
            if refused:
                return refused
        job.frames_selected = len(job.selected) if job.selected is not None else limit
        return selected_refusal(job, self.config.max_selected) or PLANNED

    @staticmethod
    def _frame_limit(job: Job, track) -> int:
        limit = track.frame_count
        if job.max_frames is not None and job.selection.everything:
            limit = min(limit, job.max_frames)    # else it caps what the selection picks
        if job.partial_mb is not None:
            budget = int(job.partial_mb * 1024 * 1024)
            limit = min(limit, int((track.need_end() <= budget).sum()))
        return limit

    def _plan_selection(self, job: Job, track, limit: int) -> Refuse | None:
        """Pick the selected frames from the sample table and plan only the bytes of the
        GOPs that hold them (PyAV; decord reads the whole file and picks by index)."""
        order = track.presentation_order()
        pts = track.pts[order]
        times = (pts - pts[0]) / track.timescale if track.timescale else np.arange(len(pts))
        try:
            chosen = pick(job.selection, times)
        except SelectionError as exc:
            return Refuse(ErrorKind.SELECTION, str(exc))
        chosen = chosen[chosen < limit]
        if len(chosen) == 0:
            return Refuse(ErrorKind.SELECTION, f"the selection holds no frame of this video "
                          f"({track.frame_count} frames over {times[-1]:.2f} s)")
        job.selected = [int(i) for i in chosen]
        job.frame_limit = None
        job.readable_end = job.size
        if self.backend == "decord":
            job.plan.extend(job.size)
            return None
        job.spans, job.keep = sparse_decode(track, chosen)
        for lo, hi in byte_regions(track.offsets, track.sizes, job.spans):
            job.plan.add(lo, hi)
        return None
