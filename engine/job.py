"""One job's state in the supervisor, and the report the contract defines."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.plan import RangePlan

TIMING_KEYS = ("connect", "first_byte", "moov_ready", "first_frame", "first_result",
               "download_done", "decode_done", "total")


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
    submitted: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    # fetch
    final_url: str = ""
    size: int = 0
    ranged: bool = True
    plan: RangePlan | None = None
    segment: object = None          # shm.SharedBlock (the supervisor owns it)
    amap: object = None             # shm.AvailabilityMap
    ring: object = None             # shm.FrameRing
    head_fetcher: object = None
    head_attempt: int = 0
    speculative: dict = field(default_factory=dict)   # offset -> (end, fetcher)
    head_done: bool = False
    head_len: int = 0
    planned: bool = False           # the range plan is made (moov located)
    moov: tuple[int, int] | None = None
    moov_layout: str | None = None
    track: object = None            # engine.mp4.VideoTrack, or StreamInfo when streamed
    way: str = "planned"            # "streamed": the layout could not be planned
    truncated: str | None = None    # the file ends before the frames its table lists
    decoded: int = 0
    linear: bool = False            # streamed front to back without seeking
    probed_until: int = 0           # a partial job fetched the box headers up to here
    http_version: str = ""
    connections_new: int = 0
    connections_reused: int = 0
    ranges: int = 0
    retries: int = 0
    bytes: int = 0
    sha256: str | None = None
    versions: dict = field(default_factory=dict)    # requests per HTTP version
    # decode and process
    frame_limit: int | None = None
    readable_end: int = 0           # the decoder sees the file end here (partial jobs)
    decode_done: bool = False
    outstanding: int = 0            # batches sent to the GPU worker, not yet answered
    results: dict = field(default_factory=dict)
    missing: list = field(default_factory=list)
    decoder_backend: str = ""
    ending: bool = False            # asked the GPU worker for the video's result
    video_result: object = None     # a per-video processor's end() value
    # end
    error: str | None = None
    error_kind: str | None = None
    finished: bool = False
    timings: dict = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        """Only some frames are wanted: fetch only their bytes."""
        return self.max_frames is not None or self.partial_mb is not None

    def mark(self, key: str, at: float | None = None) -> None:
        """Record a stage the first time it happens, in seconds since submission."""
        if key not in self.timings:
            self.timings[key] = round(((at or time.monotonic()) - self.submitted), 4)

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

    def shm_bytes(self) -> int:
        total = 0
        for block in (self.segment, self.amap and self.amap.block, self.ring and self.ring.block):
            if block is not None:
                total += block.size
        return total

    def report(self) -> dict:
        track = self.track
        video = {"bytes": self.size, "codec": getattr(track, "codec", None),
                 "width": getattr(track, "width", None), "height": getattr(track, "height", None),
                 "fps": getattr(track, "fps", None),
                 "frames": (getattr(track, "frame_count", None) or self.decoded or None)
                 if track is not None else None,
                 "moov": self.moov_layout}
        timings = {key: self.timings.get(key) for key in TIMING_KEYS}
        results = [{"frame_number": n, "result": self.results[n]} for n in sorted(self.results)]
        return {
            "url": self.url, "ok": self.error is None, "error": self.error,
            "video": video,
            "frames_processed": len(self.results),
            "timings_s": timings,
            "fetch": {"http_version": self.http_version or None,
                      "connections_new": self.connections_new,
                      "connections_reused": self.connections_reused,
                      "ranges": self.ranges, "retries": self.retries, "bytes": self.bytes,
                      "requests_by_version": dict(self.versions),
                      **({"sha256": self.sha256} if self.sha256 else {})},
            "decoder": self.decoder_backend or None,
            "plan": self.way,
            "missing_frames": list(self.missing),
            "error_kind": self.error_kind,
            "results": results,
            "node": None,
            "video_result": self.video_result,
        }
