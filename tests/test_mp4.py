"""Tests for engine.mp4, using PyAV/FFmpeg as the reference demuxer.

Small H.264 files with B-frames are generated once per module: one with the
moov at the front (faststart) and interleaved AAC audio, one with the moov at
the end and video only.  Everything our parser reports per sample is checked
against what FFmpeg's mov demuxer reports for the same packet.
"""

import struct

import av
import numpy as np
import pytest

from engine.mp4 import (NOT_YET, Box, NotMP4, VideoTrack, parse_moov, reader_of, walk,
                        why_not_planned)

N_FRAMES = 60
HEAD = 64 * 1024


def _make_mp4(path, faststart: bool, audio: bool, movflags: str | None = None) -> None:
    """Encode N_FRAMES of moving gradients at 320x240/25fps with B-frames."""
    opts = {"movflags": movflags or "faststart"} if faststart or movflags else {}
    with av.open(str(path), "w", options=opts) as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 320, 240, "yuv420p"
        # g=20 gives several keyframes, so stss has more than one entry.
        video.options = {"bf": "3", "preset": "veryfast", "g": "20"}
        sound = None
        if audio:
            sound = out.add_stream("aac", rate=48000)
            sound.layout = "mono"
        for i in range(N_FRAMES):
            img = np.zeros((240, 320, 3), np.uint8)
            img[..., 0] = (np.arange(320) * 2 + i * 5) % 256
            img[..., 1] = (np.arange(240)[:, None] * 3 + i * 7) % 256
            img[(i * 4) % 220 :][:20, 50:90, 2] = 255
            for pkt in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in video.encode():
            out.mux(pkt)
        if sound is not None:
            t = np.arange(48000 * 3) / 48000
            wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            for k in range(0, len(wave), 1024):
                chunk = wave[None, k : k + 1024]
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 48000, k
                for pkt in sound.encode(frame):
                    out.mux(pkt)
            for pkt in sound.encode():
                out.mux(pkt)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp4")
    paths = {"front": d / "front.mp4", "end": d / "end.mp4", "frag": d / "frag.mp4",
             "frag-empty": d / "frag-empty.mp4"}
    _make_mp4(paths["front"], faststart=True, audio=True)
    _make_mp4(paths["end"], faststart=False, audio=False)
    # fragments cut at each keyframe; the moov's table lists the first fragment only
    _make_mp4(paths["frag"], faststart=False, audio=True, movflags="frag_keyframe")
    _make_mp4(paths["frag-empty"], faststart=False, audio=False,
              movflags="frag_keyframe+empty_moov")
    return paths


def _moov_bytes(data: bytes) -> bytes:
    box = walk(reader_of(data), len(data)).moov
    return data[box.offset : box.offset + box.size]


def _track(path) -> VideoTrack:
    return parse_moov(_moov_bytes(path.read_bytes()))


def _reference_packets(path):
    """(pos, size, dts, pts, is_keyframe) per video packet, from FFmpeg."""
    with av.open(str(path)) as c:
        return [
            (p.pos, p.size, p.dts, p.pts, p.is_keyframe)
            for p in c.demux(c.streams.video[0])
            if p.size and p.pos is not None  # skip the final flush packet
        ]


def _decode_all(path) -> list[np.ndarray]:
    """Decoded frames in presentation order; undecodable packets are skipped."""
    frames = []
    with av.open(str(path)) as c:
        for pkt in c.demux(c.streams.video[0]):
            try:
                frames += [f.to_ndarray(format="yuv420p") for f in pkt.decode()]
            except av.error.InvalidDataError:
                pass  # zero padding after the prefix is garbage to the decoder
    return frames


# ---------------------------------------------------------------- sample table


