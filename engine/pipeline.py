"""Every job's way through the pipeline, as the supervisor sees it: fetch plan, segments,
decode, results, report.

The supervisor (``engine.supervisor``) keeps the processes alive and carries messages;
this keeps the jobs. It takes one event at a time -- a worker's message, a client's
request, a tick, a worker's death -- moves the jobs it concerns through their phases
(``engine.job.Phase``) and leaves what must be sent in its outbox (``take``); it never
touches a pipe or a socket, so its tests drive it with events and read the outbox.
What each worker holds is in ``self.ledger``. It runs in the supervisor's one thread, so
job state needs no locks. Every segment a job uses (video, availability map, frame ring,
output) is made and given back through its ``Memory`` (``engine.memory``), the one part
that touches /dev/shm; workers only attach by name.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass, replace
from typing import Callable
from urllib.parse import urlsplit

import numpy as np

from engine import fences, resume
from engine.config import Config
from engine.errors import ErrorKind, SelectionError
from engine.job import Job, Phase
from engine.ledger import Ledger
from engine.locate import (PLANNED, Locator, Refuse, Stream, choose_streamed, head_refusal,
                           needs_seeking, selected_refusal)
from engine.memory import ADMITTED, WAIT, Memory
from engine.messages import (BatchReady, BatchResults, DecodeDone, DecodeJob, EndJob, EndVideo,
                             FetchHead, FetchRange, GpuJob, HeadInfo, JobDone, NeedBytes,
                             RangeDone, RangeFailed, ReadWhole, ResultBatch, RingReady,
                             SegmentReady, StreamInfo, Submit, VideoResult, WholeBody)
from engine.plan import Piece, RangePlan
from engine.selection import Selection, gop_spans
from engine.shm import ShmError
from engine.shm.ring import SlotRun

log = logging.getLogger("engine.supervisor")

SPECULATIVE_PARTIAL = 3  # ranges sent with the head of a partial job: [H, 2H), [2H, 4H), [4H, 8H)
MAX_RANGE_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.05   # doubled at each attempt of a range
UNKNOWN_LENGTH_RESERVE = 4 << 20   # counted for a body of unknown length (it reserves as it grows)
COLLECT = "engine.processors:collect"   # Engine.frames' processor


@dataclass(frozen=True)
class Send:
    """A message the supervisor is to send: to a worker (by name) or to a client."""
    to: object          # a worker's name (str), or a client connection
    msg: object

    @property
    def to_worker(self) -> bool:
        return isinstance(self.to, str)


class Pipeline:
    """The jobs in flight.

    ``roster()`` lists the worker processes that are alive, as objects with ``name``,
    ``role`` (fetcher, decoder, gpu) and ``ready`` (said Hello: takes work).
    """

    def __init__(self, config: Config, roster: Callable[[], list], memory: Memory | None = None):
        self.config = config
        self.memory = memory or Memory(config)
        self.roster = roster
        self.stopping = False           # the engine is shutting down: no new jobs
        self.outbox: list[Send] = []
        self.ledger = Ledger()
        self.jobs: dict[int, Job] = {}
        self.job_ids = itertools.count(1)
        self.decode_queue: list[int] = []
        self.rr = 0
        self.decoder_backend = self._pick_backend()
        self.locator = Locator(config, self.decoder_backend)
        self.handlers = {RangeDone: self.on_range_done, BatchReady: self.on_batch,
                         BatchResults: self.on_results, HeadInfo: self.on_head,
                         RangeFailed: self.on_range_failed, NeedBytes: self.on_need_bytes,
                         DecodeDone: self.on_decode_done, StreamInfo: self.on_stream_info,
                         VideoResult: self.on_video_result, WholeBody: self.on_whole_body}

    # ------------------------------------------------------------------ outbox and workers
    def take(self) -> list[Send]:
        """What the events handled since the last call want sent, in order."""
        out, self.outbox = self.outbox, []
        return out

    def _send(self, worker, msg) -> None:
        self.outbox.append(Send(getattr(worker, "name", worker), msg))

    def _reply(self, client, msg) -> None:
        if client is not None:
            self.outbox.append(Send(client, msg))

    def _workers(self, role: str, ready: bool = True) -> list:
        return [w for w in self.roster() if w.role == role and (w.ready or not ready)]

    def _fetchers(self) -> list:
        return self._workers("fetcher")

    def _gpu(self):
        """The GPU worker, while its process is alive (messages wait in its pipe while it
        starts)."""
        gpus = self._workers("gpu", ready=False)
        return gpus[0] if gpus else None

    def _least_loaded(self, fetchers: list):
        """The fetcher with a free connection and the fewest requests, or None."""
        limit = self.config.connections
        free = [f for f in fetchers if self.ledger.of(f.name).load < limit]
        return min(free, key=lambda f: self.ledger.of(f.name).load) if free else None

    def _pick_backend(self) -> str:
        choice = self.config.decoder
        if choice == "decord":
            try:
                import decord  # noqa: F401
            except ImportError:
                log.warning("ENGINE_DECODER=decord but decord is not installed: using pyav")
                return "pyav"
            return "decord"
        return "pyav"  # auto: PyAV measured faster (docs/performance.md, decoder backends)

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
        """A worker's message about a job."""
        handler = self.handlers.get(type(msg))
        if handler is None:
            log.warning("%s sent an unexpected %s: dropped", w.name, type(msg).__name__)
            return
        handler(w, msg)

    def on_need_bytes(self, w, msg: NeedBytes) -> None:
        job = self.jobs.get(msg.job)
        if job is not None and job.plan is not None:
            job.plan.raise_to_front(msg.offset)

    def tick(self, now: float) -> None:
        """Deadlines, heads that wait for a fetcher, and pieces and decodes to hand out."""
        for job in self.live:
            if now > job.deadline and job.phase is Phase.WAITING_MEMORY:
                self.fail(job, ErrorKind.TIMEOUT, f"{job.url}: engine busy: waited "
                          f"{self.config.job_timeout_s:g} s (ENGINE_JOB_TIMEOUT_S) for shared "
                          f"memory that other jobs held ({self.memory.in_use / 1e6:.0f} MB)")
            elif now > job.deadline:
                self.fail(job, ErrorKind.TIMEOUT, f"{job.url}: job exceeded its deadline of "
                          f"{self.config.job_timeout_s:g} s (ENGINE_JOB_TIMEOUT_S)")
            elif job.phase is Phase.WAITING_MEMORY:
                if self.memory.back(job.segment_bytes):
                    # a new id: the fetchers have ended the old one (EndJob at _admit)
                    del self.jobs[job.id]
                    job.id = next(self.job_ids)
                    self.jobs[job.id] = job
                    self._start_head(job)
                    self._start_speculative(job)
            elif job.phase is Phase.WAITING_FETCHER:
                self._start_head(job, job.head_attempt)
        self.dispatch()

    def dispatch(self) -> None:
        """Hand pending pieces to free connections and queued decodes to free decoders."""
        self._dispatch_ranges()
        self._dispatch_decodes()

    def fail_all(self, kind: str, why: str, client=None) -> None:
        """Fail every live job (of ``client`` only, if given): '<url>: <why>'; frames
        waiting for that client go too."""
        if client is not None:
            self.memory.release_outputs_of(client)
        for job in self.live:
            if client is None or job.client is client:
                if client is not None:
                    job.client = None   # gone: nobody to send its report to
                self.fail(job, kind, f"{job.url}: {why}")

    def cancel(self, client, token: int) -> None:
        for job in self.live:
            if job.client is client and job.token == token:
                self.fail(job, ErrorKind.ENGINE, f"{job.url}: cancelled")

    def worker_lost(self, w, cause: str) -> None:
        """A worker died: requeue what a fetcher held; decode again what a decoder or the
        GPU worker lost (``engine.resume``)."""
        held = self.ledger.drop_worker(w.name)
        for job_id, offset in held.ranges:
            job = self.jobs.get(job_id)
            if job is not None and job.plan is not None:
                job.plan.requeue(offset)
        for job_id in held.heads:
            job = self._live(job_id)
            if job is None:
                continue
            if job.segment is None:
                self._start_head(job)
            elif job.ranged:
                job.plan.requeue(0)
            else:
                self.fail(job, ErrorKind.FETCH, f"{job.url}: fetcher process died during a "
                          "download without Range support")
        if held.decoding is not None:
            job = self._live(held.decoding)
            if job is not None:
                self._decoder_lost(job, cause)
        for job_id in sorted(held.jobs):
            job = self._live(job_id)
            if job is not None:
                self._gpu_lost(job, cause)
        self._dispatch_decodes()

    def _decoder_lost(self, job: Job, cause: str) -> None:
        """Its forwarded batches are safe with the GPU worker: go on after them."""
        why = resume.gave_up(job.losses, "decoder", job.url, cause)
        if why:
            self.fail(job, ErrorKind.DECODE, why)
            return
        if not job.stopping_decoder:    # else the GPU worker's loss set where to go on
            job.resume_after = resume.after_decoder_loss(job.forwarded)
        job.stopping_decoder = False
        log.warning("%s: decoder lost (%s): a new one goes on after frame %d", job.url, cause,
                    job.resume_after)
        self.decode_queue.insert(0, job.id)

    def _gpu_lost(self, job: Job, cause: str) -> None:
        """Its unanswered batches are lost: decode them again for the next GPU worker,
        once the job's decoder (if still at it) has stopped."""
        why = resume.gave_up(job.losses, "gpu", job.url, cause)
        after = resume.after_gpu_loss(job.results, job.per_video, job.stream)
        if why or after is None:
            self.fail(job, ErrorKind.PROCESSOR, why or (
                f"{job.url}: GPU worker crashed ({cause}) after results of this video "
                "reached the client: the per-video processor's state is lost"))
            return
        if after < 0:
            job.results.clear()
        job.unanswered.clear()
        job.forwarded = [n for n in job.forwarded if n <= after]
        job.resume_after = after
        log.warning("%s: GPU worker lost (%s): decoding again after frame %d", job.url, cause,
                    after)
        if any(self.ledger.of(d.name).decoding == job.id
               for d in self._workers("decoder", ready=False)):
            job.stopping_decoder = True
            job.ring.cancel()    # the decoder's DecodeDone says it has stopped
        elif job.id not in self.decode_queue:
            job.to(Phase.DECODING)
            self.decode_queue.insert(0, job.id)

    # ------------------------------------------------------------------ fetch
    def submit(self, client, msg: Submit) -> None:
        cfg = self.config
        asked = msg.selection.to_dict() if isinstance(msg.selection, Selection) else {}
        if asked.get("max_frames") is None:
            asked["max_frames"] = cfg.max_frames
        return_frames = bool(getattr(msg, "return_frames", False))
        job = Job(next(self.job_ids), msg.token, client, msg.url,
                  COLLECT if return_frames else msg.processor or cfg.processor,
                  asked["max_frames"], cfg.partial_mb, msg.stream, return_frames=return_frames)
        job.deadline = job.submitted + cfg.job_timeout_s
        self.jobs[job.id] = job
        try:    # checked again: a serve-mode client may send anything
            job.selection = Selection.of(**asked)
        except (SelectionError, TypeError) as exc:
            self.fail(job, ErrorKind.SELECTION, f"{msg.url}: {exc}")
            return
        scheme = urlsplit(msg.url).scheme.lower()
        if scheme not in ("http", "https"):
            self.fail(job, ErrorKind.FETCH, f"{msg.url}: unsupported URL scheme "
                      f"{scheme or '(none)'!r}: only http and https")
            return
        if self.stopping:
            self.fail(job, ErrorKind.ENGINE, f"{msg.url}: engine is shutting down")
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
        offset = cfg.head_bytes
        fetchers = self._fetchers()
        if not job.selection.takes_first:
            return      # the selected frames may lie anywhere: wait for the sample table
        for _ in range(SPECULATIVE_PARTIAL if job.partial else cfg.fetchers * cfg.connections - 1):
            w = self._least_loaded(fetchers)
            if w is None:
                return
            end = offset + min(offset, cfg.range_bytes)
            self.ledger.hold_range(w.name, job.id, offset, end)
            self._send(w, FetchRange(job=job.id, url=job.final_url, segment=None, amap=None,
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
        self.ledger.of(w.name).heads.add(job.id)
        self._send(w, FetchHead(job=job.id, url=job.final_url, length=self.config.head_bytes,
                                attempt=attempt))

    def on_head(self, w, msg: HeadInfo) -> None:
        job = self._live(msg.job)
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
        ready = SegmentReady(job=job.id, segment=job.segment.name, amap=job.amap.name)
        for f in sorted({w.name} | self.ledger.fetchers_of(job.id)):
            self._send(f, ready)
        job.plan = RangePlan(job.size, cfg.range_bytes)
        job.head_len = min(cfg.head_bytes, job.size) if msg.ranged else job.size
        job.plan.planned_until = job.head_len
        job.plan.inflight[0] = Piece(0, job.head_len)   # the head request carries on
        if not msg.ranged:
            job.plan.take_whole(0)                      # and brings every byte
        for offset, end, _ in self.ledger.ranges_of(job.id):
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
        self._send(w, SegmentReady(job=job.id, segment=None, amap=None))
        self.fail(job, kind, f"{job.url}: {why}")

    # ------------------------------------------------------------------ shared memory
    def _admit(self, job: Job, w, size: int) -> bool:
        """The job's video and frames fit, or it waits -- its head dropped, to be fetched
        again when memory is back -- while other jobs hold memory, bounded by its deadline;
        alone and still too big, it fails at once."""
        verdict = self.memory.admit(job.id, size)
        if verdict == ADMITTED:
            return True
        for f in sorted({w.name} | self.ledger.fetchers_of(job.id)):
            self._send(f, SegmentReady(job=job.id, segment=None, amap=None))
            self._send(f, EndJob(job=job.id))
        self.ledger.drop_job(job.id)
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
        job = self._live(msg.job)
        if job is None:
            return
        job.fetch.bytes += msg.stats.bytes
        if msg.head and job.unknown_length:    # the body's end: now its length is known
            job.size = job.head_len = msg.end
            job.plan.truncate(msg.end)
        if msg.head:
            self.ledger.of(w.name).heads.discard(job.id)   # its request was counted at HeadInfo
        else:
            job.fetch.count_request(msg.stats)
            job.fetch.ranges += 1
        job.plan.done(msg.offset)
        self._after_bytes(job)

    def on_whole_body(self, w, msg: WholeBody) -> None:
        """A range answered with the whole file (a CDN edge forwarding a cache miss to an
        origin without Range): the first such body is read, and this job asks no more
        ranges (the next job tries them again); another is dropped."""
        job = self._live(msg.job)
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
        job = self._live(msg.job)
        if job is None:
            return
        job.fetch.count_request(msg.stats)
        if msg.head:
            self.ledger.of(w.name).heads.discard(job.id)
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
            self.rr = (self.rr + 1) % len(jobs)
            job = jobs[self.rr]
            piece = job.plan.next(slots=self.config.connections * max(1, len(fetchers)),
                                  missing=lambda p: job.amap.missing(p.offset, p.end))
            if piece is None:
                jobs.remove(job)
                continue
            self.ledger.hold_range(w.name, job.id, piece.offset, piece.end)
            self._send(w, FetchRange(job=job.id, url=job.final_url, segment=job.segment.name,
                                     amap=job.amap.name, offset=piece.offset, end=piece.end,
                                     attempt=piece.attempt))

    def _make_output(self, job: Job, height: int, width: int) -> bool:
        if not job.return_frames:
            return True
        try:
            self.memory.create_output(job, height, width, self.config.max_selected)
        except ShmError as exc:
            self.fail(job, ErrorKind.FETCH, f"{job.url}: {exc}")
            return False
        return True

    def release_output(self, client, name: str) -> None:
        """A client copied its frames out (or went away): the block goes."""
        self.memory.release_output(client, name)

    def _make_ring(self, job: Job, height: int, width: int) -> bool:
        # Both ways pass here with the header's picture size before any frame is decoded
        too_big = fences.pixels_refusal(width, height, self.config.max_pixels)
        if too_big:
            self.fail(job, ErrorKind.DECODE, f"{job.url}: {too_big}")
            return False
        try:
            self.memory.create_ring(job, height, width)
        except ShmError as exc:
            self.fail(job, ErrorKind.FETCH, f"{job.url}: {exc}")
            return False
        return True

    def close(self) -> None:
        """The engine stops: give back the pooled rings and frames nobody took (live jobs
        are failed first)."""
        self.memory.close()

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

    # ------------------------------------------------------------------ decode
    def _dispatch_decodes(self) -> None:
        gpu = self._gpu()
        if gpu is None:
            return   # restarting: decodes wait for it, as ranges wait for their fetchers
        while self.decode_queue:
            free = [w for w in self._workers("decoder")
                    if self.ledger.of(w.name).decoding is None]
            if not free:
                return
            job = self._live(self.decode_queue.pop(0))
            if job is None:
                continue
            w = free[0]
            job.to(Phase.DECODING)
            if job.ring is not None and job.id not in self.ledger.of(gpu.name).jobs:
                self._start_gpu(gpu, job)   # a streamed job's waits for StreamInfo
            msg = self._decode_job(job)
            if job.resume_after is not None:
                msg = self._resumed(job, msg)
            if msg is not None:
                self.ledger.of(w.name).decoding = job.id
                self._send(w, msg)

    def _decode_job(self, job: Job) -> DecodeJob:
        job.decoder_backend = self.decoder_backend
        common = dict(job=job.id, segment=job.segment.name, amap=job.amap.name,
                      size=job.size, batch=self.config.batch, frame_limit=job.frame_limit,
                      readable_end=job.readable_end, regions=job.plan.regions())
        if job.way == "streamed":
            job.decoder_backend = "pyav"
            selection = None if job.selection.everything else job.selection.to_dict()
            most = self.config.max_selected
            if selection is not None and most is not None:
                selection["max_frames"] = min(selection["max_frames"] or most + 1, most + 1)
            return DecodeJob(**common, backend="pyav", seekable=not job.linear,
                             selection=selection, ring=job.ring.name if job.ring else None)
        track = job.track
        return DecodeJob(**common, backend=self.decoder_backend, ring=job.ring.name,
                         need_end=[int(x) for x in track.need_end()], moov=job.moov,
                         expected=track.frame_count, stream_index=track.index,
                         selected=job.selected, spans=job.spans)

    def _resumed(self, job: Job, msg: DecodeJob) -> DecodeJob | None:
        """The decode after a lost worker: only the frames after ``job.resume_after``
        (None: none is left, the job drains)."""
        after = job.resume_after
        if job.ring is not None:
            job.ring.reclaim([SlotRun(b.first_slot, b.count) for b in job.unanswered])
        if job.way == "streamed":
            return replace(msg, resume_after=after)
        todo = resume.rest(resume.expected(job.selected, job.frame_limit), after)
        if not todo:
            self._decoded(job, DecodeDone(job=job.id, frames=0, missing=[]))
            return None
        spans = None
        if msg.backend == "pyav":
            track = job.track
            spans = gop_spans(track.keyframes, track.presentation_order(), track.pts,
                              np.asarray(todo))
        return replace(msg, selected=todo, spans=spans)

    def on_stream_info(self, w, msg: StreamInfo) -> None:
        """A streamed job's decoder knows the picture: make its ring, start the GPU side."""
        job = self._live(msg.job)
        if job is None or self.ledger.of(w.name).decoding != msg.job:
            self._send(w, RingReady(job=msg.job, ring=None))
            return
        job.track = msg
        if not self._make_ring(job, msg.height, msg.width) \
                or not self._make_output(job, msg.height, msg.width):
            return                  # failed: its EndJob tells the decoder
        gpu = self._gpu()
        if gpu is None:
            self.fail(job, ErrorKind.PROCESSOR, f"{job.url}: the GPU worker is not running")
            return
        self._start_gpu(gpu, job)
        self._send(w, RingReady(job=job.id, ring=job.ring.name))

    def _start_gpu(self, gpu, job: Job) -> None:
        """The GPU worker attaches the job's ring; from now on its death fails the job."""
        self.ledger.of(gpu.name).jobs.add(job.id)
        self._send(gpu, GpuJob(job=job.id, ring=job.ring.name, processor=job.processor,
                               video=self._video_info(job)))

    @staticmethod
    def _video_info(job: Job) -> dict:
        """What a per-video processor's ``begin`` gets (``engine.processors.Video``)."""
        t = job.track
        return {"url": job.url, "width": t.width, "height": t.height, "fps": t.fps,
                "frames": job.frames_selected if job.frames_selected is not None
                else job.frame_limit, "codec": t.codec, "selection": job.selection.to_dict(),
                "output": job.output.name if job.output is not None else None}

    def on_batch(self, w, msg: BatchReady) -> None:
        job = self._live(msg.job)
        if job is None or job.stopping_decoder:
            return     # stopping: these frames are decoded again
        job.mark("first_frame", msg.decoded_at)
        gpu = self._gpu()
        if gpu is None and not self.ledger.serving(job.id):
            self.fail(job, ErrorKind.PROCESSOR, f"{job.url}: the GPU worker is not running")
            return
        job.unanswered.append(msg)
        job.forwarded.extend(msg.frame_numbers)
        if gpu is not None:     # else it died, and its death (yet to be handled) redoes this
            self.ledger.of(gpu.name).jobs.add(job.id)
            self._send(gpu, msg)

    def on_results(self, w, msg: BatchResults) -> None:
        job = self._live(msg.job)
        if job is None:
            return
        job.unanswered = [b for b in job.unanswered if b.frame_numbers != msg.frame_numbers]
        job.per_video = msg.per_video
        if msg.error:
            self.fail(job, ErrorKind.PROCESSOR, f"{job.url}: {msg.error}")
            return
        job.mark("first_result")
        for n, result in zip(msg.frame_numbers, msg.results):
            job.results[n] = result
        if job.stream:
            self._reply(job.client, ResultBatch(
                token=job.token, frame_numbers=list(msg.frame_numbers), results=msg.results,
                bytes_done=job.fetch.bytes, bytes_total=job.size,
                frames_total=job.frames_selected))
        self._maybe_finish(job)

    def on_decode_done(self, w, msg: DecodeDone) -> None:
        held = self.ledger.of(w.name)
        if held.decoding == msg.job:
            held.decoding = None
        job = self._live(msg.job)
        if job is not None and job.stopping_decoder:   # stopped: decode again (GPU lost)
            job.stopping_decoder = False
            self.decode_queue.insert(0, job.id)
            job = None
        self._dispatch_decodes()
        if job is not None:
            self._decoded(job, msg)

    def _decoded(self, job: Job, msg: DecodeDone) -> None:
        job.to(Phase.DRAINING)
        job.mark("decode_done")
        frames, missing = msg.frames, msg.missing
        if job.resume_after is not None:    # the earlier decoders' part, and its gaps
            kept = [n for n in job.forwarded if n <= job.resume_after]
            frames += len(kept)
            missing = sorted(set(missing) | set(resume.gaps(
                self._expected_upto(job), job.resume_after, kept)))
        job.decoded, job.missing = frames, missing
        if job.frames_selected is None:     # streamed: learned by decoding
            job.frames_selected = frames + len(missing)
            refused = selected_refusal(job, self.config.max_selected)
            if refused:
                self.fail(job, refused.kind, f"{job.url}: {refused.why}")
                return
        if msg.error and not frames:
            self.fail(job, ErrorKind.DECODE, f"{job.url}: {job.truncated or msg.error}")
            return
        # Frames are missing: the report keeps every frame that was decoded, and says
        # which are not there and why; it is never ok.
        problem = msg.error or (f"{len(missing)} of {frames + len(missing)} "
                                "frames could not be decoded" if missing else None)
        if problem:
            job.error = f"{job.url}: " + "; ".join(filter(None, (job.truncated, problem)))
            job.error_kind = ErrorKind.DECODE
        self._maybe_finish(job)

    def _expected_upto(self, job: Job) -> list[int]:
        if job.way == "streamed":
            return resume.expected_streamed(job.selection.frames, job.selection.everything,
                                            job.resume_after)
        return resume.expected(job.selected, job.frame_limit)

    def _maybe_finish(self, job: Job) -> None:
        """Every frame has its result: ask the GPU worker for the video's result (a
        per-video processor's ``end()``); the report goes out with its answer."""
        if job.phase is Phase.DRAINING and job.outstanding == 0:
            gpu = self._gpu()
            if gpu is None:     # dead: unless its death (yet to be handled) redoes the job
                if not self.ledger.serving(job.id):
                    self.fail(job, ErrorKind.PROCESSOR, f"{job.url}: the GPU worker is not "
                              "running")
                return
            job.to(Phase.ENDING)
            self.ledger.of(gpu.name).jobs.add(job.id)
            self._send(gpu, EndVideo(job=job.id))

    def on_video_result(self, w, msg: VideoResult) -> None:
        job = self._live(msg.job)
        if job is None or job.phase is not Phase.ENDING:
            return
        if msg.error:
            self.fail(job, ErrorKind.PROCESSOR, f"{job.url}: {msg.error}")
            return
        job.video_result = msg.value
        self.finish(job)

    # ------------------------------------------------------------------ end
    def finish(self, job: Job) -> None:
        job.to(Phase.DONE if job.error is None else Phase.FAILED)
        job.mark("total")
        self._release(job)
        self._reply(job.client, JobDone(token=job.token, report=job.report()))

    def fail(self, job: Job, kind: ErrorKind, message: str) -> None:
        if job.finished:
            return
        job.error, job.error_kind = message, kind
        self.finish(job)

    def _release(self, job: Job) -> None:
        """Stop everything the job has going and give back its memory."""
        if job.plan is not None:
            job.plan.drop_pending()
        if job.id in self.decode_queue:
            self.decode_queue.remove(job.id)
        for w in self.roster():
            if w.role in ("fetcher", "gpu") or self.ledger.of(w.name).decoding == job.id:
                self._send(w, EndJob(job=job.id))
        self.ledger.drop_job(job.id)
        self.memory.release(job, clean=job.phase is Phase.DONE)
        self.jobs.pop(job.id, None)
