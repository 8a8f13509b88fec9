"""The fetch side of the pipeline: a job's head, the ranges sent with it, admission to
shared memory, the range plan handed to free connections, retries, and the locating of
the moov as bytes arrive (``engine.locate`` decides; this acts on it).

A part of ``engine.pipeline.Pipeline`` (it uses that class's outbox, ledger and jobs),
kept apart so each concern reads on its own.
"""
from __future__ import annotations

import hashlib
import logging

from engine.errors import ErrorKind
from engine.job import Job, Phase
from engine.locate import PLANNED, Refuse, Stream, choose_streamed, head_refusal, needs_seeking
from engine.memory import ADMITTED, WAIT
from engine.messages import (EndJob, FetchHead, FetchRange, HeadInfo, NeedBytes, RangeDone,
                             RangeFailed, ReadWhole, SegmentReady, WholeBody)
from engine.plan import Piece, RangePlan
from engine.shm import ShmError

log = logging.getLogger("engine.supervisor")

SPECULATIVE_PARTIAL = 3  # ranges sent with the head of a partial job: [H, 2H), [2H, 4H), [4H, 8H)
MAX_RANGE_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.05   # doubled at each attempt of a range
UNKNOWN_LENGTH_RESERVE = 4 << 20   # counted for a body of unknown length (it reserves as it grows)


