"""The pipeline's specification: a job's phases, driven by events, with no processes.

A ``Pipeline`` takes one event at a time (a worker's message, a client's request, a tick,
a worker's death) and leaves what must be sent in its outbox. These tests play the
workers' parts: the "fetchers" write the file's real bytes into the job's real segment
and answer ``RangeDone``; the "decoder" and "GPU worker" answer with their messages. Each
test reads the outbox and the job's phase after every step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from engine.config import Config
from engine.errors import ErrorKind
from engine.job import Job, Phase
from engine.memory import Memory
from engine.messages import (BatchReady, BatchResults, DecodeDone, DecodeJob, EndJob, EndVideo,
                             FetchHead, FetchRange, FetchStats, GpuJob, HeadInfo, JobDone,
                             NeedBytes, RangeDone, RangeFailed, ReadWhole, RingReady,
                             SegmentReady, StreamInfo, Submit, VideoEnded, WholeBody)
from engine.pipeline import Pipeline
from engine.selection import Selection
from engine.shm import AvailabilityMap, Cancelled, FrameRing, SharedBlock
from engine.shm.ring import SlotRun
from engine.shm.block import PREFIX, SHM_DIR

URL = "https://cdn.test/clip.mp4"
PREFIX_BYTES = 16 * 1024        # what a fetcher sends with HeadInfo


@dataclass
class FakeWorker:
    name: str
    role: str
    ready: bool = True
    alive: bool = True


class Harness:
    """A pipeline and the workers' side of it. ``data`` is the file the fetchers serve."""

    made: list["Harness"] = []

    def __init__(self, data: bytes, free=None, **config):
        """``free``: what /dev/shm has free, as the pipeline's memory reads it."""
        Harness.made.append(self)
        self.data = data
        self.workers = {name: FakeWorker(name, role) for name, role in (
            ("fetcher0", "fetcher"), ("fetcher1", "fetcher"), ("decoder0", "decoder"),
            ("gpu", "gpu"))}
        cfg = Config.from_env({}).with_(**config)
        self.p = Pipeline(cfg, lambda: [w for w in self.workers.values() if w.alive],
                          Memory(cfg, free) if free else None)
        self.client = object()
        self.sent: list = []             # every Send so far
        self.pending: dict[tuple[int, int], tuple] = {}   # (job, offset) -> (worker, msg)
        self.segments: dict[int, tuple] = {}

    # -- events in, outbox out
    def step(self, fn, *args) -> list:
        fn(*args)
        out = self.p.take()
        self.sent += out
        for s in out:
            if isinstance(s.msg, (FetchHead, FetchRange)):
                self.pending[(s.msg.job, getattr(s.msg, "offset", 0))] = (s.to, s.msg)
            elif isinstance(s.msg, SegmentReady) and s.msg.segment:
                self.segments.setdefault(s.msg.job, (SharedBlock.attach(s.msg.segment),
                                                     AvailabilityMap.attach(s.msg.amap)))
            elif isinstance(s.msg, EndJob):
                self.pending = {k: v for k, v in self.pending.items() if k[0] != s.msg.job}
        return out

    def submit(self, **selection) -> Job:
        self.step(self.p.submit, self.client, Submit(token=1, url=URL,
                                                     selection=Selection.of(**selection)))
        return next(iter(self.p.jobs.values()))

    def msg(self, worker: str, msg) -> list:
        return self.step(self.p.on_message, self.workers[worker], msg)

    def head(self, job: Job, size: int | None = None, ranged: bool = True, prefix=None,
             content_type: str = "video/mp4") -> list:
        worker, _ = self.pending[(job.fetch_key, 0)]
        size = len(self.data) if size is None else size
        return self.msg(worker, HeadInfo(
            job=job.fetch_key, size=size, ranged=ranged, url=URL, content_type=content_type,
            stats=FetchStats(new_connection=True, started=time.monotonic()),
            prefix=self.data[:PREFIX_BYTES] if prefix is None else prefix))

    def deliver(self, job_id: int, offset: int) -> list:
        """A fetcher writes its range's real bytes into the segment and says so."""
        worker, msg = self.pending.pop((job_id, offset))
        block, amap = self.segments[job_id]
        head = isinstance(msg, FetchHead)
        if offset >= len(self.data):     # asked with the head, past the end: the server's 416
            return self.msg(worker, RangeFailed(
                job=job_id, offset=offset, end=msg.end, written=offset, error="HTTP 416",
                kind=ErrorKind.FETCH, retryable=False, speculative=msg.segment is None))
        end = min(len(self.data), msg.length if head else msg.end)
        block.mm[offset:end] = self.data[offset:end]
        amap.mark(offset, end)
        return self.msg(worker, RangeDone(job=job_id, offset=offset, end=end, head=head,
                                          stats=FetchStats(bytes=end - offset)))

    def fetch_all(self, job: Job) -> None:
        """Serve every range asked for, new ones included, until none is left."""
        while True:
            mine = sorted(k for k in self.pending if k[0] == job.fetch_key)
            if not mine:
                return
            self.deliver(*mine[0])
            self.step(self.p.dispatch)

    def to_worker(self, name: str, kind) -> list:
        return [s.msg for s in self.sent if s.to == name and isinstance(s.msg, kind)]

    def report(self) -> dict:
        done = [s.msg for s in self.sent if s.to is self.client and isinstance(s.msg, JobDone)]
        assert len(done) == 1, done
        return done[0].report


