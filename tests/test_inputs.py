"""Every video FFmpeg can read, from the servers users meet.

Each category is a real small file made here with PyAV and served by the real nginx test
CDN; every frame is checked against a plain PyAV decode of the local file (same count,
same order, per-channel mean within 1 level). What the MP4 planner cannot plan goes the
streamed way and must give the same frames; the report says which way it went.
"""
from __future__ import annotations

import struct

import av
import numpy as np
import pytest

from engine import DecodeError, FetchError
from engine import mp4
from tests.conftest import moving_frame
from tests.reference import assert_matches, reference

FRAMES = 50


def make_clip(path, container: str, codec: str, *, w=640, h=360, frames=FRAMES,
              pix_fmt="yuv420p", options=None, tag=None, gop=None) -> None:
    """``gop``: a keyframe every ``gop`` frames, with B-frames where the codec has them."""
    with av.open(str(path), "w", format=container, options=options or {}) as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if tag:
            s.codec_tag = tag
        if codec in ("libx264", "libx265"):
            s.options = {"preset": "ultrafast", "threads": "1"}
            if codec == "libx265":
                s.options["x265-params"] = "log-level=error" + (
                    f":keyint={gop}:min-keyint={gop}:bframes=3" if gop else "")
            elif gop:
                s.options.update(g=str(gop), bf="3")
        elif codec == "libvpx-vp9":
            s.options = {"deadline": "realtime", "cpu-used": "8", "threads": "1"}
        elif codec == "libsvtav1":
            s.options = {"preset": "12"}
        if gop and codec != "libx265":
            s.options["g"] = str(gop)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(moving_frame(i, w, h), format="rgb24")
            for p in s.encode(frame.reformat(format=pix_fmt)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


CATEGORIES = {
    # name: (file name, container, codec, extra)
    "matroska-h264": ("clip.mkv", "matroska", "libx264", {}),
    "webm-vp9": ("clip.webm", "webm", "libvpx-vp9", {}),
    "mpegts-h264": ("clip.ts", "mpegts", "libx264", {}),
    "fragmented-mp4": ("frag.mp4", "mp4", "libx264",
                       {"options": {"movflags": "frag_keyframe+empty_moov+default_base_moof"}}),
    "hevc-hvc1": ("hvc1.mp4", "mp4", "libx265", {"tag": "hvc1", "w": 320, "h": 180}),
    "hevc-hev1-10bit": ("hev1.mp4", "mp4", "libx265",
                        {"tag": "hev1", "w": 320, "h": 180, "pix_fmt": "yuv420p10le"}),
    "av1-mp4": ("av1.mp4", "mp4", "libsvtav1", {"w": 320, "h": 180, "frames": 25}),
    "full-range-h264": ("full.mp4", "mp4", "libx264", {"pix_fmt": "yuvj420p"}),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory, cdn):
    """name -> (local path, URL); made once for the module, served by nginx."""
    out = {}
    tmp = tmp_path_factory.mktemp("inputs")
    for name, (fname, container, codec, extra) in CATEGORIES.items():
        if codec not in av.codecs_available:
            continue
        path = tmp / fname
        make_clip(path, container, codec, **extra)
        served = cdn.root / f"in-{fname}"
        served.write_bytes(path.read_bytes())
        out[name] = (path, cdn.url(served.name))
    return out


@pytest.mark.parametrize("name", list(CATEGORIES))
def test_every_container_and_codec_gives_every_frame(engine, clips, name):
    if name not in clips:
        pytest.skip(f"this FFmpeg build has no encoder for {name}")
    path, url = clips[name]
    report = engine.report(url)
    assert report.ok, report.error
    assert_matches(report, reference(path), tolerance=1.0)
    streamed = name in ("matroska-h264", "webm-vp9", "mpegts-h264", "fragmented-mp4")
    assert report.plan == ("streamed" if streamed else "planned")
    assert report.video["frames"] == len(reference(path))


SPARSE = {
    # many GOPs (B-frames where the codec has them): a selection's spans lie apart
    # (decode lanes) and hold unselected non-reference frames (skipped)
    "hevc-gop": ("hevc-gop.mp4", "mp4", "libx265", {"tag": "hvc1", "w": 320, "h": 180}),
    "hevc-10bit-gop": ("hevc10-gop.mp4", "mp4", "libx265",
                       {"tag": "hev1", "w": 320, "h": 180, "pix_fmt": "yuv420p10le"}),
    "av1-gop": ("av1-gop.mp4", "mp4", "libsvtav1", {"w": 320, "h": 180}),
    "h264-gop": ("h264-gop.mp4", "mp4", "libx264", {"w": 320, "h": 180}),
    "vp9-webm-gop": ("vp9-gop.webm", "webm", "libvpx-vp9", {"w": 320, "h": 180}),
    "h264-ts-gop": ("h264-gop.ts", "mpegts", "libx264", {"w": 320, "h": 180}),
}


@pytest.fixture(scope="module")
def gop_clips(tmp_path_factory, cdn):
    out = {}
    tmp = tmp_path_factory.mktemp("sparse-inputs")
    for name, (fname, container, codec, extra) in SPARSE.items():
        if codec in av.codecs_available:
            path = tmp / fname
            make_clip(path, container, codec, frames=120, gop=24, **extra)
            (cdn.root / f"gop-{fname}").write_bytes(path.read_bytes())
            out[name] = (path, cdn.url(f"gop-{fname}"))
    return out


@pytest.mark.parametrize("name", list(SPARSE))
def test_sparse_selections_are_frame_exact_on_every_codec(engine, gop_clips, name):
    """The frames a selection returns equal a plain decode's at those indices, pixel for
    pixel within one level: planned (spans, lanes, skipped frames) and streamed alike."""
    if name not in gop_clips:
        pytest.skip(f"this FFmpeg build has no encoder for {name}")
    path, url = gop_clips[name]
    with av.open(str(path)) as c:
        plain = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    for selection, want in ((dict(count=7), np.linspace(0, len(plain) - 1, 7).astype(int)),
                            (dict(frames=[3, 30, 31, 77, 119]), [3, 30, 31, 77, 119])):
        got = engine.frames(url, **selection)
        assert got.frame_numbers == [int(i) for i in want]
        assert np.abs(got.array.astype(int) - plain[want].astype(int)).max() <= 1
        assert got.report.plan == ("planned" if path.suffix == ".mp4" else "streamed")


def test_the_report_says_which_way_the_job_went(engine, clips, cdn):
    assert engine.process(cdn.url("small.mp4")).plan == "planned"
    streamed = engine.process(clips["matroska-h264"][1])
    assert streamed.plan == "streamed" and streamed.video["moov"] is None
    assert (streamed.video["width"], streamed.video["height"]) == (640, 360)


def test_max_frames_on_a_streamed_file(engine, clips):
    path, url = clips["mpegts-h264"]
    report = engine.process(url, max_frames=10)
    assert_matches(report, reference(path, 10), tolerance=1.0)


# ------------------------------------------------------------------ box layouts


def _boxes(data: bytes) -> list[tuple[str, int, int]]:
    found = mp4.walk(mp4.reader_of(data), len(data))
    out = [(b.type, b.offset, b.size) for b in found.boxes]
    pos = out[-1][1] + out[-1][2]
    while pos < len(data):   # past the moov
        size, kind = struct.unpack_from(">I4s", data, pos)
        out.append((kind.decode(), pos, size))
        pos += size
    return out


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _free_between_mdat_and_moov(moov_end: bytes, sizes=(100_000,), kinds=(b"free",)) -> bytes:
    """Insert boxes between the mdat and the moov: chunk offsets stay valid (they point
    into the mdat, before the insertion)."""
    boxes = _boxes(moov_end)
    moov = next(b for b in boxes if b[0] == "moov")
    extra = b"".join(_box(k, b"\0" * (s - 8)) for k, s in zip(kinds, sizes))
    return moov_end[:moov[1]] + extra + moov_end[moov[1]:]


@pytest.fixture(scope="module")
def moov_end_clip(small_clips):
    return small_clips["small-moov-end"].read_bytes()


@pytest.mark.parametrize("layout", ["free", "skip-uuid-free", "empty-mdat", "large-free"])
def test_anything_between_mdat_and_moov_is_walked_over(engine, cdn, small_clips, moov_end_clip,
                                                       layout):
    if layout == "free":
        data = _free_between_mdat_and_moov(moov_end_clip)
    elif layout == "skip-uuid-free":
        data = _free_between_mdat_and_moov(moov_end_clip, (5000, 24 + 100, 70_000),
                                           (b"skip", b"uuid", b"free"))
    elif layout == "empty-mdat":
        data = _free_between_mdat_and_moov(moov_end_clip, (8,), (b"mdat",))
    else:   # a free box far larger than the first request
        data = _free_between_mdat_and_moov(moov_end_clip, (3_000_000,))
    name = f"layout-{layout}.mp4"
    (cdn.root / name).write_bytes(data)
    report = engine.report(cdn.url(name))
    assert report.ok, report.error
    assert report.video["moov"] == "end"
    assert_matches(report, reference(small_clips["small-moov-end"]))


def test_walker_unit_layouts():
    """The walker on byte layouts, no processes: 64-bit sizes, size 0, headers not here."""
    ftyp = _box(b"ftyp", b"isom" + b"\0" * 4)
    big_mdat = struct.pack(">I4sQ", 1, b"mdat", 16 + 1000) + b"\0" * 1000
    moov = _box(b"moov", b"\0" * 50)
    data = ftyp + big_mdat + _box(b"free", b"\0" * 20) + moov
    found = mp4.walk(mp4.reader_of(data), len(data))
    assert found.moov.offset == len(ftyp) + len(big_mdat) + 28 and found.layout == "end"
    # only the first bytes here: the walker asks for the next header, never guesses
    found = mp4.walk(mp4.reader_of(data[:100]), len(data))
    assert found.moov is None and found.need == len(ftyp) + len(big_mdat)
    # size 0: the mdat runs to the end, no moov after it
    data0 = ftyp + moov + struct.pack(">I4s", 0, b"mdat") + b"\0" * 500
    found = mp4.walk(mp4.reader_of(data0), len(data0))
    assert found.moov.offset == len(ftyp) and found.layout == "front"
    data1 = ftyp + struct.pack(">I4s", 0, b"mdat") + b"\0" * 500
    found = mp4.walk(mp4.reader_of(data1), len(data1))
    assert found.moov is None and found.need is None
    with pytest.raises(mp4.NotMP4, match="truncated file"):
        mp4.walk(mp4.reader_of(ftyp + big_mdat[:500]), len(ftyp) + 500)
    with pytest.raises(mp4.NotMP4, match="not an MP4"):
        mp4.walk(mp4.reader_of(b"<!doctype html><html>" + b" " * 100), 121)


# ------------------------------------------------------------------ servers


@pytest.mark.parametrize("ext", ["txt", "bin"])
def test_content_type_is_a_hint(engine, cdn, small_clips, ext):
    """nginx serves .txt as text/plain and .bin as application/octet-stream."""
    name = f"video-as.{ext}"
    (cdn.root / name).write_bytes(small_clips["small"].read_bytes())
    report = engine.report(cdn.url(name))
    assert report.ok, report.error
    assert_matches(report, reference(small_clips["small"]))


@pytest.mark.parametrize("content_type", ["binary/octet-stream", None])
def test_odd_or_missing_content_type_is_a_hint(engine, faulty_server, small_clips, content_type):
    server = faulty_server(small_clips["small"].read_bytes(), content_type=content_type)
    report = engine.report(server.url("clip"))
    assert report.ok, report.error
    assert_matches(report, reference(small_clips["small"]))


@pytest.mark.parametrize("mode", ["chunked", "eof"])
@pytest.mark.parametrize("name", ["small", "small-moov-end"])
def test_no_content_length_streams_into_a_growing_segment(engine, faulty_server, small_clips,
                                                          mode, name):
    """No Content-Length and no Range (chunked, or ended by closing): the body streams
    into a segment that grows, decoded as it arrives; every frame, the size learned at
    the end."""
    data = small_clips[name].read_bytes()
    report = engine.report(faulty_server(data, mode=mode).url("clip.mp4"))
    assert report.ok, report.error
    assert report.plan == "streamed" and report.video["bytes"] == len(data)
    assert report.fetch["bytes"] == len(data)
    assert_matches(report, reference(small_clips[name]))


def test_no_content_length_streams_other_containers_too(engine, faulty_server, clips):
    path, _ = clips["matroska-h264"]
    report = engine.report(faulty_server(path.read_bytes(), mode="chunked").url("clip.mkv"))
    assert report.ok, report.error
    assert_matches(report, reference(path))


def test_no_content_length_larger_than_the_limit_is_one_clear_error(faulty_server, small_clips):
    from engine import Engine
    data = small_clips["small"].read_bytes()
    with Engine(processor="engine.processors:null", device="cpu", max_bytes=len(data) // 2,
                fetchers=1, decoders=1) as eng:
        report = eng.report(faulty_server(data, mode="chunked").url("clip.mp4"))
        assert not report.ok and report.error_kind == "FetchError"
        assert "ENGINE_MAX_BYTES" in report.error and "\n" not in report.error
        # the engine goes on; with a Content-Length the same file is refused at its head
        known = eng.report(faulty_server(data).url("clip.mp4"))
        assert not known.ok and "over the limit" in known.error


def test_a_redirect_to_another_origin_is_followed_for_every_range(engine, cdn, sn44_clips):
    """127.0.0.1 on the HTTP/2 port sends the client to localhost on the HTTP/1.1 port:
    the ranges go straight to where the redirect pointed."""
    report = engine.report(cdn.url("other-origin/sn44.mp4"))
    assert report.ok, report.error
    assert report.frames_processed == 750 and report.fetch["ranges"] > 3
    assert report.fetch["http_version"] == "HTTP/1.1"


def test_a_signed_query_string_goes_with_every_request(engine, faulty_server, small_clips):
    data = small_clips["small-moov-end"].read_bytes()
    server = faulty_server(data)
    query = "X-Amz-Signature=ab%2Fcd&Expires=1999999999&token=a=b"
    report = engine.report(server.url(f"clip.mp4?{query}"))
    assert report.ok, report.error
    assert_matches(report, reference(small_clips["small-moov-end"]))
    gets = [t for t in server.targets if t.startswith("/clip.mp4")]
    assert gets and all(t == f"/clip.mp4?{query}" for t in gets)


def test_an_html_page_is_refused_whatever_its_type(engine, cdn):
    (cdn.root / "page-as.mp4").write_text("<!DOCTYPE html><html><body>404</body></html>")
    with pytest.raises(DecodeError, match="not a video"):
        engine.process(cdn.url("page-as.mp4"))


def test_an_empty_file_says_so(engine, cdn):
    (cdn.root / "empty.mp4").write_bytes(b"")
    with pytest.raises(FetchError, match="empty file"):
        engine.process(cdn.url("empty.mp4"))
    assert engine.process(cdn.url("small.mp4")).frames_processed == 50


def _with_cover(path, fmt: str) -> None:
    """A JPEG cover picture as the first video track, then the real video."""
    with av.open(str(path), mode="w", format=fmt) as out:
        cover = out.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 64, "yuvj420p"
        video = out.add_stream("libx264", rate=25, options={"preset": "ultrafast", "bf": "2"})
        video.width, video.height, video.pix_fmt = 320, 240, "yuv420p"
        still = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
        out.mux(cover.encode(still.reformat(format="yuvj420p")))
        out.mux(cover.encode(None))
        for i in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(moving_frame(i, 320, 240), format="rgb24")
            out.mux(video.encode(frame))
        out.mux(video.encode(None))


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
def test_cover_art_is_never_the_video(engine, cdn, tmp_path, fmt):
    path = tmp_path / f"cover.{fmt}"
    _with_cover(path, fmt)
    (cdn.root / path.name).write_bytes(path.read_bytes())
    report = engine.report(cdn.url(path.name))
    assert report.ok, report.error
    assert (report.video["width"], report.video["height"]) == (320, 240)
    with av.open(str(path)) as c:
        stream = next(s for s in c.streams.video if s.codec_context.name == "h264")
        from tests.reference import frame_stats
        ref = [frame_stats(f.to_ndarray(format="rgb24")) for f in c.decode(stream)]
    assert len(ref) == FRAMES
    assert_matches(report, ref, tolerance=1.0)
