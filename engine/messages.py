"""Typed records that travel between processes (pickled over pipes and the socket).

They stay small: bulk bytes and frames move only through shared memory (``shm``);
a message names a segment, a byte range or a run of ring slots.
Timestamps are ``time.monotonic()`` values, which all processes of a machine share.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import ErrorKind
from engine.report import Batch
from engine.selection import Selection

# ---------------------------------------------------------------- client <-> supervisor


@dataclass(frozen=True, kw_only=True)
class Submit:
    token: int
    url: str
    processor: str | None = None
    stream: bool = False
    selection: Selection = field(default_factory=Selection)
    return_frames: bool = False     # Engine.frames: the frames go back through shared memory


@dataclass(frozen=True, kw_only=True)
class ReleaseFrames:
    """The client has copied a job's frames out of its output block: unlink it."""
    output: str


@dataclass(frozen=True, kw_only=True)
class Prewarm:
    token: int
    origins: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class StatusQuery:
    token: int
    ready: bool = False      # answer once every worker is up (the workers' hellos)


@dataclass(frozen=True, kw_only=True)
class CancelJob:
    token: int


@dataclass(frozen=True, kw_only=True)
class ResultBatch:
    """A batch of results for a client that streams: what it yields, as it is."""
    token: int
    batch: Batch


@dataclass(frozen=True, kw_only=True)
class JobDone:
    token: int
    report: dict


@dataclass(frozen=True, kw_only=True)
class Reply:
    token: int
    payload: dict
    error: str | None = None
    kind: ErrorKind | None = None


# ---------------------------------------------------------------- supervisor -> workers


@dataclass(frozen=True, kw_only=True)
class FetchHead:
    """First request of a job: a small range at 0 whose answer gives the size."""
    job: int
    url: str
    length: int
    attempt: int = 0


@dataclass(frozen=True, kw_only=True)
class SegmentReady:
    """The supervisor made the job's segment after a ``HeadInfo``."""
    job: int
    segment: str | None          # None: the job was refused (size, admission)
    amap: str | None


@dataclass(frozen=True, kw_only=True)
class FetchRange:
    job: int
    url: str
    segment: str | None          # None: sent with the head, before the segment exists
    amap: str | None
    offset: int
    end: int                     # exclusive
    attempt: int = 0


@dataclass(frozen=True, kw_only=True)
class ReadWhole:
    """Answer to ``WholeBody``: read that body (``read``), or drop it (another brings it)."""
    job: int
    offset: int
    read: bool


@dataclass(frozen=True, kw_only=True)
class PrewarmOrigins:
    origins: tuple[str, ...]
    token: int = 0


@dataclass(frozen=True, kw_only=True)
class DecodeJob:
    """A planned job names its ring, its moov and its sample table; a streamed one
    (``ring`` None) learns the picture by decoding and asks for a ring (``StreamInfo``)."""
    job: int
    segment: str
    amap: str
    size: int
    backend: str                 # pyav or decord
    batch: int
    frame_limit: int | None      # decode only this many frames
    readable_end: int            # bytes past this are never fetched (partial jobs)
    regions: list                # every (start, end) byte region the job fetches
    # planned jobs only
    ring: str | None = None
    need_end: list[int] = field(default_factory=list)   # per frame: bytes needed to output it
    moov: tuple[int, int] | None = None  # where the moov box lies: the reader lets decoders see it
    expected: int | None = None  # frames the sample table has (None: streamed, unknown)
    stream_index: int | None = None   # the planned track (None: the decoder picks)
    seekable: bool = True        # False: the decoder reads front to back only
    # a selection: planned, the presentation indices to output and the decode-index spans
    # [first, last] that hold them (bytes outside ``regions`` are never fetched: read as
    # zeros, in packets that are not decoded); streamed, the selection itself to apply
    selected: list[int] | None = None
    spans: list[tuple[int, int]] | None = None
    keep: list[int] | None = None     # the selected frames' decode indices (others may be skipped)
    selection: dict | None = None
    # streamed, after a lost worker: frames up to this number were delivered before
    # (decoded for their place, never output again)
    resume_after: int | None = None


