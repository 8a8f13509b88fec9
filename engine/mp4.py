"""Minimal ISO-BMFF / MP4 reader: just enough to plan a streaming download.

The engine fetches an MP4 by parallel byte ranges and wants to decode while
bytes are still arriving.  For that it needs, *before* most of the file is
here, three things:

* where the ``moov`` box is (front or end of the file), so it can fetch it
  first -- see :func:`walk`;
* the video sample table from ``moov`` (file offset, size, dts/pts, keyframe
  flag of every sample) -- see :func:`parse_moov` -- so it can tell how many
  bytes must be present before frame *n* can be shown
  (:meth:`VideoTrack.need_end`);
* whether that table is the whole video track: a fragmented file's moov lists the
  first fragment at most -- see :func:`why_not_planned`.

This module is pure Python + numpy on purpose: it runs in the coordinator
process, which must not pay for importing/initialising FFmpeg, and it works on
partial buffers (the "head" of the file) where a real demuxer would block or
fail.  Sample tables are expanded with numpy because real files have up to
~100k samples.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

__all__ = [
    "NotMP4",
    "Box",
    "VideoTrack",
    "parse_moov",
    "Walk",
    "walk",
    "reader_of",
    "NOT_YET",
    "why_not_planned",
]


class NotMP4(ValueError):
    """The bytes are not an ISO-BMFF/MP4 file (or not one we can read).

    The message is a single line so it can go straight into a log or an error
    reply, e.g. ``not an MP4 file (starts with b'<!DOCTYPE html>\\n')`` --
    the typical case is a server answering with an HTML error page.
    """


# Box types that may legitimately open an MP4 file.  Checking the first box
# against this list is what turns "HTML page / random bytes" into NotMP4
# instead of a nonsense box walk.
_FIRST_BOX_TYPES = frozenset(
    {"ftyp", "styp", "moov", "mdat", "free", "skip", "wide", "pdin", "uuid"}
)
# Boxes whose payload is nothing but child boxes (the ones we need to reach
# the sample tables; udta/meta are deliberately not descended into).
# Sample entries of still-image tracks (cover art, thumbnails): never the video.
_STILL_CODECS = frozenset({"jpeg", "png ", "mjpa", "mjpb", "gif ", "tiff", "bmp "})
_CONTAINERS = frozenset({"moov", "trak", "mdia", "minf", "stbl", "edts", "dinf"})

_HDR = struct.Struct(">I4s")
_U64 = struct.Struct(">Q")


@dataclass(frozen=True)
class Box:
    """A top-level box: fourcc, file offset of its header, total size.

    ``size`` is already resolved: a size field of 0 ("extends to end of
    file") becomes ``file_size - offset`` and 64-bit ``largesize`` is used
    when the 32-bit field is 1.
    """

    type: str
    offset: int
    size: int


def _fourcc(raw: bytes) -> str:
    """Decode a fourcc without ever failing (latin-1 maps every byte)."""
    return raw.decode("latin-1")


def _read_header(buf, pos: int, limit: int):
    """Parse the box header at ``buf[pos]``.

    Returns ``(type, header_size, size)`` with ``size`` as stored (0 and
    largesize not yet resolved against a file size), or ``None`` if the
    header does not fit before ``limit``.  Splitting this out lets the
    top-level walk (partial head) and the moov walk (complete buffer) share
    the one tricky bit: the 8 vs 16 byte header.
    """
    if pos + 8 > limit:
        return None
    size, raw = _HDR.unpack_from(buf, pos)
    if size == 1:
        if pos + 16 > limit:
            return None
        return _fourcc(raw), 16, _U64.unpack_from(buf, pos + 8)[0]
    return _fourcc(raw), 8, size


@dataclass(frozen=True)
class Walk:
    """How far a walk over the top-level box headers got.

    ``moov``: the moov box, once its header was read. ``need``: the offset of the next
    header, not here yet (fetch it, then walk again); past the moov too, as the boxes
    after it say whether the moov's sample table is the whole track. Neither: the walk
    reached the end of the file (without a moov: not a plannable MP4). ``layout`` is
    'end' when an mdat came before the moov.
    """

    moov: Box | None = None
    need: int | None = None
    layout: str = "front"
    boxes: tuple = ()


def walk(read, file_size: int) -> Walk:
    """Walk the real top-level box headers from offset 0 with ``read(offset, n)``, which
    returns the bytes there or None while they are not here. Nothing is guessed: whatever
    lies between mdat and moov (free, skip, uuid, more mdat boxes) is walked over. Past
    the moov the walk goes on to the end of the file or the first moof (a fragment:
    enough to know the table is not the whole track).

    Raises NotMP4 when the first box is no MP4 opening box or a size is impossible.
    """
    if file_size < 8:
        raise NotMP4(f"not an MP4 file (only {file_size} bytes)")
    pos, boxes, moov, layout = 0, [], None, "front"
    while pos + 8 <= file_size:
        raw = read(pos, 8)
        if raw is not None and raw[:4] == b"\0\0\0\1":   # a 64-bit size follows
            raw = read(pos, 16) if pos + 16 <= file_size else raw
        if raw is None:
            return Walk(moov=moov, need=pos, layout=layout, boxes=tuple(boxes))
        if not boxes and _fourcc(raw[4:8]) not in _FIRST_BOX_TYPES:
            start = read(0, min(16, file_size)) or raw
            raise NotMP4(f"not an MP4 file (starts with {bytes(start[:16])!r})")
        try:
            box = _top_box(raw, pos, file_size)
        except NotMP4:
            if moov is None:
                raise
            break   # a plain demuxer stops at a box it cannot read after the moov: so do we
        boxes.append(box)
        if box.type == "moof" and moov is not None:
            break
        if box.type == "mdat" and moov is None:
            layout = "end"
        moov = box if box.type == "moov" and moov is None else moov
        pos += box.size
    return Walk(moov=moov, layout=layout, boxes=tuple(boxes))


def _top_box(raw: bytes, pos: int, file_size: int) -> Box:
    """The top-level box whose header ``raw`` is, its size resolved against the file."""
    hdr = _read_header(memoryview(raw).cast("B"), 0, len(raw))
    if hdr is None:
        raise NotMP4(f"corrupt MP4: box header at offset {pos} is cut by the end of file")
    kind, hsize, size = hdr
    if size == 0:
        size = file_size - pos
    if size < hsize:
        raise NotMP4(f"corrupt MP4: box {kind!r} at offset {pos} has size {size}")
    if pos + size > file_size:
        raise NotMP4(f"truncated file: box {kind!r} at offset {pos} needs {pos + size} "
                     f"bytes but the file has {file_size}")
    return Box(kind, pos, size)


def reader_of(buf) -> "callable":
    """``read`` for :func:`walk` over the first bytes of a file."""
    buf = memoryview(buf).cast("B")
    return lambda pos, n: bytes(buf[pos:pos + n]) if pos + n <= len(buf) else None


# --------------------------------------------------------------------------
# moov parsing


def _children(buf: memoryview, start: int, end: int):
    """Yield ``(type, payload_start, box_end)`` for boxes in ``buf[start:end]``.

    Unlike the top-level walk, the buffer is complete here, so any box that
    overruns its parent is corruption and raises NotMP4.
    """
    pos = start
    while (hdr := _read_header(buf, pos, end)) is not None:
        kind, hsize, size = hdr
        if size == 0:
            size = end - pos
        if size < hsize or pos + size > end:
            raise NotMP4(f"corrupt MP4: box {kind!r} at moov offset {pos} overruns its parent")
        yield kind, pos + hsize, pos + size
        pos += size


def _collect(buf: memoryview, start: int, end: int, out: dict) -> dict:
    """Map box type -> (payload_start, end) for every box below a container.

    Recurses into :data:`_CONTAINERS`; the first occurrence of a type wins.
    Flattening is fine because inside one trak every box we need (hdlr, mdhd,
    stsd, stts, ...) occurs once.
    """
    for kind, p, e in _children(buf, start, end):
        out.setdefault(kind, (p, e))
        if kind in _CONTAINERS:
            _collect(buf, p, e, out)
    return out


def _table(buf: memoryview, box: tuple[int, int], cols: int, dtype: str = ">u4") -> np.ndarray:
    """Read a full-box table: version/flags, u32 entry_count, then entries.

    Returns an ``(entry_count, cols)`` int64 array.  The count is clipped to
    what the box really holds so a lying count cannot read past it.
    """
    p, e = box
    (count,) = struct.unpack_from(">I", buf, p + 4)
    itemsize = np.dtype(dtype).itemsize
    count = min(count, (e - p - 8) // (itemsize * cols))
    arr = np.frombuffer(buf, dtype=dtype, count=count * cols, offset=p + 8)
    return arr.astype(np.int64).reshape(count, cols)


@dataclass
class VideoTrack:
    """The video sample table, expanded to per-sample numpy arrays.

    All arrays are indexed by sample number in DECODE order (file order).
    Times are in ``timescale`` units and are the raw values from the sample
    table: edit lists are ignored, so dts starts at 0 and pts may be shifted
    relative to what FFmpeg reports (it subtracts the edit-list media_time).
    """

    codec: str
    width: int
    height: int
    timescale: int
    fps: float
    offsets: np.ndarray
    sizes: np.ndarray
    dts: np.ndarray
    pts: np.ndarray
    keyframes: np.ndarray
    index: int = 0           # the trak's place in the moov: FFmpeg's stream index
    fragmented: bool = False  # the moov holds mvex: movie fragments may add samples

    @property
    def frame_count(self) -> int:
        """Number of video samples (= frames for video)."""
        return int(len(self.sizes))

    def presentation_order(self) -> np.ndarray:
        """Decode indices sorted by pts; stable so equal pts keep file order."""
        return np.argsort(self.pts, kind="stable")

    def need_end(self) -> np.ndarray:
        """Per PRESENTATION index i: bytes [.., E) needed to show frames 0..i.

        With B-frames, presentation frame i may depend on a sample decoded
        later than i (its reference), and decoding is sequential, so we need
        every sample up to D(i) = the largest decode index among presentation
        frames 0..i.  Samples are not necessarily at increasing offsets
        (interleaving, odd muxers), hence the running max of sample ends.
        """
        if self.frame_count == 0:
            return np.zeros(0, dtype=np.int64)
        last_decode = np.maximum.accumulate(self.presentation_order())
        max_end = np.maximum.accumulate(self.offsets + self.sizes)
        return max_end[last_decode]

    def bytes_needed(self, n_frames: int) -> int:
        """File prefix length needed to show the first ``n_frames`` frames."""
        n = min(n_frames, self.frame_count)
        return int(self.need_end()[n - 1]) if n > 0 else 0


def _mdhd(buf: memoryview, box: tuple[int, int]) -> tuple[int, int]:
    """(timescale, duration) from mdhd, version 0 (32-bit) or 1 (64-bit)."""
    p, _ = box
    if buf[p] == 1:
        return struct.unpack_from(">IQ", buf, p + 4 + 16)
    return struct.unpack_from(">II", buf, p + 4 + 8)


def _sample_entry(buf: memoryview, box: tuple[int, int]) -> tuple[str, int, int]:
    """(codec, width, height) from the first visual sample entry in stsd."""
    p, e = box
    entry = next(_children(buf, p + 8, e), None)  # skip version/flags + count
    if entry is None:
        raise NotMP4("corrupt MP4: empty stsd in video track")
    kind, ep, _ = entry
    # 6 reserved + 2 data_reference_index + 16 pre_defined/reserved
    width, height = struct.unpack_from(">HH", buf, ep + 24)
    codec = {"avc1": "h264", "avc3": "h264", "hvc1": "hevc", "hev1": "hevc"}.get(kind, kind)
    return codec, width, height


def _expand_runs(table: np.ndarray, n: int) -> np.ndarray:
    """Expand (count, value) run-length pairs (stts/ctts) to exactly n values.

    Missing entries become 0 and extra ones are dropped, so a slightly
    inconsistent table still yields arrays aligned with stsz.
    """
    values = np.repeat(table[:, 1], table[:, 0])[:n]
    if len(values) < n:
        values = np.concatenate([values, np.zeros(n - len(values), np.int64)])
    return values


def _sample_offsets(buf: memoryview, boxes: dict, sizes: np.ndarray) -> np.ndarray:
    """File offset of every sample from stco/co64 + stsc + stsz.

    stsc says "from chunk first_chunk on, each chunk holds k samples"; inside
    a chunk samples are contiguous, so a sample's offset is its chunk's
    offset plus the sizes of the chunk's earlier samples.
    """
    n = len(sizes)
    if "stco" in boxes:
        chunk_offsets = _table(buf, boxes["stco"], 1)[:, 0]
    elif "co64" in boxes:
        chunk_offsets = _table(buf, boxes["co64"], 1, ">u8")[:, 0]
    else:
        raise NotMP4("corrupt MP4: video track has no stco/co64")
    stsc = _table(buf, boxes["stsc"], 3)
    n_chunks = len(chunk_offsets)
    first = np.clip(stsc[:, 0] - 1, 0, n_chunks)  # 1-based -> 0-based
    runs = np.diff(np.append(first, n_chunks)).clip(min=0)
    per_chunk = np.minimum(np.repeat(stsc[:, 1], runs), n)  # cap garbage counts
    chunk_of_sample = np.repeat(np.arange(len(per_chunk)), per_chunk)[:n]
    if len(chunk_of_sample) < n:
        raise NotMP4("corrupt MP4: stsc/stco describe fewer samples than stsz")
    chunk_first_sample = np.cumsum(per_chunk) - per_chunk
    before = np.cumsum(sizes) - sizes  # bytes of all earlier samples
    within = before - before[chunk_first_sample[chunk_of_sample]]
    return chunk_offsets[chunk_of_sample] + within


def _video_track(buf: memoryview, b: dict) -> VideoTrack:
    """Build a VideoTrack from one trak's flattened box map."""
    missing = {"mdhd", "stsd", "stts", "stsc", "stsz"} - b.keys()
    if missing:
        raise NotMP4(f"corrupt MP4: video track lacks {', '.join(sorted(missing))}")
    timescale, duration = _mdhd(buf, b["mdhd"])
    codec, width, height = _sample_entry(buf, b["stsd"])

    p, e = b["stsz"]
    const_size, n = struct.unpack_from(">II", buf, p + 4)
    if const_size:
        sizes = np.full(n, const_size, dtype=np.int64)
    else:
        n = min(n, (e - p - 12) // 4)
        sizes = np.frombuffer(buf, ">u4", n, p + 12).astype(np.int64)

    deltas = _expand_runs(_table(buf, b["stts"], 2), n)
    dts = np.cumsum(deltas) - deltas
    pts = dts.copy()
    if "ctts" in b:
        # Read as signed for both versions: v1 is signed by spec and v0
        # "negative" offsets written by some muxers mean the same thing.
        pts += _expand_runs(_table(buf, b["ctts"], 2, ">i4"), n)
    if "stss" in b:
        keyframes = np.zeros(n, dtype=bool)
        sync = _table(buf, b["stss"], 1)[:, 0] - 1
        keyframes[sync[(sync >= 0) & (sync < n)]] = True
    else:
        keyframes = np.ones(n, dtype=bool)

    if not duration:
        duration = int(deltas.sum())
    fps = round(n * timescale / duration, 3) if duration and timescale else 0.0
    return VideoTrack(
        codec=codec, width=width, height=height, timescale=timescale, fps=fps,
        offsets=_sample_offsets(buf, b, sizes), sizes=sizes, dts=dts, pts=pts,
        keyframes=keyframes,
    )


def parse_moov(moov: bytes | memoryview) -> VideoTrack:
    """Parse a complete moov box (starting at its header); first video track.

    The video track is the first trak whose mdia/hdlr handler_type is
    'vide'.  Edit lists (edts/elst) are walked past but not applied: the
    engine numbers frames by sample order, and applying elst would only
    shift times.  Raises NotMP4 for a non-moov buffer, corrupt boxes, or
    ``NotMP4('no video track in the MP4')``.
    """
    buf = memoryview(moov).cast("B")
    hdr = _read_header(buf, 0, len(buf))
    if hdr is None or hdr[0] != "moov":
        raise NotMP4(f"expected a moov box, got {bytes(buf[:8])!r}")
    _, hsize, size = hdr
    if size == 0:
        size = len(buf)
    if size > len(buf):
        raise NotMP4(f"incomplete moov: have {len(buf)} of {size} bytes")
    try:
        # The video is the first enabled video trak with more than one sample; a
        # thumbnail or cover-art trak (one sample, or disabled) only when there is no other.
        candidates = []
        index = -1
        fragmented = False
        for kind, p, e in _children(buf, hsize, size):
            fragmented = fragmented or kind == "mvex"
            if kind != "trak":
                continue
            index += 1
            boxes = _collect(buf, p, e, {})
            hdlr = boxes.get("hdlr")
            # hdlr: version/flags(4) + pre_defined(4) + handler_type(4)
            if hdlr and bytes(buf[hdlr[0] + 8 : hdlr[0] + 12]) == b"vide":
                track = _video_track(buf, boxes)
                track.index = index
                tkhd = boxes.get("tkhd")
                enabled = tkhd is None or bool(buf[tkhd[0] + 3] & 1)
                still = track.codec in _STILL_CODECS
                candidates.append((still, track.frame_count <= 1, not enabled, index, track))
        if candidates:
            track = min(candidates, key=lambda c: c[:4])[4]
            track.fragmented = fragmented
            return track
    except (struct.error, ValueError) as exc:
        if isinstance(exc, NotMP4):
            raise
        raise NotMP4(f"corrupt MP4: {exc}") from None
    raise NotMP4("no video track in the MP4")


NOT_YET = "the boxes after the moov are not here yet"


def why_not_planned(track: VideoTrack, found: Walk) -> str | None:
    """Why the moov's sample table cannot be trusted to be the whole video track, from
    the moov and the top-level boxes ``found`` (walked as far as the bytes allow); None
    when it is the whole track; NOT_YET while a box not walked yet could be a fragment.

    A table that lists only the first fragment looks complete: planning from it would
    report every frame it lists and silently lose the fragments after it.
    """
    if track.fragmented:
        return f"fragmented MP4 (its moov holds mvex and lists {track.frame_count} samples)"
    if any(box.type == "moof" for box in found.boxes):
        return "fragmented MP4 (a moof box without mvex in the moov)"
    if track.frame_count == 0:
        return "the moov lists no samples"
    if found.need is not None:
        return NOT_YET
    return None