def _segments_of_this_process() -> list[str]:
    import os
    return [n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX) and f"-{os.getpid()}-" in n]


@pytest.fixture(scope="module")
def clip(small_clips) -> bytes:
    return small_clips["small"].read_bytes()


@pytest.fixture(scope="module")
def clip_moov_end(small_clips) -> bytes:
    return small_clips["small-moov-end"].read_bytes()


def _longer(tmp_path_factory, faststart: bool) -> bytes:
    """200 frames, about 1 MB: longer than the head and the ranges sent with it."""
    from engine.demo.clips import make_clip
    return make_clip(tmp_path_factory.mktemp("clip") / "longer.mp4", frames=200, width=640,
                     height=360, faststart=faststart).read_bytes()


@pytest.fixture(scope="module")
def longer_clip(tmp_path_factory) -> bytes:
    return _longer(tmp_path_factory, True)


@pytest.fixture(scope="module")
def longer_moov_end(tmp_path_factory) -> bytes:
    return _longer(tmp_path_factory, False)


@pytest.fixture(autouse=True)
def no_segment_left():
    yield
    for h in Harness.made:
        for block, amap in h.segments.values():
            block.close()
            amap.close()
        h.p.fail_all(ErrorKind.ENGINE, "test over")
        h.p.close()
    Harness.made.clear()
    assert _segments_of_this_process() == []


# ---------------------------------------------------------------- the planned way


def _run_planned(h: Harness, job: Job, frames: int) -> None:
    decode = h.to_worker("decoder0", DecodeJob)
    assert len(decode) == 1 and decode[0].ring and decode[0].expected == frames
    assert job.phase is Phase.DECODING
    gpu_job, = h.to_worker("gpu", GpuJob)
    assert gpu_job.ring == decode[0].ring and gpu_job.video["frames"] == frames
    # the decoder's batches go on to the GPU worker as they are
    batch = BatchReady(job=job.id, first_slot=0, count=frames, frame_numbers=list(range(frames)),
                       decoded_at=time.monotonic())
    h.msg("decoder0", batch)
    assert h.to_worker("gpu", BatchReady) == [batch]
    h.msg("gpu", BatchResults(job=job.id, first_slot=0, count=frames,
                              frame_numbers=list(range(frames)), results=[{}] * frames))
    assert job.phase is Phase.DECODING       # results in, but the decoder has not finished
    h.msg("decoder0", DecodeDone(job=job.id, frames=frames, missing=[]))
    assert job.phase is Phase.ENDING and h.to_worker("gpu", EndVideo) == [EndVideo(job=job.id)]
    h.msg("gpu", VideoEnded(job=job.id, value={"events": []}))
    assert job.phase is Phase.DONE


def test_planned_job_from_submit_to_report(clip):
    h = Harness(clip)
    job = h.submit()
    assert job.phase is Phase.HEAD
    heads = [s for s in h.sent if isinstance(s.msg, FetchHead)]
    speculative = [s for s in h.sent if isinstance(s.msg, FetchRange)]
    assert len(heads) == 1
    # every other connection asks for the bytes after the head before the size is known
    assert len(speculative) == 2 * 4 - 1 and all(s.msg.segment is None for s in speculative)
    assert h.p.ledger.of("fetcher0").load + h.p.ledger.of("fetcher1").load == 8

    h.head(job)
    ready = [s for s in h.sent if isinstance(s.msg, SegmentReady)]
    assert {s.to for s in ready} == {"fetcher0", "fetcher1"}   # every holder hears of it
    assert job.phase is Phase.LOCATING and job.moov_layout == "front"

    h.fetch_all(job)
    assert job.fetched and job.plan.finished
    _run_planned(h, job, 50)
    report = h.report()
    assert report["ok"] and report["plan"] == "planned" and report["frames_processed"] == 50
    assert report["video"]["frames"] == 50 and report["video"]["moov"] == "front"
    assert report["video_result"] == {"events": []}
    assert report["fetch"]["bytes"] == len(clip)
    assert [k for k, v in report["timings_s"].items() if v is None] == []
    assert h.p.jobs == {} and all(h.p.ledger.of(w).idle for w in h.workers)