@dataclass(frozen=True, kw_only=True)
class RingReady:
    """Answer to ``StreamInfo``: the streamed job's frame ring (None: the job ended)."""
    job: int
    ring: str | None


@dataclass(frozen=True, kw_only=True)
class GpuJob:
    job: int
    ring: str
    processor: str
    video: dict = field(default_factory=dict)   # engine.processors.Video's fields


@dataclass(frozen=True, kw_only=True)
class EndVideo:
    """Every batch of the job has its results: a per-video processor's ``end()`` now."""
    job: int


@dataclass(frozen=True, kw_only=True)
class EndJob:
    """The job is over (done, failed or cancelled): drop its work, unmap its segments."""
    job: int


@dataclass(frozen=True, kw_only=True)
class Shutdown:
    pass


# ---------------------------------------------------------------- workers -> supervisor


@dataclass(frozen=True, kw_only=True)
class Hello:
    role: str
    pid: int
    info: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Heartbeat:
    """Every ``HEARTBEAT_S``; ``busy`` and ``progress`` tell a stuck main thread (whose
    heartbeat thread still beats) from one at work (``workers.base.Link``)."""
    role: str
    pid: int
    busy: bool = False
    progress: int = 0


@dataclass(kw_only=True)
class FetchStats:
    """Per request: what the connection cost and what came back. The one mutable record:
    the fetcher fills it in while its request runs (httpcore's trace hook included), and
    sends it once the request is over."""
    new_connection: bool = False
    http_version: str = ""
    started: float = 0.0
    connected: float | None = None   # TCP+TLS done (new connections only)
    first_byte: float | None = None
    bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class HeadInfo:
    job: int
    size: int | None             # None: no Content-Length (chunked): known at its end
    ranged: bool                 # False: the server ignored Range, the body is the whole file
    url: str                     # after redirects: later ranges go straight there
    content_type: str
    stats: FetchStats
    prefix: bytes = b""          # the first bytes of the body: enough to plan the ranges


@dataclass(frozen=True, kw_only=True)
class RangeDone:
    job: int
    offset: int
    end: int
    stats: FetchStats
    head: bool = False


@dataclass(frozen=True, kw_only=True)
class RangeFailed:
    job: int
    offset: int
    end: int
    written: int                 # bytes [offset, written) did arrive
    error: str
    kind: ErrorKind
    retryable: bool
    stats: FetchStats | None = None
    attempt: int = 0
    head: bool = False
    speculative: bool = False


@dataclass(frozen=True, kw_only=True)
class WholeBody:
    """The range at ``offset`` was answered ``200`` with the whole file: the fetcher waits
    for ``ReadWhole`` before reading it."""
    job: int
    offset: int


@dataclass(frozen=True, kw_only=True)
class NeedBytes:
    """The decoder blocks on bytes at ``offset``: fetch that range first."""
    job: int
    offset: int


@dataclass(frozen=True, kw_only=True)
class BatchReady:
    job: int
    first_slot: int
    count: int
    frame_numbers: list[int]
    decoded_at: float


@dataclass(frozen=True, kw_only=True)
class StreamInfo:
    """A streamed job's picture, as the decoder found it: the ring can be made now."""
    job: int
    codec: str
    width: int
    height: int
    fps: float | None


@dataclass(frozen=True, kw_only=True)
class DecodeDone:
    job: int
    frames: int
    missing: list[int]
    error: str | None = None
    decoded: int | None = None   # frames out of the codec, selected or not (None: unknown)


@dataclass(frozen=True, kw_only=True)
class VideoEnded:
    """Answer to ``EndVideo``: ``end()``'s value (None for a per-frame processor)."""
    job: int
    value: object = None
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class BatchResults:
    job: int
    first_slot: int
    count: int
    frame_numbers: list[int]
    results: list
    error: str | None = None
    per_video: bool = False      # the job's handler keeps state: lost with this worker
