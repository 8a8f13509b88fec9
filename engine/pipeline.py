"""Every job's way through the pipeline, as the supervisor sees it: fetch plan, segments,
decode, results, report.

The supervisor (``engine.supervisor``) keeps the processes alive and routes messages;
this keeps the jobs. It runs in the supervisor's one thread, so job state needs no
locks. It creates and unlinks every segment a job uses (video, availability map, frame
ring) and counts them against ENGINE_MAX_BYTES; workers only attach by name.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from engine import mp4
from engine.config import Config
from engine.job import Job
from engine.messages import (BatchReady, BatchResults, DecodeDone, DecodeJob, EndJob, EndVideo,
                             FetchHead, FetchRange, GpuJob, HeadInfo, JobDone, NeedBytes,
                             RangeDone, RangeFailed, ResultBatch, RingReady, SegmentReady,
                             StreamInfo, Submit, VideoResult)
from engine.plan import Piece, RangePlan, fetch_end
from engine.shm import AvailabilityMap, FrameRing, SharedBlock, ShmError, segment_name
from engine.shm.block import free_bytes

if TYPE_CHECKING:
    from engine.supervisor import WorkerHandle

log = logging.getLogger("engine.supervisor")

HTML_TYPES = ("text/html", "application/xhtml+xml")
PROBE_BYTES = 64 * 1024  # a partial job reads this much at a header past the head
RING_POOL = 2          # finished rings kept per frame size
SPECULATIVE_PARTIAL = 3  # ranges sent with the head of a partial job: [H, 2H), [2H, 4H), [4H, 8H)
MAX_RANGE_ATTEMPTS = 4


def looks_like_html(head: bytes) -> bool:
    """An error or landing page where a video was expected (whatever its Content-Type)."""
    text = bytes(head[:512]).lstrip().lower()
    return text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml"))


class Pipeline:
    """The jobs in flight. The supervisor calls in with messages, ticks and worker deaths;
    this calls back only for workers (``fetchers``, ``gpu``, ``send_worker``) and clients
    (``send``)."""

    def __init__(self, sup):
        self.sup = sup                  # engine.supervisor.Supervisor: workers, clients
        self.config: Config = sup.config
        self.jobs: dict[int, Job] = {}
        self.job_ids = itertools.count(1)
        self.shm_in_use = 0
        self.decode_queue: list[int] = []
        self.rr = 0
        self.ring_pool: dict[tuple, list] = {}
        self.ring_reserved: dict[int, int] = {}   # job -> bytes held for its ring until moov
        self.waiting_memory: dict[int, int] = {}  # job -> bytes it waits for (head dropped)
        self.warned_small_ring = False
        self.decoder_backend = self._pick_backend()

    def _pick_backend(self) -> str:
        choice = self.config.decoder
        if choice == "decord":
            try:
                import decord  # noqa: F401
            except ImportError:
                log.warning("ENGINE_DECODER=decord but decord is not installed: using pyav")
                return "pyav"
            return "decord"
        return "pyav"  # auto: PyAV measured faster here (README, decoder backends)

    # ------------------------------------------------------------------ from the supervisor
    def _live(self, job_id: int) -> Job | None:
        """The job, unless it has ended (a late message of an ended job is dropped)."""
        job = self.jobs.get(job_id)
        return job if job is not None and not job.finished else None

    @property
    def live(self) -> list[Job]:
        return [j for j in self.jobs.values() if not j.finished]

    @property
    def fetching(self) -> bool:
        """Ranges wait for a free connection: the loop should look again soon."""
        return any(j.plan and j.plan.pending for j in self.jobs.values())

    def on_message(self, w, msg) -> None:
        if isinstance(msg, RangeDone):
            self.on_range_done(w, msg)
        elif isinstance(msg, BatchReady):
            self.on_batch(w, msg)
        elif isinstance(msg, BatchResults):
            self.on_results(w, msg)
        elif isinstance(msg, HeadInfo):
            self.on_head(w, msg)
        elif isinstance(msg, RangeFailed):
            self.on_range_failed(w, msg)
        elif isinstance(msg, NeedBytes):
            job = self.jobs.get(msg.job)
            if job is not None and job.plan is not None:
                job.plan.raise_to_front(msg.offset)
        elif isinstance(msg, DecodeDone):
            self.on_decode_done(w, msg)
        elif isinstance(msg, StreamInfo):
            self.on_stream_info(w, msg)
        elif isinstance(msg, VideoResult):
            self.on_video_result(w, msg)

    def tick(self, now: float) -> None:
        """Deadlines, heads that wait for a fetcher, and pieces and decodes to hand out."""
        for job in self.live:
            if now > job.deadline and job.id in self.waiting_memory:
                self.fail(job, "JobTimeout", f"{job.url}: engine busy: waited "
                          f"{self.config.job_timeout_s:g} s (ENGINE_JOB_TIMEOUT_S) for shared "
                          f"memory that other jobs held ({self.shm_in_use / 1e6:.0f} MB)")
            elif now > job.deadline:
                self.fail(job, "JobTimeout", f"{job.url}: job exceeded its deadline of "
                          f"{self.config.job_timeout_s:g} s (ENGINE_JOB_TIMEOUT_S)")
            elif job.id in self.waiting_memory:
                if self._memory_back(self.waiting_memory[job.id]):
                    # a new id: the fetchers have ended the old one (EndJob at _admit)
                    del self.waiting_memory[job.id]
                    del self.jobs[job.id]
                    job.id = next(self.job_ids)
                    self.jobs[job.id] = job
                    self._start_head(job)
                    self._start_speculative(job)
            elif job.segment is None and job.head_fetcher is None and job.final_url:
                self._start_head(job, job.head_attempt)
        self.dispatch()

    def dispatch(self) -> None:
        """Hand pending pieces to free connections and queued decodes to free decoders."""
        self._dispatch_ranges()
        self._dispatch_decodes()

    def fail_all(self, kind: str, why: str, client=None) -> None:
        """Fail every live job (of ``client`` only, if given): '<url>: <why>'."""
        for job in self.live:
            if client is None or job.client is client:
                if client is not None:
                    job.client = None   # gone: nobody to send its report to
                self.fail(job, kind, f"{job.url}: {why}")

    def cancel(self, client, token: int) -> None:
        for job in self.live:
            if job.client is client and job.token == token:
                self.fail(job, "EngineError", f"{job.url}: cancelled")

    def worker_lost(self, w, cause: str) -> None:
        """A worker died: requeue what a fetcher held; fail the jobs whose decode or
        results died with it."""
        if w.role == "fetcher":
            for job_id, offset in w.inflight:
                job = self.jobs.get(job_id)
                if job is not None and job.plan is not None:
                    job.plan.requeue(offset)
            for job_id in list(w.heads):
                job = self._live(job_id)
                if job is None:
                    continue
                if job.segment is None:
                    self._start_head(job)
                elif job.ranged:
                    job.plan.requeue(0)
                else:
                    self.fail(job, "FetchError", f"{job.url}: fetcher process died during a "
                              "download without Range support")
        elif w.role == "decoder" and w.job is not None:
            job = self._live(w.job)
            w.job = None
            if job is not None:
                self.fail(job, "DecodeError", f"{job.url}: decoder process crashed ({cause}) "
                          "while decoding this video")
        elif w.role == "gpu":
            for job_id in list(w.jobs):
                job = self._live(job_id)
                if job is not None:
                    self.fail(job, "ProcessorError", f"{job.url}: GPU worker crashed ({cause})")
            w.jobs.clear()
        w.inflight.clear()
        w.heads.clear()

    # ------------------------------------------------------------------ fetch
    def submit(self, client, msg: Submit) -> None:
        cfg = self.config
        job = Job(next(self.job_ids), msg.token, client, msg.url,
                  msg.processor or cfg.processor,
                  msg.max_frames if msg.max_frames is not None else cfg.max_frames,
                  cfg.partial_mb, msg.stream)
        job.deadline = job.submitted + cfg.job_timeout_s
        self.jobs[job.id] = job
        scheme = urlsplit(msg.url).scheme.lower()
        if scheme not in ("http", "https"):
            self.fail(job, "FetchError", f"{msg.url}: unsupported URL scheme "
                      f"{scheme or '(none)'!r}: only http and https")
            return
        if self.sup.stopping_since is not None:
            self.fail(job, "EngineError", f"{msg.url}: engine is shutting down")
            return
        job.final_url = msg.url
        self._start_head(job)
        self._start_speculative(job)

    def _start_speculative(self, job: Job) -> None:
        """Ask for the bytes after the head right away, on every other free connection,
        before the size is known: the first frames' bytes arrive one round trip sooner and
        the link is full from the first byte. Sizes double from the head's up to
        ENGINE_RANGE_MB, so the first frames come over several connections at once. A
        partial job asks for less. The fetchers hold the bytes until the segment exists;
        a file shorter than a range answers 416, which only drops that range."""
        cfg = self.config
        limit = cfg.connections
        partial = job.max_frames is not None or job.partial_mb is not None
        offset = cfg.head_bytes
        for _ in range(SPECULATIVE_PARTIAL if partial else cfg.fetchers * limit - 1):
            free = [f for f in self.sup.fetchers() if len(f.inflight) + len(f.heads) < limit]
            if not free:
                return
            w = min(free, key=lambda f: len(f.inflight) + len(f.heads))
            end = offset + min(offset, cfg.range_bytes)
            w.inflight.add((job.id, offset))
            job.speculative[offset] = (end, w)
            self.sup.send_worker(w, FetchRange(job.id, job.final_url, None, None, offset, end))
            offset = end

    def _start_head(self, job: Job, attempt: int = 0) -> None:
        fetchers = self.sup.fetchers() or [w for w in self.sup.workers if w.role == "fetcher" and w.alive]
        if not fetchers:   # all restarting: the tick starts it when one is back
            job.head_fetcher = None
            job.head_attempt = attempt
            return
        w = min(fetchers, key=lambda f: len(f.inflight) + len(f.heads))
        w.heads.add(job.id)
        job.head_fetcher = w
        self.sup.send_worker(w, FetchHead(job.id, job.final_url, self.config.head_bytes, attempt))

    def on_head(self, w: WorkerHandle, msg: HeadInfo) -> None:
        job = self._live(msg.job)
        if job is None:
            self.sup.send_worker(w, SegmentReady(msg.job, None, None))
            return
        job.count_request(msg.stats)
        job.ranges += 1
        if msg.stats.connected is not None:
            job.mark("connect", msg.stats.connected)
        else:
            job.mark("connect", msg.stats.started)
        job.mark("first_byte", msg.stats.first_byte)
        job.final_url, job.size, job.ranged = msg.url, msg.size, msg.ranged
        cfg = self.config
        if msg.size > cfg.max_bytes:
            self.sup.send_worker(w, SegmentReady(msg.job, None, None))
            self.fail(job, "FetchError", f"{job.url}: file is {msg.size} bytes, over the "
                      f"limit of {cfg.max_bytes} (ENGINE_MAX_BYTES)")
            return
        if msg.size == 0:
            self.sup.send_worker(w, SegmentReady(msg.job, None, None))
            self.fail(job, "FetchError", f"{job.url}: empty file (the server sent 0 bytes)")
            return
        # Content-Type is only a hint (text/plain, octet-stream or none may carry a video);
        # an HTML page is what a server sends instead of one, and is refused.
        if msg.content_type.split(";")[0].strip().lower() in HTML_TYPES \
                or looks_like_html(msg.prefix):
            self.sup.send_worker(w, SegmentReady(msg.job, None, None))
            self.fail(job, "DecodeError", f"{job.url}: server sent "
                      f"{msg.content_type.split(';')[0] or 'an HTML page'}, not a video")
            return
        if not self._admit(job, w, msg.size):
            return
        try:
            name = segment_name(os.getpid(), job.id)
            job.segment = SharedBlock.create(name, msg.size)
            job.amap = AvailabilityMap.create(name + ".map", msg.size)
        except ShmError as exc:
            self.sup.send_worker(w, SegmentReady(msg.job, None, None))
            self.fail(job, "FetchError", f"{job.url}: {exc}")
            return
        self.shm_in_use += job.shm_bytes()
        ready = SegmentReady(job.id, job.segment.name, job.amap.name)
        for f in {w} | {holder for _, holder in job.speculative.values()}:
            self.sup.send_worker(f, ready)
        job.plan = RangePlan(msg.size, cfg.range_bytes)
        job.head_len = min(cfg.head_bytes, msg.size) if msg.ranged else msg.size
        job.plan.planned_until = job.head_len
        job.plan.inflight[0] = Piece(0, job.head_len)   # the head request carries on
        for offset, (end, holder) in sorted(job.speculative.items()):
            # still on its way, and contiguous with what is planned: part of the plan
            if not msg.ranged or offset != job.plan.planned_until or offset >= msg.size \
                    or (job.id, offset) not in holder.inflight:
                break
            job.plan.inflight[offset] = Piece(offset, min(end, msg.size))
            job.plan.planned_until = min(end, msg.size)
        if msg.prefix and msg.ranged:
            self._plan_after_head(job, msg.prefix)

    # ------------------------------------------------------------------ shared memory
    def _room(self, need: int = 0) -> int:
        """Bytes a new segment may take in /dev/shm now (other programs use it too), less
        what admitted jobs hold for rings they have yet to create. Idle pooled rings are
        given back when they stand in the way."""
        if free_bytes() - sum(self.ring_reserved.values()) < need:
            self._drop_ring_pool()
        return free_bytes() - sum(self.ring_reserved.values())

    def _admit(self, job: Job, w, size: int) -> bool:
        """Room for the video (ENGINE_MAX_BYTES for the videos of all jobs in flight) and
        a frame ring (/dev/shm), or the job waits -- its head dropped, to be fetched again
        when memory is back -- while other jobs hold memory, bounded by its deadline;
        alone and still too big, it fails at once."""
        ring = self.config.ring_bytes
        videos = sum(j.segment.size + j.amap.block.size for j in self.live
                     if j.segment is not None and j.amap is not None)
        room = self._room(size + ring)
        busy = bool(videos or self.ring_reserved or self.shm_in_use)
        small_ring = 4 << 20   # a few frames: the ring shrinks to fit at the moov
        if videos + size <= self.config.max_bytes and \
                (size + ring <= room or (not busy and size + small_ring <= room)):
            self.ring_reserved[job.id] = min(ring, room - size)
            return True
        holders = {w} | {holder for _, holder in job.speculative.values()}
        for f in holders:
            self.sup.send_worker(f, SegmentReady(job.id, None, None))
            self.sup.send_worker(f, EndJob(job.id))
            f.inflight = {(j, o) for j, o in f.inflight if j != job.id}
            f.heads.discard(job.id)
        job.speculative.clear()
        job.head_fetcher = None
        if busy:
            if job.id not in self.waiting_memory:
                log.info("%s waits for shared memory (jobs in flight hold %.0f MB)",
                         job.url, self.shm_in_use / 1e6)
            self.waiting_memory[job.id] = size
            return False
        self.fail(job, "FetchError", f"{job.url}: the video ({size / 1e6:.0f} MB) and its frames "
                  f"do not fit in the {max(room, 0) / 1e6:.0f} MB of shared memory free "
                  "(/dev/shm; a container needs a larger --shm-size)")
        return False

    def _memory_back(self, size: int) -> bool:
        """Worth fetching a waiting job's head again: its video would be admitted now."""
        videos = sum(j.segment.size + j.amap.block.size for j in self.live
                     if j.segment is not None and j.amap is not None)
        if not (videos or self.ring_reserved or self.shm_in_use):
            return True    # alone: admitted with what there is, or failed clearly
        return videos + size <= self.config.max_bytes and \
            size + self.config.ring_bytes <= self._room(size + self.config.ring_bytes)

    def _ring_slots(self, job: Job, height: int, width: int) -> int | None:
        """Two batches of frames, bounded by ENGINE_RING_MB and what was reserved for the
        ring at admission; smaller (the decoder's batches shrink with it) when memory is
        tight. None: not even two frames fit."""
        cfg = self.config
        if cfg.ring_slots:
            return cfg.ring_slots
        want = 2 * cfg.batch
        frame = height * width * 3
        room = min(cfg.ring_bytes, self._room(FrameRing.bytes_for(want, height, width)))
        fit = (room - FrameRing.bytes_for(0, height, width)) // frame
        if fit >= want:
            return want
        if fit < 2:
            return None
        if not self.warned_small_ring:
            self.warned_small_ring = True
            log.warning("shared memory is tight: a %dx%d frame ring gets %d slots (%.0f MB), "
                        "batches shrink to %d frames; give the engine more /dev/shm "
                        "(docker run --shm-size=1g) or raise ENGINE_RING_MB", width, height,
                        fit, fit * frame / 1e6, fit // 2)
        return int(fit)

    def _plan_after_head(self, job: Job, prefix=None) -> None:
        """Walk the box headers and plan the remaining ranges: from the first bytes of the
        head as soon as they arrive (``prefix``, in ``HeadInfo``), else from the whole head.
        What cannot be planned (not MP4, no moov, a moov without samples) is streamed."""
        if job.planned:
            return
        final = prefix is None
        try:
            found = mp4.walk(self._present_reader(job) if final else mp4.reader_of(prefix),
                             job.size)
        except mp4.NotMP4 as exc:
            self._stream(job, str(exc))
            return
        if found.moov is None and found.need is not None and not final:
            return                      # the prefix says too little: wait for the head
        job.planned = True
        if found.moov is not None:
            self._found_moov(job, found)
        elif found.need is None:
            self._stream(job, "no moov box")
        else:
            # The next header lies past the head (a long mdat or free box): fetch from
            # there first -- all of the rest for a full job, which needs it anyway.
            job.moov_layout = found.layout
            end = job.size if not job.partial else min(job.size, found.need + PROBE_BYTES)
            job.plan.urgent(found.need, end)
            job.probed_until = end
            if not job.partial:
                job.plan.extend(job.size)

    def _present_reader(self, job: Job):
        """``read`` for ``mp4.walk`` over the bytes of the segment that have arrived."""
        mm, amap = job.segment.mm, job.amap
        return lambda pos, n: bytes(mm[pos:pos + n]) if amap.present(pos, n) else None

    def _walk_on(self, job: Job) -> None:
        """More bytes are in while the moov is still unknown: walk the headers again."""
        try:
            found = mp4.walk(self._present_reader(job), job.size)
        except mp4.NotMP4 as exc:
            self._stream(job, str(exc))
            return
        if found.moov is not None:
            self._found_moov(job, found)
        elif found.need is None:
            self._stream(job, "no moov box")
        elif job.partial and found.need >= job.probed_until:
            job.probed_until = min(job.size, found.need + PROBE_BYTES)
            job.plan.urgent(found.need, job.probed_until)

    def _found_moov(self, job: Job, found) -> None:
        moov = found.moov
        job.moov_layout = found.layout
        job.moov = (moov.offset, moov.offset + moov.size)
        if found.layout == "end":
            job.plan.urgent(max(moov.offset, job.probed_until), job.moov[1])
            if not job.partial:
                job.plan.extend(moov.offset)
        else:
            job.plan.extend(job.moov[1] if job.partial else job.size)
        self._check_moov(job)

    def _stream(self, job: Job, why: str) -> None:
        """The second way through a job: fetch front to back, let FFmpeg probe and decode
        while the bytes arrive; the frame count is learned by decoding."""
        if job.way == "streamed" or job.finished:
            return
        head = bytes(job.segment.mm[:min(512, job.size)]) if job.amap.present(0, min(512, job.size)) else b""
        if looks_like_html(head):
            self.fail(job, "DecodeError", f"{job.url}: server sent an HTML page, not a video")
            return
        log.info("%s: streamed, not planned (%s)", job.url, why)
        if why.startswith("truncated file"):
            job.truncated = why
        job.way, job.planned, job.moov, job.moov_layout, job.track = "streamed", True, None, None, None
        job.plan.extend(job.size)
        # A seekable fragmented MP4 makes FFmpeg visit every fragment's header before
        # the first frame, i.e. wait for nearly the whole file: it is read front to back.
        job.linear = "fragmented" in why
        job.frame_limit = job.max_frames
        job.readable_end = job.size
        self.decode_queue.append(job.id)
        self._dispatch_decodes()

    def on_range_done(self, w: WorkerHandle, msg: RangeDone) -> None:
        w.inflight.discard((msg.job, msg.offset))
        job = self._live(msg.job)
        if job is None:
            return
        job.bytes += msg.stats.bytes
        if msg.head:
            w.heads.discard(job.id)    # its request was counted at HeadInfo
        else:
            job.count_request(msg.stats)
            job.ranges += 1
        job.plan.done(msg.offset)
        self._after_bytes(job)

    def _after_bytes(self, job: Job) -> None:
        if not job.head_done and job.amap.present(0, job.head_len):
            job.head_done = True
            self._plan_after_head(job)
        if not job.finished:
            self._check_moov(job)
        if not job.finished:
            self._check_download(job)

    def on_range_failed(self, w: WorkerHandle, msg: RangeFailed) -> None:
        w.inflight.discard((msg.job, msg.offset))
        job = self._live(msg.job)
        if job is None:
            return
        job.count_request(msg.stats)
        if msg.head:
            w.heads.discard(job.id)
            if job.id in self.waiting_memory:
                return   # its head was dropped on purpose: it waits for memory
            if job.segment is None:
                if msg.retryable and msg.attempt + 1 < MAX_RANGE_ATTEMPTS:
                    job.retries += 1
                    self._start_head(job, msg.attempt + 1)
                else:
                    self.fail(job, msg.kind, msg.error)
                return
            if not job.ranged:
                self.fail(job, msg.kind, msg.error)
                return
        if msg.speculative and (job.plan is None or msg.offset not in job.plan.inflight):
            if msg.retryable:
                job.retries += 1    # its bytes are planned (again) like any others
            return
        if msg.retryable and job.plan and msg.offset in job.plan.inflight \
                and job.plan.inflight[msg.offset].attempt + 1 < MAX_RANGE_ATTEMPTS:
            job.retries += 1
            job.plan.retry(msg.offset, msg.written, 0.05 * 2 ** job.plan.inflight[msg.offset].attempt)
            return
        self.fail(job, msg.kind, msg.error)

    def _dispatch_ranges(self) -> None:
        """Hand pending pieces to fetchers with a free connection, jobs in turn."""
        jobs = [j for j in self.jobs.values() if not j.finished and j.plan and j.plan.pending]
        if not jobs:
            return
        limit = self.config.connections
        fetchers = self.sup.fetchers()
        while jobs:
            free = [f for f in fetchers if len(f.inflight) + len(f.heads) < limit]
            if not free:
                return
            self.rr = (self.rr + 1) % len(jobs)
            job = jobs[self.rr]
            piece = job.plan.next(slots=limit * max(1, len(fetchers)),
                                  missing=lambda p: job.amap.missing(p.offset, p.end))
            if piece is None:
                jobs.remove(job)
                continue
            w = min(free, key=lambda f: len(f.inflight) + len(f.heads))
            w.inflight.add((job.id, piece.offset))
            self.sup.send_worker(w, FetchRange(job.id, job.final_url, job.segment.name, job.amap.name,
                                            piece.offset, piece.end, piece.attempt))

    def _check_moov(self, job: Job) -> None:
        if job.track is not None or job.finished or job.way == "streamed":
            return
        if job.moov is None:
            if job.planned and job.head_done:
                self._walk_on(job)
            return
        start, end = job.moov
        if not job.amap.present(start, end - start):
            return
        job.mark("moov_ready")
        try:
            mm = job.segment.mm
            track = mp4.parse_moov(memoryview(mm)[start:end])
        except mp4.NotMP4 as exc:
            self._stream(job, str(exc))
            return
        if track.frame_count == 0:
            self._stream(job, "the moov lists no samples (fragmented MP4)")
            return
        job.track = track
        data_end = int((track.offsets + track.sizes).max())
        if data_end > job.size:
            # decode what is there; the report names the frames past the end
            job.truncated = (f"truncated file: it ends at byte {job.size} but its frames "
                             f"need {data_end} bytes")
        limit = track.frame_count
        if job.max_frames is not None:
            limit = min(limit, job.max_frames)
        if job.partial_mb is not None:
            need = track.need_end()
            budget = int(job.partial_mb * 1024 * 1024)
            limit = min(limit, int((need <= budget).sum()))
        job.frame_limit = limit
        job.readable_end = job.size
        if limit and (limit < track.frame_count or job.max_frames is not None):
            # The decoder sees end-of-file exactly at a sample boundary (a cut inside the
            # next sample would hand it a truncated packet); the plan rounds up to chunks.
            job.readable_end = fetch_end(self.decoder_backend, track.need_end(), limit, job.size)
            job.plan.extend(job.readable_end)
        if limit == 0:
            self.fail(job, "DecodeError", f"{job.url}: no frame fits the partial download limit")
            return
        if self._make_ring(job, track.height, track.width):
            self.decode_queue.append(job.id)
            self._dispatch_decodes()

    def _make_ring(self, job: Job, height: int, width: int) -> bool:
        self.ring_reserved.pop(job.id, None)   # the ring itself is counted from now on
        slots = self._ring_slots(job, height, width)
        if slots is None:
            self.fail(job, "FetchError", f"{job.url}: no room in shared memory for the frames "
                      f"of a {width}x{height} video (/dev/shm; a container needs "
                      "a larger --shm-size)")
            return False
        shape = (slots, height, width)
        pooled = self.ring_pool.get(shape)
        if pooled:
            job.ring = pooled.pop()     # already counted in shm_in_use
            job.ring.reset()
        else:
            try:
                job.ring = FrameRing.create(segment_name(os.getpid(), job.id, ".ring"), *shape)
            except ShmError as exc:
                self.fail(job, "FetchError", f"{job.url}: {exc}")
                return False
            self.shm_in_use += job.ring.block.size
        return True

    def _drop_ring_pool(self) -> None:
        """Give back the idle pooled rings (a job needs their room)."""
        for rings in self.ring_pool.values():
            for ring in rings:
                self.shm_in_use -= ring.block.size
                ring.unlink()
                ring.close()
            rings.clear()

    def _check_download(self, job: Job) -> None:
        if job.plan.finished and job.head_done and "download_done" not in job.timings:
            if all(job.amap.present(lo, hi - lo) for lo, hi in job.plan.regions() if hi > lo):
                job.mark("download_done")
                if self.config.report_sha256:
                    digest = hashlib.sha256()
                    for lo, hi in job.plan.regions():
                        digest.update(job.segment.mm[lo:hi])
                    job.sha256 = digest.hexdigest()
                if job.max_frames is not None or job.partial_mb is not None:
                    log.info("Partial video downloaded successfully (%.1f MB)", job.bytes / 1e6)

    # ------------------------------------------------------------------ decode
    def _dispatch_decodes(self) -> None:
        gpu = self.sup.gpu()
        if gpu is None:
            return   # restarting: decodes wait for it, as ranges wait for their fetchers
        while self.decode_queue:
            free = [w for w in self.sup.workers if w.role == "decoder" and w.alive and w.ready
                    and w.job is None]
            if not free:
                return
            job = self._live(self.decode_queue.pop(0))
            if job is None:
                continue
            w = free[0]
            w.job = job.id
            job.decoder_backend = self.decoder_backend
            if job.way == "streamed":   # the ring and the GPU worker wait for StreamInfo
                job.decoder_backend = "pyav"
                self.sup.send_worker(w, DecodeJob(
                    job.id, job.segment.name, job.amap.name, None, job.size, "pyav",
                    self.config.batch, [], job.frame_limit, job.readable_end, None,
                    job.plan.regions(), seekable=not job.linear))
                continue
            gpu.jobs.add(job.id)   # from now on its death fails this job
            self.sup.send_worker(gpu, GpuJob(job.id, job.ring.name, job.processor,
                                             self._video_info(job)))
            track = job.track
            self.sup.send_worker(w, DecodeJob(
                job.id, job.segment.name, job.amap.name, job.ring.name, job.size,
                self.decoder_backend, self.config.batch,
                [int(x) for x in track.need_end()], job.frame_limit, job.readable_end,
                job.moov, job.plan.regions(), expected=track.frame_count,
                stream_index=track.index))

    def on_stream_info(self, w: WorkerHandle, msg: StreamInfo) -> None:
        """A streamed job's decoder knows the picture: make its ring, start the GPU side."""
        job = self._live(msg.job)
        if job is None or w.job != msg.job:
            self.sup.send_worker(w, RingReady(msg.job, None))
            return
        job.track = msg
        if not self._make_ring(job, msg.height, msg.width):
            return                  # failed: its EndJob tells the decoder
        gpu = self.sup.gpu()
        if gpu is None:
            self.fail(job, "ProcessorError", f"{job.url}: the GPU worker is not running")
            return
        gpu.jobs.add(job.id)
        self.sup.send_worker(gpu, GpuJob(job.id, job.ring.name, job.processor,
                                         self._video_info(job)))
        self.sup.send_worker(w, RingReady(job.id, job.ring.name))

    @staticmethod
    def _video_info(job: Job) -> dict:
        """What a per-video processor's ``begin`` gets (``engine.processors.Video``)."""
        t = job.track
        return {"url": job.url, "width": t.width, "height": t.height, "fps": t.fps,
                "frames": job.frame_limit, "codec": t.codec}

    def on_batch(self, w: WorkerHandle, msg: BatchReady) -> None:
        job = self._live(msg.job)
        if job is None:
            return
        job.mark("first_frame", msg.decoded_at)
        gpu = self.sup.gpu()
        if gpu is None:
            self.fail(job, "ProcessorError", f"{job.url}: the GPU worker is not running")
            return
        job.outstanding += 1
        gpu.jobs.add(job.id)
        self.sup.send_worker(gpu, msg)

    def on_results(self, w: WorkerHandle, msg: BatchResults) -> None:
        job = self._live(msg.job)
        if job is None:
            return
        job.outstanding -= 1
        if msg.error:
            self.fail(job, "ProcessorError", f"{job.url}: {msg.error}")
            return
        job.mark("first_result")
        for n, result in zip(msg.frame_numbers, msg.results):
            job.results[n] = result
        if job.stream:
            self.sup.send(job.client, ResultBatch(job.token, list(msg.frame_numbers), msg.results,
                                                  job.bytes, job.size, job.frame_limit))
        self._maybe_finish(job)

    def on_decode_done(self, w: WorkerHandle, msg: DecodeDone) -> None:
        if w.job == msg.job:
            w.job = None
        job = self._live(msg.job)
        self._dispatch_decodes()
        if job is None:
            return
        job.decode_done = True
        job.mark("decode_done")
        job.decoded, job.missing = msg.frames, msg.missing
        if msg.error and not msg.frames:
            self.fail(job, "DecodeError", f"{job.url}: {job.truncated or msg.error}")
            return
        # Frames are missing: the report keeps every frame that was decoded, and says
        # which are not there and why; it is never ok.
        problem = msg.error or (f"{len(msg.missing)} of {msg.frames + len(msg.missing)} "
                                "frames could not be decoded" if msg.missing else None)
        if problem:
            job.error = f"{job.url}: " + "; ".join(filter(None, (job.truncated, problem)))
            job.error_kind = "DecodeError"
        self._maybe_finish(job)

    def _maybe_finish(self, job: Job) -> None:
        """Every frame has its result: ask the GPU worker for the video's result (a
        per-video processor's ``end()``); the report goes out with its answer."""
        if job.decode_done and job.outstanding == 0 and not job.finished and not job.ending:
            gpu = self.sup.gpu()
            if gpu is None:
                self.fail(job, "ProcessorError", f"{job.url}: the GPU worker is not running")
                return
            job.ending = True
            gpu.jobs.add(job.id)
            self.sup.send_worker(gpu, EndVideo(job.id))

    def on_video_result(self, w: WorkerHandle, msg: VideoResult) -> None:
        job = self._live(msg.job)
        if job is None or not job.ending:
            return
        if msg.error:
            self.fail(job, "ProcessorError", f"{job.url}: {msg.error}")
            return
        job.video_result = msg.value
        self.finish(job)

    # ------------------------------------------------------------------ end
    def finish(self, job: Job) -> None:
        job.finished = True
        job.mark("total")
        self._release(job)
        self.sup.send(job.client, JobDone(job.token, job.report()))

    def fail(self, job: Job, kind: str, message: str) -> None:
        if job.finished:
            return
        job.error, job.error_kind = message, kind
        self.finish(job)

    def _release(self, job: Job) -> None:
        """Stop everything the job has going and give back its memory."""
        # A ring whose job ended cleanly (decoder and GPU worker done with it) is kept for
        # the next job of the same frame size; any other is cancelled and unlinked.
        keep = None
        if job.ring is not None and job.error is None and job.decode_done and job.outstanding == 0:
            shape = (job.ring.slots, job.ring.height, job.ring.width)
            if len(self.ring_pool.setdefault(shape, [])) < RING_POOL:
                keep = job.ring
        for shared in (job.amap, job.ring):
            if shared is not None and shared is not keep:
                shared.cancel()
        if job.plan is not None:
            job.plan.drop_pending()
        if job.id in self.decode_queue:
            self.decode_queue.remove(job.id)
        for w in self.sup.workers:
            if w.alive and (w.role in ("fetcher", "gpu") or w.job == job.id):
                self.sup.send_worker(w, EndJob(job.id))
            w.inflight = {(j, o) for j, o in w.inflight if j != job.id}
            w.heads.discard(job.id)
            w.jobs.discard(job.id)
        self.shm_in_use -= job.shm_bytes()
        self.ring_reserved.pop(job.id, None)
        self.waiting_memory.pop(job.id, None)
        if keep is not None:   # a pooled ring still holds its memory
            self.ring_pool[(keep.slots, keep.height, keep.width)].append(keep)
            self.shm_in_use += keep.block.size
        for shared in (job.segment, job.amap, job.ring):
            if shared is not None and shared is not keep:
                shared.unlink()
                shared.close()
        job.segment = job.amap = job.ring = None
        self.jobs.pop(job.id, None)
