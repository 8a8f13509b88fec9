"""One job's state in the supervisor and its lifecycle; it fills the report (``engine.report``).

A job's phase is one field, ``Job.phase``; every allowed move is in ``TRANSITIONS`` and
goes through ``Job.to``. Fetching runs beside the later phases (a job decodes while its
bytes arrive), so how far the download is has its own facts (``head_done``,
``fetched``), not phases.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.errors import ErrorKind
from engine.plan import RangePlan
from engine.report import TIMING_KEYS, FetchTally, Report
from engine.selection import Selection

class Phase(enum.Enum):
    WAITING_FETCHER = "waiting for a fetcher"   # every fetcher is restarting
    HEAD = "head"                      # the first range is on its way: size and layout unknown
    WAITING_MEMORY = "waiting for memory"  # head dropped: other jobs hold the shared memory
    LOCATING = "locating the moov"     # box headers walked: fetching the moov or the next header
    PLANNED = "planned fetch"          # the sample table says where every frame's bytes are
    STREAMED = "streamed fetch"        # cannot be planned: front to back, FFmpeg probes
    DECODING = "decoding"              # a decoder has the job (bytes may still be arriving)
    DRAINING = "draining results"      # decoded: results of the last batches to come
    ENDING = "ending"                  # asked the processor for the video's result
    DONE = "done"
    FAILED = "failed"


_P = Phase
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    _P.WAITING_FETCHER: frozenset({_P.WAITING_FETCHER, _P.HEAD}),   # a tick finds none yet
    _P.HEAD: frozenset({_P.HEAD, _P.WAITING_FETCHER, _P.WAITING_MEMORY, _P.LOCATING,
                        _P.STREAMED}),
    _P.WAITING_MEMORY: frozenset({_P.HEAD, _P.WAITING_FETCHER}),
    _P.LOCATING: frozenset({_P.PLANNED, _P.STREAMED}),
    _P.PLANNED: frozenset({_P.DECODING}),
    _P.STREAMED: frozenset({_P.DECODING}),
    # back to DECODING: a lost worker's frames are decoded again (engine.resume)
    _P.DECODING: frozenset({_P.DRAINING, _P.DECODING}),
    _P.DRAINING: frozenset({_P.ENDING, _P.DECODING}),
    _P.ENDING: frozenset({_P.DONE, _P.DECODING}),
    _P.DONE: frozenset(),
    _P.FAILED: frozenset(),
}
# Any phase that is not an end may fail (deadline, a worker lost, the client gone).
for _phase, _next in TRANSITIONS.items():
    if _next:
        TRANSITIONS[_phase] = _next | {_P.FAILED}
TERMINAL = frozenset({_P.DONE, _P.FAILED})


class BadTransition(RuntimeError):
    pass


@dataclass
class Job:
    id: int
    token: int
    client: object                  # the connection the report goes back to
    url: str
    processor: str
    max_frames: int | None
    partial_mb: float | None
    stream: bool
    selection: Selection = field(default_factory=Selection)
    return_frames: bool = False     # Engine.frames: selected frames go to ``output``
    phase: Phase = Phase.HEAD
    submitted: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    # fetch
    # What the fetchers know this job's fetch by: its id, until its fetch starts again
    # (after waiting for memory) under a new key, so that the late answers of the first
    # are never taken for the second's.
    fetch_key: int = 0
    final_url: str = ""
    size: int = 0
    ranged: bool = True
    unknown_length: bool = False    # no Content-Length: ``size`` is a bound until the end
    segment_bytes: int = 0          # the video segment's shared memory, as counted
    plan: RangePlan | None = None
    segment: object = None          # shm.SharedBlock (the supervisor owns it)
    amap: object = None             # shm.AvailabilityMap
    ring: object = None             # shm.FrameRing
    output: object = None           # shm.SharedBlock: Engine.frames' frames, for the client
    ring_for: str | None = None     # streamed: the decoder waiting for the ring's name
    head_attempt: int = 0
    head_done: bool = False         # the head's bytes are all in the segment
    fetched: bool = False           # every planned byte is in the segment
    head_len: int = 0
    moov: tuple[int, int] | None = None
    moov_layout: str | None = None
    track: object = None            # engine.mp4.VideoTrack, or StreamInfo when streamed
    way: str = "planned"            # "streamed": the layout could not be planned
    truncated: str | None = None    # the file ends before the frames its table lists
    decoded: int = 0
    linear: bool = False            # streamed front to back without seeking
    probed_until: int = 0           # a partial job fetched the box headers up to here
    fetch: FetchTally = field(default_factory=FetchTally)
    # decode and process
    frame_limit: int | None = None
    selected: list | None = None    # presentation indices a selection picked (planned)
    spans: list | None = None       # decode-index spans [first, last] that output them
    keep: list | None = None        # the selected frames' decode indices
    frames_selected: int | None = None
    frames_decoded: int | None = None  # frames out of the codec, selected or not
    readable_end: int = 0           # the decoder sees the file end here (partial jobs)
    unanswered: list = field(default_factory=list)   # BatchReady sent to the GPU worker
    forwarded: list = field(default_factory=list)    # frame numbers sent to the GPU worker
    per_video: bool = False         # its processor keeps state across batches (begin/end)
    resume_after: int | None = None  # decoded again after a worker loss, from after this frame
    stopping_decoder: bool = False  # its decoder is being stopped to decode again (GPU lost)
    losses: dict = field(default_factory=dict)   # role -> deaths under this job
    results: dict = field(default_factory=dict)
    missing: list = field(default_factory=list)
    decoder_backend: str = ""
    video_result: object = None     # a per-video processor's end() value
    # end
    error: str | None = None
    error_kind: ErrorKind | None = None
    timings: dict = field(default_factory=dict)

    def to(self, phase: Phase) -> None:
        """Move to ``phase``; a move ``TRANSITIONS`` does not allow is a bug."""
        if phase not in TRANSITIONS[self.phase]:
            raise BadTransition(f"job {self.id}: {self.phase.name} -> {phase.name}")
        self.phase = phase

    @property
    def outstanding(self) -> int:
        """Batches sent to the GPU worker, not yet answered."""
        return len(self.unanswered)

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL

    @property
    def partial(self) -> bool:
        """Only some frames are wanted: fetch only their bytes."""
        return self.max_frames is not None or self.partial_mb is not None \
            or not self.selection.everything

    def mark(self, key: str, at: float | None = None) -> None:
        """Record a stage the first time it happens, in seconds since submission."""
        if key not in self.timings:
            self.timings[key] = round(((at or time.monotonic()) - self.submitted), 4)


    def video_bytes(self) -> int:
        """Shared memory its video takes: the segment (as reserved) and its map."""
        if self.segment is None or self.amap is None:
            return 0
        return self.segment_bytes + self.amap.block.size

    def shm_bytes(self) -> int:
        ring = self.ring.block.size if self.ring is not None else 0
        output = self.output.size if self.output is not None else 0
        return self.video_bytes() + ring + output

    def report(self) -> dict:
        track = self.track
        # a body of unknown length that never ended: the bytes that came, not the bound
        size = self.fetch.bytes if self.unknown_length and not self.head_done else self.size
        video = {"bytes": size, "codec": getattr(track, "codec", None),
                 "width": getattr(track, "width", None), "height": getattr(track, "height", None),
                 "fps": getattr(track, "fps", None),
                 "frames": (getattr(track, "frame_count", None) or self.decoded or None)
                 if track is not None else None,
                 "moov": self.moov_layout}
        timings = {key: self.timings.get(key) for key in TIMING_KEYS}
        results = [{"frame_number": n, "result": self.results[n]} for n in sorted(self.results)]
        return Report(
            url=self.url, ok=self.error is None, error=self.error, video=video,
            frames_processed=len(self.results), timings_s=timings, fetch=self.fetch.report(),
            decoder=self.decoder_backend or None, plan=self.way,
            missing_frames=list(self.missing), error_kind=self.error_kind, results=results,
            video_result=self.video_result, selection=self.selection.to_dict(),
            frames_selected=self.frames_selected,
            frames_decoded=self.frames_decoded).to_dict()