def test_moov_at_the_end_is_fetched_first(longer_moov_end):
    data = longer_moov_end
    h = Harness(data, connections=1)     # one range goes with the head: the rest is planned
    job = h.submit()
    h.head(job)
    assert job.phase is Phase.HEAD     # its first bytes show no moov: wait for the whole head
    h.deliver(job.id, 0)
    # the head shows ftyp, free and the mdat's header: the next header is where the mdat
    # ends; it is fetched before anything else, and never guessed to be the moov
    assert job.phase is Phase.LOCATING and job.moov_layout == "end" and job.moov is None
    mdat_end = data.index(b"moov") - 4
    start, end = job.plan.extra[0]           # planned ahead of everything (chunk-aligned)
    assert start <= mdat_end < end
    h.step(h.p.dispatch)
    planned = [s.msg for s in h.sent if isinstance(s.msg, FetchRange) and s.msg.segment]
    assert planned[0].offset <= mdat_end < planned[0].end
    h.fetch_all(job)
    assert job.moov[0] == mdat_end
    _run_planned(h, job, 200)
    assert h.report()["ok"] and h.report()["video"]["moov"] == "end"


def test_max_frames_fetches_only_the_bytes_those_frames_need(clip_moov_end):
    h = Harness(clip_moov_end)
    job = h.submit(max_frames=5)
    h.head(job)
    h.fetch_all(job)
    decode, = h.to_worker("decoder0", DecodeJob)
    assert decode.frame_limit == 5 and decode.readable_end < len(clip_moov_end)
    h.p.fail(job, ErrorKind.ENGINE, "stop")
    h.p.take()


def test_a_sparse_selection_fetches_only_its_gops(longer_moov_end):
    """frames=[120] of a 200-frame clip with a keyframe every 50 at most: the moov, then
    only the bytes of the GOP that holds it; the decoder is told the frame and the span."""
    h = Harness(longer_moov_end)
    job = h.submit(frames=[120])
    # the selected frame may lie anywhere: nothing is asked beside the head
    assert [k for k in h.pending if k[0] == job.id] == [(job.id, 0)]
    h.head(job)
    h.fetch_all(job)
    decode, = h.to_worker("decoder0", DecodeJob)
    assert decode.selected == [120] and len(decode.spans) == 1
    first, last = decode.spans[0]
    track = job.track
    decode_index = int(track.presentation_order()[120])
    assert first == max(k for k in range(decode_index + 1) if track.keyframes[k])
    assert first > 0 and last >= decode_index
    lo = int(track.offsets[first])
    hi = int(track.offsets[last] + track.sizes[last])
    moov_chunk = job.moov[0] - job.moov[0] % 65536
    fetched = [r for r in job.plan.regions() if r[1] > h.p.config.head_bytes and r[0] < moov_chunk]
    assert fetched and all(lo - 65536 < a and b <= hi + 65536 for a, b in fetched)
    assert job.frames_selected == 1
    h.p.fail(job, ErrorKind.ENGINE, "stop")
    h.p.take()


@pytest.mark.parametrize("selection, selects", [(dict(count=4), 4), (dict(), 50)])
def test_max_selected_refuses_a_larger_selection(clip, selection, selects):
    h = Harness(clip, max_selected=3)
    job = h.submit(**selection)
    h.head(job)
    h.fetch_all(job)
    report = h.report()
    assert not report["ok"] and report["error_kind"] == ErrorKind.SELECTION
    assert report["error"].endswith(f"the job selects {selects} frames, over the limit of 3 "
                                    "(ENGINE_MAX_SELECTED)")
    assert h.to_worker("decoder0", DecodeJob) == []


def test_a_selection_past_the_end_fails_with_the_frame_count(clip):
    h = Harness(clip)
    job = h.submit(frames=[50])
    h.head(job)
    h.fetch_all(job)
    report = h.report()
    assert not report["ok"] and report["error_kind"] == ErrorKind.SELECTION
    assert "it has 50 frames" in report["error"]


# ---------------------------------------------------------------- the streamed way


def test_a_streamed_job_waits_for_a_restarting_gpu_worker_for_its_ring():
    """The picture becomes known while the GPU worker is down: the decoder's ring comes
    when a new GPU worker runs, and the job goes on."""
    data = b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 2000
    h = Harness(data)
    job = h.submit()
    h.head(job)
    h.fetch_all(job)
    h.workers["gpu"].alive = False
    h.step(h.p.worker_lost, h.workers["gpu"], "killed by signal SIGKILL")
    h.msg("decoder0", StreamInfo(job=job.id, codec="h264", width=64, height=48, fps=25.0))
    assert not job.finished and h.to_worker("decoder0", RingReady) == []
    h.workers["gpu"].alive = True
    h.step(h.p.tick, time.monotonic())
    ring, = h.to_worker("decoder0", RingReady)
    gpu_job, = h.to_worker("gpu", GpuJob)
    assert ring.ring == gpu_job.ring and not job.finished
    h.p.fail(job, ErrorKind.ENGINE, "stop")
    h.p.take()


