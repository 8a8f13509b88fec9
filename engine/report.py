"""What a job's client receives, defined once: the contract's report (``Report``), the
batches of a streamed job (``Batch``), a per-video processor's value (``VideoResult``)
and ``Engine.frames``' answer (``Frames``). The job fills them; the API, the cluster and
the CLI read them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from engine.errors import ErrorKind, error_from

# The timing waterfall: each key with the label the CLI prints.
TIMINGS = (("connect", "connect"), ("first_byte", "first byte"),
           ("moov_ready", "moov ready"), ("first_frame", "first frame"),
           ("first_result", "first result"), ("download_done", "download done"),
           ("decode_done", "decode done"), ("total", "total"))
TIMING_KEYS = tuple(key for key, _ in TIMINGS)


@dataclass
class FetchTally:
    """What a job's requests cost and brought: the report's ``fetch``."""
    http_version: str = ""
    connections_new: int = 0
    connections_reused: int = 0
    ranges: int = 0
    retries: int = 0
    bytes: int = 0
    sha256: str | None = None
    versions: dict = field(default_factory=dict)    # requests per HTTP version

    def count_request(self, stats) -> None:
        if stats is None:
            return
        if stats.new_connection:
            self.connections_new += 1
        else:
            self.connections_reused += 1
        if stats.http_version:
            self.http_version = stats.http_version
            self.versions[stats.http_version] = self.versions.get(stats.http_version, 0) + 1

    def report(self) -> dict:
        return {"http_version": self.http_version or None,
                "connections_new": self.connections_new,
                "connections_reused": self.connections_reused,
                "ranges": self.ranges, "retries": self.retries, "bytes": self.bytes,
                "requests_by_version": dict(self.versions),
                **({"sha256": self.sha256} if self.sha256 else {})}


@dataclass
class Report:
    """One job's outcome: the contract's report, as attributes (``to_dict`` for JSON)."""
    url: str
    ok: bool
    error: str | None
    video: dict
    frames_processed: int
    timings_s: dict
    fetch: dict
    results: list = field(repr=False)
    decoder: str | None = None
    missing_frames: list = field(default_factory=list)
    error_kind: str | None = None
    plan: str | None = None        # "planned" (sample tables) or "streamed"
    node: str | None = None        # where the job ran, on a cluster
    video_result: object = None      # a per-video processor's end() value
    selection: dict = field(default_factory=dict)   # what was asked, normalised
    frames_selected: int | None = None   # frames the selection picked
    frames_decoded: int | None = None    # frames the codec decoded for them (None: decord)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def failed(cls, url: str, error: str, kind: ErrorKind | str = ErrorKind.ENGINE,
               node: str | None = None) -> "Report":
        """A job that failed before any engine knew anything of it (a cluster's)."""
        return cls(url=url, ok=False, error=error, video={}, frames_processed=0,
                   timings_s=dict.fromkeys(TIMING_KEYS), fetch=FetchTally().report(),
                   results=[], error_kind=kind, node=node)

    def to_dict(self) -> dict:
        # shallow: a report's parts are plain JSON values already, and results are many
        return dict(vars(self))


@dataclass
class Batch:
    """Results of consecutive frames, in frame order, as the engine produced them, and
    how far the job was then."""
    frame_numbers: list[int]
    results: list
    bytes_done: int = 0            # fetched so far
    bytes_total: int = 0           # the file's size
    frames_total: int | None = None   # frames the job will produce


@dataclass
class VideoResult:
    """The last item of ``stream`` for a per-video processor: its ``end()`` value."""
    value: object


@dataclass
class Frames:
    """``frames()``: the selected frames, RGB, in frame order."""
    array: object = field(repr=False)     # numpy uint8 [N, H, W, 3]
    frame_numbers: list[int]
    report: Report


def raise_for(report: Report) -> None:
    if not report.ok:
        exc = error_from(report.error_kind, report.error or "job failed")
        exc.report = report
        raise exc
