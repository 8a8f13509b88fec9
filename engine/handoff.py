"""Handing work to the decoders and the GPU worker, and going on after one dies.

A decoder gets one job at a time from the decode queue; the GPU worker gets the job's
ring, its batches and, at the end, the call for the video's result. When either dies,
``engine.resume`` says from which frame to decode again. A part of
``engine.pipeline.Pipeline`` (it uses that class's outbox, ledger and jobs), kept apart
so each concern reads on its own.
"""
from __future__ import annotations

import logging
from dataclasses import replace


from engine import fences, resume
from engine.errors import ErrorKind
from engine.job import Job, Phase
from engine.locate import selected_refusal, sparse_decode
from engine.messages import (BatchReady, BatchResults, DecodeDone, DecodeJob, EndVideo, GpuJob,
                             ResultBatch, RingReady, StreamInfo, VideoEnded)
from engine.report import Batch
from engine.shm import ShmError
from engine.shm.ring import SlotRun

log = logging.getLogger("engine.supervisor")


class Handoff:
    """Events from the decoders and the GPU worker, and the work sent to them."""

    def worker_lost(self, w, cause: str) -> None:
        """A worker died: requeue what a fetcher held; decode again what a decoder or the
        GPU worker lost (``engine.resume``)."""
        held = self.ledger.drop_worker(w.name)
        for key, offset in held.ranges:
            job = self._fetching(key)
            if job is not None and job.plan is not None:
                job.plan.requeue(offset)
        for key in held.heads:
            job = self._fetching(key)
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
        job.ring_for = None             # the decoder that waited for it is gone
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

    def _make_output(self, job: Job, height: int, width: int) -> bool:
        if not job.return_frames:
            return True
        try:
            self.memory.create_output(job, height, width, self.config.max_selected)
        except ShmError as exc:
            self.fail(job, ErrorKind.FETCH, f"{job.url}: {exc}")
            return False
        return True

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

    def _dispatch_decodes(self) -> None:
        gpu = self._gpu()
        if gpu is None:
            return   # restarting: decodes wait for it, as ranges wait for their fetchers
        self._ring_ready(gpu)
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
                         selected=job.selected, spans=job.spans, keep=job.keep)

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
        spans = keep = None
        if msg.backend == "pyav":
            spans, keep = sparse_decode(job.track, todo)
        return replace(msg, selected=todo, spans=spans, keep=keep)

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
        job.ring_for = w.name   # the decoder waits for RingReady: sent once a GPU worker runs
        gpu = self._gpu()
        if gpu is not None:
            self._ring_ready(gpu)

    def _ring_ready(self, gpu) -> None:
        """Streamed jobs whose ring waits for a GPU worker (it was restarting) get it."""
        for job in self.live:
            if job.ring_for is not None and job.ring is not None:
                decoder, job.ring_for = job.ring_for, None
                self._start_gpu(gpu, job)
                self._send(decoder, RingReady(job=job.id, ring=job.ring.name))

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
            self._reply(job.client, ResultBatch(token=job.token, batch=Batch(
                list(msg.frame_numbers), msg.results, bytes_done=job.fetch.bytes,
                bytes_total=job.size, frames_total=job.frames_selected)))
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
        if msg.decoded is not None:
            job.frames_decoded = (job.frames_decoded or 0) + msg.decoded
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

    def on_video_ended(self, w, msg: VideoEnded) -> None:
        job = self._live(msg.job)
        if job is None or job.phase is not Phase.ENDING:
            return
        if msg.error:
            self.fail(job, ErrorKind.PROCESSOR, f"{job.url}: {msg.error}")
            return
        job.video_result = msg.value
        self.finish(job)