def test_what_cannot_be_planned_is_streamed_front_to_back():
    data = b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 2000      # an EBML (Matroska) header
    h = Harness(data)
    job = h.submit()
    h.head(job)
    # its first bytes are no MP4: decoding starts now, reading as the bytes arrive
    assert job.phase is Phase.DECODING and job.way == "streamed"
    assert job.plan.regions() == [(0, len(data))]
    h.fetch_all(job)
    decode, = h.to_worker("decoder0", DecodeJob)
    assert decode.ring is None and decode.expected is None and decode.backend == "pyav"
    assert h.to_worker("gpu", GpuJob) == []          # the picture is not known yet
    h.msg("decoder0", StreamInfo(job=job.id, codec="h264", width=64, height=48, fps=25.0))
    ring, = h.to_worker("decoder0", RingReady)
    gpu_job, = h.to_worker("gpu", GpuJob)
    assert ring.ring == gpu_job.ring and gpu_job.video["width"] == 64
    h.msg("decoder0", DecodeDone(job=job.id, frames=0, missing=[], error="not a video"))
    report = h.report()
    assert not report["ok"] and report["error_kind"] == ErrorKind.DECODE
    assert report["plan"] == "streamed" and job.phase is Phase.FAILED


@pytest.mark.parametrize("name, seekable", [("clip", False), ("clip_moov_end", True)])
def test_a_server_without_range_is_decoded_as_its_one_body_arrives(request, name, seekable):
    data = request.getfixturevalue(name)
    h = Harness(data)
    job = h.submit()
    h.head(job, ranged=False)      # 200 for the head's Range: the whole body comes on it
    assert job.phase is Phase.DECODING and job.way == "streamed"
    decode, = h.to_worker("decoder0", DecodeJob)
    # front to back, unless the mdat comes before the moov (FFmpeg must seek to it)
    assert decode.seekable is seekable
    assert job.plan.regions() == [(0, len(data))] and not job.plan.pending
    h.step(h.p.fail, job, ErrorKind.ENGINE, "stop")


# ---------------------------------------------------------------- faults


def test_a_range_that_fails_is_retried_from_where_it_stopped(longer_clip):
    h = Harness(longer_clip)
    job = h.submit()
    h.head(job)
    h.deliver(job.id, 0)
    (offset, end, worker), *_ = h.p.ledger.ranges_of(job.id)
    h.pending.pop((job.id, offset))
    h.msg(worker, RangeFailed(job=job.id, offset=offset, end=end, written=offset + 70_000,
                              error="reset", kind=ErrorKind.FETCH, retryable=True, attempt=0))
    assert job.fetch.retries == 1 and job.phase is not Phase.FAILED
    time.sleep(0.06)                 # the retry's back-off
    h.step(h.p.dispatch)
    retry = [m for _, m in h.pending.values() if isinstance(m, FetchRange) and m.attempt == 1]
    assert len(retry) == 1 and retry[0].offset == offset + 65536   # the chunk it was in
    h.fetch_all(job)
    _run_planned(h, job, 200)
    assert h.report()["ok"] and h.report()["fetch"]["retries"] == 1


def test_a_range_that_cannot_be_retried_fails_the_job(clip):
    h = Harness(clip)
    job = h.submit()
    h.head(job)
    (offset, end, worker), *_ = h.p.ledger.ranges_of(job.id)
    h.msg(worker, RangeFailed(job=job.id, offset=offset, end=end, written=offset,
                              error=f"{URL}: HTTP 403 Forbidden", kind=ErrorKind.FETCH,
                              retryable=False))
    report = h.report()
    assert report["error"] == f"{URL}: HTTP 403 Forbidden" and report["error_kind"] == "FetchError"
    assert job.phase is Phase.FAILED
    ends = {s.to for s in h.sent if isinstance(s.msg, EndJob)}
    assert {"fetcher0", "fetcher1", "gpu"} <= ends


def test_a_lost_fetcher_s_ranges_go_to_the_other_one(longer_clip):
    h = Harness(longer_clip)
    job = h.submit()
    h.head(job)
    lost = h.workers["fetcher1"]
    held = set(h.p.ledger.of("fetcher1").ranges) | {(j, 0) for j in h.p.ledger.of("fetcher1").heads}
    assert held
    lost.alive = False
    h.pending = {k: v for k, v in h.pending.items() if v[0] != "fetcher1"}
    h.step(h.p.worker_lost, lost, "killed by signal SIGKILL")
    h.step(h.p.dispatch)
    assert all(worker == "fetcher0" for worker, _ in h.pending.values())
    # every range it held within the file is asked for again, or waits for a connection
    again = set(h.pending) | {(job.id, p.offset) for p in job.plan.pending}
    assert {(j, o) for j, o in held if o < len(longer_clip)} <= again
    h.fetch_all(job)
    _run_planned(h, job, 200)
    assert h.report()["ok"]