class Fetching:
    """Events from the fetchers, and the requests sent to them."""

    def _least_loaded(self, fetchers: list):
        """The fetcher with a free connection and the fewest requests, or None."""
        limit = self.config.connections
        free = [f for f in fetchers if self.ledger.of(f.name).load < limit]
        return min(free, key=lambda f: self.ledger.of(f.name).load) if free else None

    def on_need_bytes(self, w, msg: NeedBytes) -> None:
        job = self.jobs.get(msg.job)
        if job is not None and job.plan is not None:
            job.plan.raise_to_front(msg.offset)

    def _start_speculative(self, job: Job) -> None:
        """Ask for the bytes after the head right away, on every other free connection,
        before the size is known: the first frames' bytes arrive one round trip sooner and
        the link is full from the first byte. Sizes double from the head's up to
        ENGINE_RANGE_MB, so the first frames come over several connections at once. A
        partial job asks for less. The fetchers hold the bytes until the segment exists;
        a file shorter than a range answers 416, which only drops that range."""
        cfg = self.config
        offset = cfg.head_bytes
        fetchers = self._fetchers()
        if not job.selection.takes_first:
            return      # the selected frames may lie anywhere: wait for the sample table
        for _ in range(SPECULATIVE_PARTIAL if job.partial else cfg.fetchers * cfg.connections - 1):
            w = self._least_loaded(fetchers)
            if w is None:
                return
            end = offset + min(offset, cfg.range_bytes)
            self.ledger.hold_range(w.name, job.fetch_key, offset, end)
            self._send(w, FetchRange(job=job.fetch_key, url=job.final_url, segment=None, amap=None,
                                     offset=offset, end=end))
            offset = end

    def _start_head(self, job: Job, attempt: int = 0) -> None:
        fetchers = self._fetchers() or self._workers("fetcher", ready=False)
        if not fetchers:   # all restarting: the tick starts it when one is back
            job.to(Phase.WAITING_FETCHER)
            job.head_attempt = attempt
            return
        job.to(Phase.HEAD)
        w = min(fetchers, key=lambda f: self.ledger.of(f.name).load)
        self.ledger.of(w.name).heads.add(job.fetch_key)
        self._send(w, FetchHead(job=job.fetch_key, url=job.final_url, length=self.config.head_bytes,
                                attempt=attempt))

    def on_head(self, w, msg: HeadInfo) -> None:
        job = self._fetching(msg.job)
        if job is None:
            self._send(w, SegmentReady(job=msg.job, segment=None, amap=None))
            return
        job.fetch.count_request(msg.stats)
        job.fetch.ranges += 1
        if msg.stats.connected is not None:
            job.mark("connect", msg.stats.connected)
        else:
            job.mark("connect", msg.stats.started)
        job.mark("first_byte", msg.stats.first_byte)
        cfg = self.config
        unknown = msg.size is None    # no Content-Length: a segment of ENGINE_MAX_BYTES grows
        job.final_url, job.ranged, job.unknown_length = msg.url, msg.ranged, unknown
        job.size = cfg.max_bytes if unknown else msg.size
        refused = head_refusal(msg, cfg.max_bytes)
        if refused:
            return self._refuse(job, w, refused.kind, refused.why)
        job.segment_bytes = min(UNKNOWN_LENGTH_RESERVE, job.size) if unknown else job.size
        if not self._admit(job, w, job.segment_bytes):
            return
        try:
            self.memory.create_segment(job)
        except ShmError as exc:
            return self._refuse(job, w, ErrorKind.FETCH, str(exc))
        ready = SegmentReady(job=job.fetch_key, segment=job.segment.name, amap=job.amap.name)
        for f in sorted({w.name} | self.ledger.fetchers_of(job.fetch_key)):
            self._send(f, ready)
        job.plan = RangePlan(job.size, cfg.range_bytes)
        job.head_len = min(cfg.head_bytes, job.size) if msg.ranged else job.size
        job.plan.planned_until = job.head_len
        job.plan.inflight[0] = Piece(0, job.head_len)   # the head request carries on
        if not msg.ranged:
            job.plan.take_whole(0)                      # and brings every byte
        for offset, end, _ in self.ledger.ranges_of(job.fetch_key):
            # the ranges sent with the head that are still on their way, and contiguous
            # with what is planned: part of the plan
            if not msg.ranged or offset != job.plan.planned_until or offset >= msg.size:
                break
            job.plan.inflight[offset] = Piece(offset, min(end, msg.size))
            job.plan.planned_until = min(end, msg.size)
        if not msg.ranged:
            # One body, no ranges to plan, and no event until it has all arrived: decode it
            # as it arrives instead of waiting for its end.
            self._stream(job, "no Content-Length" if unknown else "no Range support",
                         needs_seeking(msg.prefix))
        elif msg.prefix:
            self._go(job, self.locator.after_head(job, msg.prefix))

    def _refuse(self, job: Job, w, kind: ErrorKind, why: str) -> None:
        """The head's answer ends the job: its fetcher stops waiting for a segment."""
        self._send(w, SegmentReady(job=job.fetch_key, segment=None, amap=None))
        self.fail(job, kind, f"{job.url}: {why}")

    def _admit(self, job: Job, w, size: int) -> bool:
        """The job's video and frames fit, or it waits -- its head dropped, to be fetched
        again when memory is back -- while other jobs hold memory, bounded by its deadline;
        alone and still too big, it fails at once."""
        verdict = self.memory.admit(job.id, size)
        if verdict == ADMITTED:
            return True
        for f in sorted({w.name} | self.ledger.fetchers_of(job.fetch_key)):
            self._send(f, SegmentReady(job=job.fetch_key, segment=None, amap=None))
            self._send(f, EndJob(job=job.fetch_key))
        self.ledger.drop_job(job.fetch_key)
        if verdict == WAIT:
            log.info("%s waits for shared memory (jobs in flight hold %.0f MB)",
                     job.url, self.memory.in_use / 1e6)
            job.to(Phase.WAITING_MEMORY)
        else:
            self.fail(job, ErrorKind.FETCH, f"{job.url}: {verdict}")
        return False

    def _go(self, job: Job, outcome) -> None:
        """Act on what locating the job concluded (None: wait for more bytes)."""
        if isinstance(outcome, Stream):
            self._stream(job, outcome.why, outcome.seekable)
        elif isinstance(outcome, Refuse):
            self.fail(job, outcome.kind, f"{job.url}: {outcome.why}")
        elif outcome is PLANNED:
            track = job.track
            if self._make_ring(job, track.height, track.width) and \
                    self._make_output(job, track.height, track.width):
                self.decode_queue.append(job.id)
                self._dispatch_decodes()

    def _stream(self, job: Job, why: str, seekable: bool = True) -> None:
        """The second way through a job (``engine.locate``)."""
        if job.phase not in (Phase.HEAD, Phase.LOCATING):
            return
        refused = choose_streamed(job, why, seekable, self.config.max_selected)
        if refused:
            self.fail(job, refused.kind, f"{job.url}: {refused.why}")
            return
        self.decode_queue.append(job.id)
        self._dispatch_decodes()

    def on_range_done(self, w, msg: RangeDone) -> None:
        self.ledger.release_range(w.name, msg.job, msg.offset)
        job = self._fetching(msg.job)
        if job is None:
            return
        job.fetch.bytes += msg.stats.bytes
        if msg.head and job.unknown_length:    # the body's end: now its length is known
            job.size = job.head_len = msg.end
            job.plan.truncate(msg.end)
        if msg.head:
            self.ledger.of(w.name).heads.discard(job.fetch_key)   # its request was counted at HeadInfo
        else:
            job.fetch.count_request(msg.stats)
            job.fetch.ranges += 1
        job.plan.done(msg.offset)
        self._after_bytes(job)

    def on_whole_body(self, w, msg: WholeBody) -> None:
        """A range answered with the whole file (a CDN edge forwarding a cache miss to an
        origin without Range): the first such body is read, and this job asks no more
        ranges (the next job tries them again); another is dropped."""
        job = self._fetching(msg.job)
        read = job is not None and job.plan.take_whole(msg.offset)
        if not read:
            self.ledger.release_range(w.name, msg.job, msg.offset)
            if job is not None:
                job.plan.done(msg.offset)
        elif job.ranged:
            log.info("%s: a range was answered with the whole file: reading it, no more "
                     "ranges in this job", job.url)
        self._send(w, ReadWhole(job=msg.job, offset=msg.offset, read=read))

    def _after_bytes(self, job: Job) -> None:
        if not job.head_done and job.amap.present(0, job.head_len):
            job.head_done = True
            self._go(job, self.locator.after_head(job))
        if not job.finished:
            self._go(job, self.locator.on_bytes(job))
        if not job.finished:
            self._check_download(job)

    def on_range_failed(self, w, msg: RangeFailed) -> None:
        self.ledger.release_range(w.name, msg.job, msg.offset)
        job = self._fetching(msg.job)
        if job is None:
            return
        job.fetch.count_request(msg.stats)
        if msg.head:
            self.ledger.of(w.name).heads.discard(job.fetch_key)
            if job.phase is Phase.WAITING_MEMORY:
                return   # its head was dropped on purpose: it waits for memory
            if job.segment is None:
                if msg.retryable and msg.attempt + 1 < MAX_RANGE_ATTEMPTS:
                    job.fetch.retries += 1
                    self._start_head(job, msg.attempt + 1)
                else:
                    self.fail(job, msg.kind, msg.error)
                return
            if not job.ranged:
                self.fail(job, msg.kind, msg.error)
                return
        if job.plan is not None and job.plan.single and msg.offset != job.plan.whole:
            job.plan.done(msg.offset)    # its bytes come with the one body read
            return
        if msg.speculative and (job.plan is None or msg.offset not in job.plan.inflight):
            if msg.retryable:
                job.fetch.retries += 1    # its bytes are planned (again) like any others
            return
        if msg.retryable and job.plan and msg.offset in job.plan.inflight \
                and job.plan.inflight[msg.offset].attempt + 1 < MAX_RANGE_ATTEMPTS:
            job.fetch.retries += 1
            job.plan.retry(msg.offset, msg.written,
                           RETRY_BACKOFF_S * 2 ** job.plan.inflight[msg.offset].attempt)
            return
        self.fail(job, msg.kind, msg.error)

    def _dispatch_ranges(self) -> None:
        """Hand pending pieces to fetchers with a free connection, jobs in turn."""
        jobs = [j for j in self.jobs.values() if not j.finished and j.plan and j.plan.pending]
        if not jobs:
            return
        fetchers = self._fetchers()
        while jobs:
            w = self._least_loaded(fetchers)
            if w is None:
                return
            self.turn = (self.turn + 1) % len(jobs)
            job = jobs[self.turn]
            piece = job.plan.next(slots=self.config.connections * max(1, len(fetchers)),
                                  missing=lambda p: job.amap.missing(p.offset, p.end))
            if piece is None:
                jobs.remove(job)
                continue
            self.ledger.hold_range(w.name, job.fetch_key, piece.offset, piece.end)
            self._send(w, FetchRange(job=job.fetch_key, url=job.final_url, segment=job.segment.name,
                                     amap=job.amap.name, offset=piece.offset, end=piece.end,
                                     attempt=piece.attempt))

    def _check_download(self, job: Job) -> None:
        if job.plan.finished and job.head_done and not job.fetched:
            if all(job.amap.present(lo, hi - lo) for lo, hi in job.plan.regions() if hi > lo):
                job.fetched = True
                job.mark("download_done")
                if self.config.report_sha256:
                    digest = hashlib.sha256()
                    for lo, hi in job.plan.regions():
                        digest.update(job.segment.mm[lo:hi])
                    job.fetch.sha256 = digest.hexdigest()
                if job.max_frames is not None or job.partial_mb is not None:
                    log.info("Partial video downloaded successfully (%.1f MB)",
                             job.fetch.bytes / 1e6)