@pytest.mark.parametrize("name", ["front", "end"])
def test_sample_table_matches_ffmpeg(files, name):
    track = _track(files[name])
    pos, size, dts, pts, key = map(np.array, zip(*_reference_packets(files[name])))

    assert track.frame_count == len(pos) == N_FRAMES
    np.testing.assert_array_equal(track.offsets, pos)
    np.testing.assert_array_equal(track.sizes, size)
    np.testing.assert_array_equal(track.keyframes, key)
    assert track.keyframes[0] and 1 < track.keyframes.sum() < N_FRAMES
    for arr in (track.offsets, track.sizes, track.dts, track.pts):
        assert arr.dtype == np.int64

    # FFmpeg applies the edit list: x264 with B-frames needs a composition
    # delay, so the muxer writes ctts offsets > 0 plus an elst whose
    # media_time (here 2 frames = 1024 ticks) FFmpeg subtracts from BOTH dts
    # and pts (its first dts is negative, first pts 0).  We keep raw sample
    # table times, so the two must differ by one constant shift.
    shift = dts - track.dts
    assert np.all(shift == shift[0]) and shift[0] <= 0
    np.testing.assert_array_equal(pts - track.pts, shift)
    assert track.dts[0] == 0
    assert not np.array_equal(track.pts, track.dts)  # there are B-frames

    np.testing.assert_array_equal(track.presentation_order(), np.argsort(pts, kind="stable"))
    assert not np.array_equal(track.presentation_order(), np.arange(N_FRAMES))


@pytest.mark.parametrize("name", ["front", "end"])
def test_stream_properties(files, name):
    track = _track(files[name])
    with av.open(str(files[name])) as c:
        vs = c.streams.video[0]
        assert track.timescale == vs.time_base.denominator
    assert (track.codec, track.width, track.height) == ("h264", 320, 240)
    assert track.fps == 25.0


def test_audio_interleaving_splits_video_into_chunks(files):
    """The faststart file has audio, so video samples are not contiguous:
    this proves stsc/stco chunk expansion is really exercised."""
    track = _track(files["front"])
    gaps = track.offsets[1:] != track.offsets[:-1] + track.sizes[:-1]
    assert gaps.any()


# ---------------------------------------------------------------- box walking


def _walk(head: bytes, file_size: int):
    return walk(reader_of(head), file_size)


def test_walk_front(files):
    data = files["front"].read_bytes()
    found = _walk(data[:HEAD], len(data))
    assert found.layout == "front" and found.need is None
    assert bytes(data[found.moov.offset + 4 : found.moov.offset + 8]) == b"moov"


def test_walk_end(files):
    data = files["end"].read_bytes()
    moov = _walk(data, len(data)).moov
    # The test file is small, so 64 KiB shows the moov header itself ...
    assert _walk(data[:HEAD], len(data)).moov == moov
    # ... while a short head only shows the mdat header: the walk asks for the next
    # header where the mdat ends and never guesses it is the moov.
    found = _walk(data[:200], len(data))
    assert found.moov is None and found.need == moov.offset and found.layout == "end"
    assert moov.offset > 200


def test_walk_unknown():
    # ftyp fully visible, next header not in head: fetch it.
    ftyp = struct.pack(">I4s4sI", 16, b"ftyp", b"isom", 512)
    assert _walk(ftyp + b"\0\0", 10_000).need == 16
    assert _walk(b"", 10_000).need == 0


def test_walk_sizes():
    ftyp = struct.pack(">I4s4sI", 16, b"ftyp", b"isom", 512)
    large = struct.pack(">I4sQ", 1, b"mdat", 16 + 100)  # 64-bit largesize
    to_eof = struct.pack(">I4s", 0, b"moov")  # size 0: runs to end of file
    head = ftyp + large + b"\0" * 100 + to_eof
    file_size = len(head) + 50
    found = _walk(head, file_size)
    assert found.boxes == (Box("ftyp", 0, 16), Box("mdat", 16, 116),
                           Box("moov", 132, file_size - 132))
    # The walk stops at a header that is not fully inside head.
    assert _walk(head[:20], file_size).boxes == (Box("ftyp", 0, 16),)