# ---------------------------------------------------------------- a worker lost mid-job
# (engine.resume): the job goes on after the frames that survive, the processor sees
# ascending frames, none twice.


def _decoding(h: Harness) -> Job:
    job = h.submit()
    h.head(job)
    h.fetch_all(job)
    assert job.phase is Phase.DECODING
    return job


def _batch(h: Harness, job: Job, first: int, last: int, slot: int = 0) -> BatchReady:
    numbers = list(range(first, last + 1))
    msg = BatchReady(job=job.id, first_slot=slot, count=len(numbers), frame_numbers=numbers,
                     decoded_at=time.monotonic())
    h.msg("decoder0", msg)
    return msg


def _answer(h: Harness, batch: BatchReady, per_video: bool = False) -> None:
    h.msg("gpu", BatchResults(job=batch.job, first_slot=batch.first_slot, count=batch.count,
                              frame_numbers=batch.frame_numbers,
                              results=[{"n": n} for n in batch.frame_numbers],
                              per_video=per_video))


def _lose(h: Harness, name: str, cause: str = "killed by signal SIGKILL") -> None:
    """The worker dies; the supervisor restarts it (same name) and it says Hello."""
    h.workers[name].alive = False
    h.step(h.p.worker_lost, h.workers[name], cause)
    h.workers[name].alive = True
    h.step(h.p.dispatch)


def _finish(h: Harness, job: Job, batches, frames: int, missing=()) -> dict:
    for b in batches:
        _answer(h, b)
    h.msg("decoder0", DecodeDone(job=job.id, frames=frames, missing=list(missing)))
    h.msg("gpu", VideoEnded(job=job.id))
    return h.report()


def test_a_lost_decoder_s_job_goes_on_after_the_frames_it_handed_on(clip):
    h = Harness(clip)
    job = _decoding(h)
    first = h.to_worker("decoder0", DecodeJob)[0]
    ring = FrameRing.attach(first.ring)
    for _ in range(7):          # the decoder wrote frames 0-5 and was writing frame 6
        ring.reserve(0)
    ring.publish(SlotRun(0, 6))
    done, pending = _batch(h, job, 0, 1), _batch(h, job, 2, 5, slot=2)
    _answer(h, done)
    _lose(h, "decoder0", "killed by signal SIGSEGV")
    again = h.to_worker("decoder0", DecodeJob)[1]
    # frames 6-49 only, from the keyframe before frame 6; the same ring, the same GPU job
    assert again.selected == list(range(6, 50)) and again.ring == first.ring
    assert again.spans[0][0] == 0 and again.spans[-1][1] == 49
    assert len(h.to_worker("gpu", GpuJob)) == 1
    # the unanswered batch's slots stay with the GPU worker; the lost decoder's slot is free
    assert list(ring.states()[:7]) == [0, 0, 2, 2, 2, 2, 0]
    ring.close()
    rest = _batch(h, job, 6, 49, slot=6)
    report = _finish(h, job, [pending, rest], 44)
    assert report["ok"] and [r["frame_number"] for r in report["results"]] == list(range(50))
    assert report["frames_processed"] == 50 and report["video"]["frames"] == 50


def test_a_decoder_lost_after_its_last_batch_leaves_nothing_to_decode(clip):
    h = Harness(clip)
    job = _decoding(h)
    batch = _batch(h, job, 0, 49)
    _lose(h, "decoder0")
    assert len(h.to_worker("decoder0", DecodeJob)) == 1 and job.phase is Phase.DRAINING
    _answer(h, batch)
    h.msg("gpu", VideoEnded(job=job.id))
    assert h.report()["ok"] and h.report()["frames_processed"] == 50


def test_a_frame_the_lost_decoder_could_not_decode_stays_missing(clip):
    h = Harness(clip)
    job = _decoding(h)
    batches = [_batch(h, job, 0, 2), _batch(h, job, 4, 9, slot=3)]   # frame 3: corrupt
    _lose(h, "decoder0")
    assert h.to_worker("decoder0", DecodeJob)[1].selected == list(range(10, 50))
    report = _finish(h, job, batches + [_batch(h, job, 10, 49, slot=9)], 40)
    assert not report["ok"] and report["missing_frames"] == [3]
    assert report["frames_processed"] == 49 and "1 of 50 frames" in report["error"]


def test_a_streamed_job_s_new_decoder_skips_what_was_delivered():
    data = b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 2000
    h = Harness(data)
    job = h.submit()
    h.head(job)
    h.fetch_all(job)
    h.msg("decoder0", StreamInfo(job=job.id, codec="h264", width=64, height=48, fps=25.0))
    ring, = h.to_worker("decoder0", RingReady)
    batch = _batch(h, job, 0, 6)
    _lose(h, "decoder0")
    again = h.to_worker("decoder0", DecodeJob)[1]
    assert again.resume_after == 6 and again.ring == ring.ring and again.backend == "pyav"
    assert len(h.to_worker("gpu", GpuJob)) == 1
    report = _finish(h, job, [batch, _batch(h, job, 7, 9, slot=7)], 3)
    assert report["ok"] and report["frames_processed"] == 10 and report["frames_selected"] == 10


