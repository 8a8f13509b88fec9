"""Every job's way through the pipeline, as the supervisor sees it: fetch plan, segments,
decode, results, report.

The supervisor (``engine.supervisor``) keeps the processes alive and carries messages;
this keeps the jobs. It takes one event at a time -- a worker's message, a client's
request, a tick, a worker's death -- moves the jobs it concerns through their phases
(``engine.job.Phase``) and leaves what must be sent in its outbox (``take``); it never
touches a pipe or a socket, so its tests drive it with events and read the outbox.
What each worker holds is in ``self.ledger``. It runs in the supervisor's one thread, so
job state needs no locks.

Here are the events, the outbox and a job's start and end; the rest is in its parts:
``engine.fetching`` (head, ranges, admission), ``engine.locate`` (planned or streamed),
``engine.handoff`` (decoders, GPU worker, resuming after a death). Every segment a job
uses is made and given back through its ``Memory`` (``engine.memory``), the one part
that touches /dev/shm; workers only attach by name.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from engine.config import Config
from engine.errors import ErrorKind, SelectionError
from engine.fetching import Fetching
from engine.handoff import Handoff
from engine.job import Job, Phase
from engine.ledger import Ledger
from engine.locate import Locator
from engine.memory import Memory
from engine.messages import (BatchReady, BatchResults, DecodeDone, EndJob, HeadInfo, JobDone,
                             NeedBytes, RangeDone, RangeFailed, StreamInfo, Submit, VideoEnded,
                             WholeBody)
from engine.selection import Selection

log = logging.getLogger("engine.supervisor")

COLLECT = "engine.processors:collect"   # Engine.frames' processor


@dataclass(frozen=True)
class Send:
    """A message the supervisor is to send: to a worker (by name) or to a client."""
    to: object          # a worker's name (str), or a client connection
    msg: object

    @property
    def to_worker(self) -> bool:
        return isinstance(self.to, str)


class Pipeline(Fetching, Handoff):
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
        self.fetches: dict[int, Job] = {}     # fetch key -> its job (``Job.fetch_key``)
        self.job_ids = itertools.count(1)
        self.decode_queue: list[int] = []
        self.turn = 0                   # the job whose pieces go out first, in turn
        self.decoder_backend = self._pick_backend()
        self.locator = Locator(config, self.decoder_backend)
        self.handlers = {RangeDone: self.on_range_done, BatchReady: self.on_batch,
                         BatchResults: self.on_results, HeadInfo: self.on_head,
                         RangeFailed: self.on_range_failed, NeedBytes: self.on_need_bytes,
                         DecodeDone: self.on_decode_done, StreamInfo: self.on_stream_info,
                         VideoEnded: self.on_video_ended, WholeBody: self.on_whole_body}

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
    def _new_fetch(self, job: Job, key: int) -> None:
        self.fetches.pop(job.fetch_key, None)
        job.fetch_key = key
        self.fetches[key] = job

    def _fetching(self, key: int) -> Job | None:
        """The live job a fetcher's message is about (None: its fetch has ended)."""
        job = self.fetches.get(key)
        return job if job is not None and not job.finished else None

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
                    # a new fetch key: the fetchers ended the old one (EndJob at _admit)
                    self._new_fetch(job, next(self.job_ids))
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
        self._new_fetch(job, job.id)
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

    def release_output(self, client, name: str) -> None:
        """A client copied its frames out (or went away): the block goes."""
        self.memory.release_output(client, name)

    def close(self) -> None:
        """The engine stops: give back the pooled rings and frames nobody took (live jobs
        are failed first)."""
        self.memory.close()

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
            if w.role == "fetcher":
                self._send(w, EndJob(job=job.fetch_key))
            elif w.role == "gpu" or self.ledger.of(w.name).decoding == job.id:
                self._send(w, EndJob(job=job.id))
        self.ledger.drop_job(job.fetch_key)
        self.ledger.drop_job(job.id)
        self.memory.release(job, clean=job.phase is Phase.DONE)
        self.jobs.pop(job.id, None)
        self.fetches.pop(job.fetch_key, None)
