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
                             RangeDone, RangeFailed, ResultBatch, SegmentReady, Submit,
                             VideoResult)
from engine.plan import Piece, RangePlan
from workers.decoder import fetch_end
from shm import AvailabilityMap, FrameRing, SharedBlock, ShmError, segment_name

if TYPE_CHECKING:
    from engine.supervisor import WorkerHandle

log = logging.getLogger("engine.supervisor")

RING_POOL = 2          # finished rings kept per frame size
SPECULATIVE_PARTIAL = 3  # ranges sent with the head of a partial job: [H, 2H), [2H, 4H), [4H, 8H)
MAX_RANGE_ATTEMPTS = 4


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
        elif isinstance(msg, VideoResult):
            self.on_video_result(w, msg)

    def tick(self, now: float) -> None:
        """Deadlines, heads that wait for a fetcher, and pieces and decodes to hand out."""
        for job in self.live:
            if now > job.deadline:
                self.fail(job, "JobTimeout", f"{job.url}: job exceeded its deadline of "
                          f"{self.config.job_timeout_s:g} s (ENGINE_JOB_TIMEOUT_S)")
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
        if msg.content_type.split(";")[0].strip().lower().startswith("text/"):
            self.sup.send_worker(w, SegmentReady(msg.job, None, None))
            self.fail(job, "DecodeError", f"{job.url}: server sent {msg.content_type.split(';')[0]}"
                      ", not a video")
            return
        if self.shm_in_use + msg.size > cfg.max_bytes:
            self._drop_ring_pool()
        if self.shm_in_use + msg.size > cfg.max_bytes:
            self.sup.send_worker(w, SegmentReady(msg.job, None, None))
            self.fail(job, "FetchError", f"{job.url}: refused: jobs in flight already hold "
                      f"{self.shm_in_use / 1e6:.0f} MB of shared memory (ENGINE_MAX_BYTES)")
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

    def _plan_after_head(self, job: Job, prefix=None) -> None:
        """Find the moov and plan the remaining ranges: from the first bytes of the head
        as soon as they arrive (``prefix``, in ``HeadInfo``), else from the whole head."""
        if job.planned:
            return
        final = prefix is None
        head = memoryview(job.segment.mm)[:job.head_len] if final else prefix
        try:
            loc = mp4.locate_moov(head, job.size)
        except mp4.NotMP4 as exc:
            self.fail(job, "DecodeError", f"{job.url}: {exc}")
            return
        if loc is None and not final:
            return                      # the prefix says too little: wait for the head
        job.planned = True
        partial = job.max_frames is not None or job.partial_mb is not None
        if loc is None:
            job.plan.extend(job.size)   # unknown layout: fetch it all, find the moov later
            return
        job.moov_layout = loc.layout
        moov_end = job.size if loc.size is None else loc.offset + loc.size
        job.moov = (loc.offset, moov_end)
        if loc.layout == "end":
            job.plan.urgent(loc.offset, moov_end)
            if not partial:
                job.plan.extend(loc.offset)
        else:
            job.plan.extend(moov_end if partial else job.size)
        self._check_moov(job)

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
        if job.track is not None or job.moov is None or job.finished:
            return
        start, end = job.moov
        if not job.amap.present(start, end - start):
            return
        job.mark("moov_ready")
        try:
            mm = job.segment.mm
            job.track = mp4.parse_moov(memoryview(mm)[start:end])
        except mp4.NotMP4 as exc:
            self.fail(job, "DecodeError", f"{job.url}: {exc}")
            return
        track = job.track
        if track.frame_count == 0:
            self.fail(job, "DecodeError", f"{job.url}: the video track has no frames")
            return
        data_end = int((track.offsets + track.sizes).max())
        if data_end > job.size:
            self.fail(job, "DecodeError", f"{job.url}: truncated file: its frames need "
                      f"{data_end} bytes but the file has {job.size}")
            return
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
        shape = (self.config.ring_slots, track.height, track.width)
        pooled = self.ring_pool.get(shape)
        if pooled:
            job.ring = pooled.pop()     # already counted in shm_in_use
            job.ring.reset()
        else:
            try:
                job.ring = FrameRing.create(segment_name(os.getpid(), job.id, ".ring"), *shape)
            except ShmError as exc:
                self.fail(job, "FetchError", f"{job.url}: {exc}")
                return
            self.shm_in_use += job.ring.block.size
        self.decode_queue.append(job.id)
        self._dispatch_decodes()

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
                if job.moov is None:   # layout unknown from the head: look again now
                    try:
                        loc = mp4.locate_moov(job.segment.mm, job.size)
                    except mp4.NotMP4 as exc:
                        self.fail(job, "DecodeError", f"{job.url}: {exc}")
                        return
                    if loc is None or loc.size is None:
                        self.fail(job, "DecodeError", f"{job.url}: no moov box in the file "
                                  "(not a complete MP4)")
                        return
                    job.moov_layout = loc.layout
                    job.moov = (loc.offset, loc.offset + loc.size)
                    self._check_moov(job)

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
            gpu.jobs.add(job.id)   # from now on its death fails this job
            self.sup.send_worker(gpu, GpuJob(job.id, job.ring.name, job.processor,
                                             self._video_info(job)))
            readable = job.readable_end
            self.sup.send_worker(w, DecodeJob(
                job.id, job.segment.name, job.amap.name, job.ring.name, job.size,
                self.decoder_backend, self.config.batch,
                [int(x) for x in job.track.need_end()], job.frame_limit, readable,
                job.moov, job.plan.regions()))

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
        if msg.error:
            self.fail(job, "DecodeError", f"{job.url}: {msg.error}")
            return
        job.missing = msg.missing
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
        if keep is not None:   # a pooled ring still holds its memory
            self.ring_pool[(keep.slots, keep.height, keep.width)].append(keep)
            self.shm_in_use += keep.block.size
        for shared in (job.segment, job.amap, job.ring):
            if shared is not None and shared is not keep:
                shared.unlink()
                shared.close()
        job.segment = job.amap = job.ring = None
        self.jobs.pop(job.id, None)