def test_a_decoder_that_dies_twice_on_a_job_fails_it_with_one_line(clip):
    h = Harness(clip)
    job = _decoding(h)
    _lose(h, "decoder0", "killed by signal SIGSEGV")
    assert job.phase is Phase.DECODING
    _lose(h, "decoder0", "killed by signal SIGSEGV")
    report = h.report()
    assert report["error_kind"] == "DecodeError" and "\n" not in report["error"]
    assert "decoder process died 2 times on this job (last: killed by signal SIGSEGV)" \
        in report["error"]
    assert len(h.to_worker("decoder0", DecodeJob)) == 2


def test_a_lost_gpu_worker_s_unanswered_batches_are_decoded_again(clip):
    h = Harness(clip)
    job = _decoding(h)
    first = h.to_worker("decoder0", DecodeJob)[0]
    answered, lost = _batch(h, job, 0, 4), _batch(h, job, 5, 9, slot=5)
    _answer(h, answered)
    _lose(h, "gpu")
    # the decoder is still at it: its ring is cancelled, its next batches are dropped
    ring = FrameRing.attach(first.ring)
    with pytest.raises(Cancelled):
        ring.reserve(0)
    _batch(h, job, 10, 14, slot=10)
    assert h.to_worker("gpu", BatchReady) == [answered, lost]
    h.msg("decoder0", DecodeDone(job=job.id, frames=0, missing=[], error="cancelled"))
    # once it has stopped: the new GPU worker gets the job, the decoder frames 5 on
    assert len(h.to_worker("gpu", GpuJob)) == 2
    again = h.to_worker("decoder0", DecodeJob)[1]
    assert again.selected == list(range(5, 50)) and ring.reserve(0) is not None
    ring.close()
    report = _finish(h, job, [_batch(h, job, 5, 49, slot=11)], 45)
    assert report["ok"] and [r["frame_number"] for r in report["results"]] == list(range(50))


def test_a_batch_that_comes_before_the_gpu_worker_s_death_is_handled_waits_for_it(clip):
    """The GPU worker's process is gone, its death not yet handled (the supervisor sees
    the decoder's messages first): the job is not failed, its death redoes the batch."""
    h = Harness(clip)
    job = _decoding(h)
    _answer(h, _batch(h, job, 0, 3))
    h.workers["gpu"].alive = False
    _batch(h, job, 4, 49, slot=4)
    h.msg("decoder0", DecodeDone(job=job.id, frames=50, missing=[]))
    assert job.phase is Phase.DRAINING and not job.finished
    h.step(h.p.worker_lost, h.workers["gpu"], "killed by signal SIGKILL")
    h.workers["gpu"].alive = True
    h.step(h.p.dispatch)
    assert h.to_worker("decoder0", DecodeJob)[1].selected == list(range(4, 50))
    report = _finish(h, job, [_batch(h, job, 4, 49, slot=4)], 46)
    assert report["ok"] and [r["frame_number"] for r in report["results"]] == list(range(50))


def test_a_gpu_worker_lost_while_ending_is_asked_again(clip):
    h = Harness(clip)
    job = _decoding(h)
    batch = _batch(h, job, 0, 49)
    _answer(h, batch)
    h.msg("decoder0", DecodeDone(job=job.id, frames=50, missing=[]))
    assert job.phase is Phase.ENDING
    _lose(h, "gpu")
    # every result is in: no decode, the new worker ends the video
    assert len(h.to_worker("decoder0", DecodeJob)) == 1
    assert len(h.to_worker("gpu", GpuJob)) == 2 and len(h.to_worker("gpu", EndVideo)) == 2
    h.msg("gpu", VideoEnded(job=job.id))
    assert h.report()["ok"] and h.report()["frames_processed"] == 50


def test_a_per_video_processor_s_video_starts_again_from_frame_0(clip):
    h = Harness(clip)
    job = _decoding(h)
    batch = _batch(h, job, 0, 49)
    _answer(h, batch, per_video=True)
    h.msg("decoder0", DecodeDone(job=job.id, frames=50, missing=[]))
    _lose(h, "gpu")
    assert job.results == {} and job.phase is Phase.DECODING
    again = h.to_worker("decoder0", DecodeJob)[1]
    assert again.selected == list(range(50)) and len(h.to_worker("gpu", GpuJob)) == 2
    report = _finish(h, job, [_batch(h, job, 0, 49)], 50)
    assert report["ok"] and report["frames_processed"] == 50