@pytest.mark.parametrize(
    "data",
    [
        b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>" * 4,
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        struct.pack(">I4s", 4, b"ftyp") + b"\0" * 100,  # size smaller than its header
        struct.pack(">I4s", 10_000, b"ftyp") + b"\0" * 100,  # box past end of file
        b"tiny",
    ],
)
def test_not_mp4(data):
    with pytest.raises(NotMP4) as err:
        _walk(data, len(data))
    assert "\n" not in str(err.value)


def test_not_mp4_message_for_html():
    html = b"<!DOCTYPE html><html></html>"
    with pytest.raises(NotMP4, match=r"not an MP4 file \(starts with b'<!DOCTYPE html"):
        _walk(html, len(html))


def test_parse_moov_rejects_bad_input(files):
    with pytest.raises(NotMP4, match="no video track"):
        parse_moov(struct.pack(">I4s", 8, b"moov"))
    with pytest.raises(NotMP4):
        parse_moov(b"<!DOCTYPE html><html></html>")
    moov = _moov_bytes(files["end"].read_bytes())
    with pytest.raises(NotMP4):
        parse_moov(moov[: len(moov) // 2])  # truncated


# ---------------------------------------------------------------- box variants


_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}


def _rewrite(box: bytes, edit) -> bytes:
    """Rebuild a box tree, letting ``edit(type, payload)`` replace leaf boxes.

    Used to produce the variants FFmpeg does not write by default (co64,
    ctts v1, mdhd v1) from a real moov.  Only valid for moov-at-end files,
    where growing the moov does not move any sample.
    """
    size, kind = struct.unpack_from(">I4s", box)
    payload = box[8:size]
    if kind in _CONTAINERS:
        parts, pos = [], 0
        while pos < len(payload):
            (child_size,) = struct.unpack_from(">I", payload, pos)
            parts.append(_rewrite(payload[pos : pos + child_size], edit))
            pos += child_size
        payload = b"".join(parts)
    else:
        kind, payload = edit(kind, payload)
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _to_co64_ctts1_mdhd1(kind: bytes, payload: bytes):
    if kind == b"stco":
        (n,) = struct.unpack_from(">I", payload, 4)
        offs = np.frombuffer(payload, ">u4", n, 8).astype(">u8")
        return b"co64", payload[:8] + offs.tobytes()
    if kind == b"ctts":
        # version 1 with signed offsets, shifted so the first one is negative
        (n,) = struct.unpack_from(">I", payload, 4)
        tab = np.frombuffer(payload, ">i4", 2 * n, 8).reshape(n, 2).copy()
        tab[:, 1] -= 2048
        return kind, b"\x01\0\0\0" + payload[4:8] + tab.astype(">i4").tobytes()
    if kind == b"mdhd":
        create, modify, scale, dur = struct.unpack_from(">IIII", payload, 4)
        return kind, b"\x01\0\0\0" + struct.pack(">QQIQ", create, modify, scale, dur) + payload[20:]
    return kind, payload


def test_co64_ctts_v1_mdhd_v1(files):
    moov = _moov_bytes(files["end"].read_bytes())
    ref = parse_moov(moov)
    variant = _rewrite(moov, _to_co64_ctts1_mdhd1)
    assert b"co64" in variant and b"stco" not in variant
    got = parse_moov(variant)
    np.testing.assert_array_equal(got.offsets, ref.offsets)
    np.testing.assert_array_equal(got.sizes, ref.sizes)
    np.testing.assert_array_equal(got.dts, ref.dts)
    np.testing.assert_array_equal(got.pts, ref.pts - 2048)
    assert got.pts.min() < 0
    assert (got.timescale, got.fps) == (ref.timescale, ref.fps)


# ---------------------------------------------------------------- need_end


@pytest.mark.parametrize("name", ["front", "end"])
def test_need_end_shape(files, name):
    track = _track(files[name])
    need = track.need_end()
    ends = track.offsets + track.sizes
    assert need.shape == (N_FRAMES,) and need.dtype == np.int64
    assert np.all(np.diff(need) >= 0)
    first = track.presentation_order()[0]
    assert need[0] >= ends[first]
    assert need[-1] == ends.max()
    # every sample needed for presentation frame i ends at or before need[i]
    order = track.presentation_order()
    for i in range(N_FRAMES):
        assert ends[: order[: i + 1].max() + 1].max() <= need[i]
    assert track.bytes_needed(10) == need[9]
    assert track.bytes_needed(10**6) == need[-1]
    assert track.bytes_needed(0) == 0


def test_prefix_of_bytes_needed_decodes_n_frames(files, tmp_path):
    """The real promise of need_end: with only bytes [0, bytes_needed(n))
    present (rest zeroed, as in a partly filled shared buffer), FFmpeg
    decodes the first n frames identically to the full file."""
    data = files["front"].read_bytes()
    track = _track(files["front"])
    full = _decode_all(files["front"])
    n = 10
    end = track.bytes_needed(n)
    assert end < len(data)
    partial = tmp_path / "partial.mp4"
    partial.write_bytes(data[:end] + bytes(len(data) - end))
    got = _decode_all(partial)
    assert len(got) >= n
    for i in range(n):
        np.testing.assert_array_equal(got[i], full[i])


def _box(kind: bytes, payload: bytes, version: int | None = None) -> bytes:
    if version is not None:  # full box: version + 3 flag bytes
        payload = bytes([version, 0, 0, 0]) + payload
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def test_synthetic_moov_hevc_co64_stsc_runs():
    """A hand-built moov covering what FFmpeg's small outputs do not: an
    audio trak before the video one, hvc1, offsets above 4 GiB (co64),
    several stsc runs, constant stsz, no ctts, mdhd v1."""
    n = 1000
    stsc = struct.pack(">I", 2) + struct.pack(">III", 1, 3, 1) + struct.pack(">III", 2, 7, 1)
    chunks = 1 + -(-(n - 3) // 7)
    chunk_offsets = (np.arange(chunks, dtype=np.uint64) * 10**6 + 2**33).astype(">u8")
    dims = struct.pack(">HH", 1920, 1080)
    entry = _box(b"hvc1", bytes(6) + b"\0\1" + bytes(16) + dims + bytes(50))
    stbl = _box(b"stbl", b"".join([
        _box(b"stsd", struct.pack(">I", 1) + entry, 0),
        _box(b"stts", struct.pack(">III", 1, n, 512), 0),
        _box(b"stsc", stsc, 0),
        _box(b"stsz", struct.pack(">II", 100, n), 0),
        _box(b"co64", struct.pack(">I", chunks) + chunk_offsets.tobytes(), 0),
        _box(b"stss", struct.pack(">III", 2, 1, 50), 0),
    ]))
    mdhd = _box(b"mdhd", struct.pack(">QQIQ", 0, 0, 12800, n * 512) + bytes(4), 1)
    hdlr = _box(b"hdlr", bytes(4) + b"vide" + bytes(13), 0)
    audio = _box(b"trak", _box(b"mdia", _box(b"hdlr", bytes(4) + b"soun" + bytes(13), 0)))
    video = _box(b"trak", _box(b"edts", _box(b"elst", bytes(4), 0))
                 + _box(b"mdia", mdhd + hdlr + _box(b"minf", _box(b"dinf", b"") + stbl)))
    track = parse_moov(_box(b"moov", audio + video))

    assert (track.codec, track.width, track.height, track.fps) == ("hevc", 1920, 1080, 25.0)
    assert track.frame_count == n and list(np.flatnonzero(track.keyframes)) == [0, 49]
    base = 2**33
    expected = [base, base + 100, base + 200, base + 10**6, base + 10**6 + 100]
    assert list(track.offsets[:5]) == expected
    assert track.offsets[10] == base + 2 * 10**6  # chunk 2 starts at sample 3 + 7
    np.testing.assert_array_equal(track.pts, track.dts)
    np.testing.assert_array_equal(track.presentation_order(), np.arange(n))
    np.testing.assert_array_equal(track.need_end(), track.offsets + 100)


# ---------------------------------------------------------------- is the table the track?


def _frames(path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def _verdict(data: bytes, head: int | None = None):
    found = _walk(data[:head], len(data))
    moov = data[found.moov.offset:found.moov.offset + found.moov.size]
    return found, why_not_planned(parse_moov(moov), found)


def test_a_moov_with_mvex_is_fragmented_whatever_its_table_lists(files):
    data = files["frag"].read_bytes()
    found, why = _verdict(data)
    track = parse_moov(_moov_bytes(data))
    assert track.fragmented and 0 < track.frame_count < _frames(files["frag"]) == N_FRAMES
    assert why.startswith("fragmented MP4 (its moov holds mvex")
    # the walk goes past the moov and its first fragment's mdat to the first moof
    assert [b.type for b in found.boxes] == ["ftyp", "moov", "mdat", "moof"]
    assert found.layout == "front" and found.need is None
    empty = files["frag-empty"].read_bytes()
    assert parse_moov(_moov_bytes(empty)).frame_count == 0
    assert _verdict(empty)[1].startswith("fragmented MP4 (its moov holds mvex")


def test_plain_layouts_are_planned_once_the_walk_reaches_the_end(files):
    for name in ("front", "end"):
        data = files[name].read_bytes()
        found, why = _verdict(data)
        assert why is None and not parse_moov(_moov_bytes(data)).fragmented
        assert found.need is None and found.boxes[-1].offset + found.boxes[-1].size == len(data)
    # the head ends inside the header after the moov: it could still be a fragment
    data = files["front"].read_bytes()
    moov = _walk(data, len(data)).moov
    found, why = _verdict(data, moov.offset + moov.size + 4)
    assert why is NOT_YET and found.need == moov.offset + moov.size


def _without_mvex(data: bytes) -> bytes:
    """The same bytes with the moov's mvex box renamed free: fragments nothing announces."""
    moov = _walk(data, len(data)).moov
    at = data.index(b"mvex", moov.offset, moov.offset + moov.size)
    return data[:at] + b"free" + data[at + 4:]


def test_a_moof_anywhere_means_the_table_is_not_the_track(files):
    data = _without_mvex(files["frag"].read_bytes())
    found, why = _verdict(data)
    assert not parse_moov(_moov_bytes(data)).fragmented
    assert why == "fragmented MP4 (a moof box without mvex in the moov)"
    # seen before the moov (mdat, moof, moov): the same
    boxes = {b.type: b for b in found.boxes}
    moov, moof = boxes["moov"], boxes["moof"]
    ftyp = data[:found.boxes[1].offset]
    moved = ftyp + data[moof.offset:moof.offset + moof.size] \
        + data[moov.offset:moov.offset + moov.size]
    assert _verdict(moved)[1] == why


def test_the_walk_after_the_moov_stops_at_a_box_it_cannot_read(files):
    """A plain demuxer stops there too: no fragment can follow it, and a file cut inside
    its mdat is a truncated file (named by the planner), not an unreadable one."""
    data = files["front"].read_bytes()
    cut = data[:len(data) - 1000]
    found, why = _verdict(cut)
    assert why is None and "mdat" not in [b.type for b in found.boxes]
    bad = data + struct.pack(">I4s", 4, b"free")     # a size smaller than its header
    assert _verdict(bad)[1] is None
    with pytest.raises(NotMP4, match="truncated file"):   # before the moov: as before
        end = files["end"].read_bytes()
        _walk(end[:len(end) // 2], len(end) // 2)