def test_a_per_video_processor_whose_results_reached_the_client_fails_the_job(clip):
    h = Harness(clip)
    h.step(h.p.submit, h.client, Submit(token=1, url=URL, stream=True))
    job = next(iter(h.p.jobs.values()))
    h.head(job)
    h.fetch_all(job)
    _answer(h, _batch(h, job, 0, 4), per_video=True)
    _lose(h, "gpu")
    report = h.report()
    assert report["error_kind"] == "ProcessorError" and "\n" not in report["error"]
    assert "GPU worker crashed (killed by signal SIGKILL) after results of this video " \
        "reached the client" in report["error"]


def test_a_gpu_worker_that_dies_twice_on_a_job_fails_it(clip):
    h = Harness(clip)
    job = _decoding(h)
    _lose(h, "gpu")
    h.msg("decoder0", DecodeDone(job=job.id, frames=0, missing=[], error="cancelled"))
    _lose(h, "gpu", "exited with code 139")
    report = h.report()
    assert report["error_kind"] == "ProcessorError"
    assert "GPU worker died 2 times on this job (last: exited with code 139)" in report["error"]


def test_the_deadline_fails_a_job_in_any_phase(clip):
    h = Harness(clip, job_timeout_s=5.0)
    job = h.submit()
    h.head(job)
    h.step(h.p.tick, time.monotonic())
    assert job.phase is Phase.LOCATING
    h.step(h.p.tick, time.monotonic() + 6)
    report = h.report()
    assert report["error_kind"] == "JobTimeout" and "5 s" in report["error"]


def test_a_job_waits_for_a_fetcher_while_all_restart(clip):
    h = Harness(clip)
    for name in ("fetcher0", "fetcher1"):
        h.workers[name].alive = False
    job = h.submit()
    assert job.phase is Phase.WAITING_FETCHER and h.sent == []
    h.step(h.p.tick, time.monotonic())          # still none: it goes on waiting
    assert job.phase is Phase.WAITING_FETCHER and h.sent == []
    h.workers["fetcher0"].alive = True
    h.step(h.p.tick, time.monotonic())
    assert job.phase is Phase.HEAD and [s.to for s in h.sent] == ["fetcher0"]
    h.step(h.p.fail, job, ErrorKind.ENGINE, "stop")


def test_a_job_waits_for_shared_memory_and_goes_on_when_it_is_back(clip):
    free = [1 << 34]
    h = Harness(clip, free=lambda: free[0])
    first = h.submit()
    h.head(first)
    h.fetch_all(first)
    free[0] = 0                  # /dev/shm filled by others while the first job decodes
    h.step(h.p.submit, h.client, Submit(token=2, url=URL, selection=Selection.of()))
    second, = (j for j in h.p.jobs.values() if j.token == 2)
    first_fetch = second.fetch_key
    late = dict(h.pending)             # requests of its first fetch, still on their way
    h.head(second)
    assert second.phase is Phase.WAITING_MEMORY and second.segment is None
    assert EndJob(job=first_fetch) in h.to_worker("fetcher0", EndJob)
    h.step(h.p.tick, time.monotonic())
    assert second.phase is Phase.WAITING_MEMORY
    _run_planned(h, first, 50)
    assert h.report()["ok"]
    free[0] = 1 << 34
    h.step(h.p.tick, time.monotonic())
    # the job keeps its id; its fetch starts again under a new key
    assert second.phase is Phase.HEAD and h.p.jobs[second.id] is second
    assert second.fetch_key != first_fetch
    h.head(second)
    # a late answer of the first fetch is not taken for the second's
    worker, msg = next((w, m) for (key, _), (w, m) in late.items()
                       if key == first_fetch and isinstance(m, FetchRange))
    tally = (second.fetch.bytes, second.fetch.ranges)
    h.msg(worker, RangeDone(job=first_fetch, offset=msg.offset, end=msg.end, head=False,
                            stats=FetchStats(bytes=msg.end - msg.offset)))
    assert (second.fetch.bytes, second.fetch.ranges) == tally
    h.fetch_all(second)
    assert second.phase is Phase.DECODING and second.fetched
    h.step(h.p.fail, second, ErrorKind.ENGINE, "stop")


def test_a_decoder_blocked_on_bytes_moves_them_to_the_front(longer_clip):
    h = Harness(longer_clip, connections=1)     # one range with the head: the rest is pending
    job = h.submit()
    h.head(job)
    far = len(longer_clip) - 100_000
    assert job.plan.pending[0].offset < far - 65536
    h.msg("decoder0", NeedBytes(job=job.id, offset=far))
    assert job.plan.pending[0].offset == far - far % 65536
    h.step(h.p.fail, job, ErrorKind.ENGINE, "stop")


@pytest.mark.parametrize("size, content_type, prefix, error", [
    (0, "video/mp4", b"", "empty file"),
    (600 << 20, "video/mp4", None, "over the limit"),
    (2000, "text/html", b"<html>", "not a video"),
    (2000, "application/octet-stream", b"<!DOCTYPE html><html>", "not a video"),
])
def test_what_the_head_refuses(clip, size, content_type, prefix, error):
    h = Harness(clip)
    job = h.submit()
    h.head(job, size=size, content_type=content_type, prefix=prefix)
    report = h.report()
    assert not report["ok"] and error in report["error"] and "\n" not in report["error"]


def test_a_url_that_is_not_http_fails_at_submit():
    h = Harness(b"")
    h.step(h.p.submit, h.client, Submit(token=1, url="ftp://x/y.mp4"))
    assert "unsupported URL scheme 'ftp'" in h.report()["error"]


def test_a_cancelled_job_ends_every_worker_s_part(clip):
    h = Harness(clip)
    job = h.submit()
    h.head(job)
    h.fetch_all(job)
    h.step(h.p.cancel, h.client, 1)
    assert h.report()["error"] == f"{URL}: cancelled" and job.phase is Phase.FAILED
    assert {s.to for s in h.sent if isinstance(s.msg, EndJob)} == set(h.workers)
    assert all(h.p.ledger.of(w).idle for w in h.workers)


def test_a_range_answered_with_the_whole_file_brings_the_rest_of_the_job(longer_moov_end):
    """A CDN edge honours the head's Range, then answers a later range with 200 and the
    whole file: that body is read, a second such body is dropped, and the job asks for no
    more ranges; a range that fails meanwhile costs nothing (its bytes are in that body)."""
    data = longer_moov_end
    h = Harness(data)
    job = h.submit()
    h.head(job)
    h.deliver(job.id, 0)
    h.step(h.p.dispatch)
    (first, _), (second, _), (third, end) = sorted(
        (o, e) for o, e, _ in h.p.ledger.ranges_of(job.id))[:3]
    reader = h.pending.pop((job.id, first))[0]
    other = h.pending.pop((job.id, second))[0]
    h.msg(reader, WholeBody(job=job.id, offset=first))
    h.msg(other, WholeBody(job=job.id, offset=second))
    assert h.to_worker(reader, ReadWhole)[-1] == ReadWhole(job=job.id, offset=first, read=True)
    assert h.to_worker(other, ReadWhole)[-1] == ReadWhole(job=job.id, offset=second, read=False)
    assert not job.plan.pending
    asked = len([s for s in h.sent if isinstance(s.msg, FetchRange)])
    worker = h.pending.pop((job.id, third))[0]
    h.msg(worker, RangeFailed(job=job.id, offset=third, end=end, written=third, error="reset",
                              kind=ErrorKind.FETCH, retryable=True))
    assert job.phase is not Phase.FAILED and job.fetch.retries == 0
    # the one body: every byte written, then done; the moov at the end is found in it
    block, amap = h.segments[job.id]
    block.mm[:len(data)] = data
    amap.mark(0, len(data))
    h.msg(reader, RangeDone(job=job.id, offset=first, end=len(data),
                            stats=FetchStats(bytes=len(data))))
    for key in [k for k in h.pending if k[0] == job.id]:   # those in flight end as they may
        h.deliver(*key)
    assert len([s for s in h.sent if isinstance(s.msg, FetchRange)]) == asked
    assert job.fetched
    _run_planned(h, job, 200)
    assert h.report()["ok"]
    # the next job on that origin asks for ranges again
    h.step(h.p.submit, h.client, Submit(token=2, url=URL))
    nxt = max(h.p.jobs.values(), key=lambda j: j.id)
    h.head(nxt)
    h.deliver(nxt.id, 0)
    h.step(h.p.dispatch)
    assert not nxt.plan.single and h.p.ledger.ranges_of(nxt.id)


def test_the_whole_file_s_body_that_fails_is_asked_again_whole(longer_clip):
    h = Harness(longer_clip)
    job = h.submit()
    h.head(job)
    h.deliver(job.id, 0)
    (offset, _, worker), *_ = h.p.ledger.ranges_of(job.id)
    h.pending.pop((job.id, offset))
    h.msg(worker, WholeBody(job=job.id, offset=offset))
    h.msg(worker, RangeFailed(job=job.id, offset=offset, end=offset, written=200_000,
                              error="reset", kind=ErrorKind.FETCH, retryable=True))
    assert job.fetch.retries == 1 and job.phase is not Phase.FAILED
    time.sleep(0.06)                 # the retry's back-off
    h.step(h.p.dispatch)
    again = [m for _, m in h.pending.values() if isinstance(m, FetchRange) and m.attempt == 1]
    # from the chunk it stopped in to the end, in one request; its 200 is read again
    assert [(m.offset, m.end) for m in again] == [(196_608, len(longer_clip))]
    h.msg(worker, WholeBody(job=job.id, offset=196_608))
    assert h.to_worker(worker, ReadWhole)[-1].read
    h.step(h.p.fail, job, ErrorKind.ENGINE, "stop")
