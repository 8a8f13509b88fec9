"""Fragmented MP4, every layout FFmpeg writes, through the real nginx CDN on both backends.

A moov written with ``frag_keyframe`` (no ``empty_moov``) lists the first fragment's
samples only: planned from that table, a job would report those frames and lose the
rest. Whatever the moov lists, a fragmented file is read front to back (the streamed
way, decoded by PyAV whatever ENGINE_DECODER says) and gives every frame of a plain
decode; what cannot be known to be whole is never reported ok with frames missing.
"""
from __future__ import annotations

import struct

import av
import numpy as np
import pytest

from engine import Engine, mp4
from tests.reference import assert_matches, reference
from tests.conftest import moving_frame

FRAMES = 60
GOP = 15          # a keyframe, so a fragment, every GOP frames

LAYOUTS = {
    # name: (movflags, audio)
    "frag_keyframe": ("frag_keyframe", False),
    "frag_keyframe-audio": ("frag_keyframe", True),
    "empty_moov": ("frag_keyframe+empty_moov", False),
    "empty_moov-audio": ("frag_keyframe+empty_moov", True),
    "default_base_moof": ("frag_keyframe+default_base_moof", True),
    "sidx": ("frag_keyframe+dash", True),    # a sidx before every moof
}


def make_fragmented(path, movflags: str, audio: bool) -> None:
    with av.open(str(path), "w", format="mp4", options={"movflags": movflags}) as c:
        video = c.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 320, 240, "yuv420p"
        video.options = {"preset": "ultrafast", "threads": "1", "g": str(GOP)}
        sound = c.add_stream("aac", rate=48000) if audio else None
        for i in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(moving_frame(i, 320, 240), format="rgb24")
            c.mux(video.encode(frame.reformat(format="yuv420p")))
            if sound is not None:
                tone = np.sin(np.arange(1920) * (0.05 + i / 1000))[None].astype(np.float32)
                chunk = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 48000, i * 1920
                c.mux(sound.encode(chunk))
        c.mux(video.encode())
        if sound is not None:
            c.mux(sound.encode())


def _top_boxes(data: bytes) -> list[tuple[str, int, int]]:
    out, pos = [], 0
    while pos < len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        out.append((kind.decode("latin-1"), pos, size))
        pos += size
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory, cdn):
    """name -> (local path, URL), served by nginx."""
    tmp = tmp_path_factory.mktemp("fragmented")
    out = {}
    for name, (movflags, audio) in LAYOUTS.items():
        path = tmp / f"frag-{name}.mp4"
        make_fragmented(path, movflags, audio)
        (cdn.root / path.name).write_bytes(path.read_bytes())
        out[name] = (path, cdn.url(path.name))
    return out


@pytest.fixture(scope="module")
def decord_engine(cdn):
    with Engine(processor="engine.processors:stats", device="cpu", decoder="decord",
                fetchers=1, decoders=1) as eng:
        yield eng


@pytest.fixture(params=["pyav", "decord"])
def any_engine(request):
    return request.getfixturevalue("engine" if request.param == "pyav" else "decord_engine")


def test_the_layouts_are_what_they_claim(clips):
    """The clips hold what each layout is about (else the tests below prove little)."""
    for name, (path, _) in clips.items():
        data = path.read_bytes()
        kinds = [k for k, _, _ in _top_boxes(data)]
        found = mp4.walk(mp4.reader_of(data), len(data))
        track = mp4.parse_moov(data[found.moov.offset:found.moov.offset + found.moov.size])
        assert track.fragmented and kinds.count("moof") > 1, name
        assert len(reference(path)) == FRAMES, name
        # the moov lists the first fragment only, or nothing (empty_moov; dash implies it)
        empty = "empty_moov" in LAYOUTS[name][0] or "dash" in LAYOUTS[name][0]
        assert track.frame_count == (0 if empty else GOP), name
        assert ("sidx" in kinds) == (name == "sidx"), name


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_fragmented_layout_gives_every_frame(any_engine, clips, name):
    path, url = clips[name]
    report = any_engine.report(url)
    assert report.ok, report.error
    assert report.plan == "streamed" and report.decoder == "pyav"
    assert report.video["frames"] == FRAMES
    assert_matches(report, reference(path), tolerance=1.0)


def test_max_frames_on_a_fragmented_file(engine, clips):
    path, url = clips["frag_keyframe"]
    report = engine.report(url, max_frames=GOP + 5)     # past the moov's table
    assert report.ok, report.error
    assert_matches(report, reference(path, GOP + 5), tolerance=1.0)


def _free(size: int) -> bytes:
    return struct.pack(">I4s", size, b"free") + bytes(size - 8)


def test_a_moof_the_head_does_not_show_is_never_ok_with_frames_missing(any_engine, clips,
                                                                      cdn):
    """No mvex announces the fragments, and the first moof lies past the first request:
    the planner fetches the header after the first mdat before it trusts the table,
    sees the moof and streams. A plain decode refuses such a file; the engine's stops
    after the first fragment: one clear line, never those frames reported ok."""
    path = clips["default_base_moof"][0]
    data = path.read_bytes()   # its moofs find their data relative to themselves
    boxes = _top_boxes(data)
    moov = next(b for b in boxes if b[0] == "moov")
    moof = next(b for b in boxes if b[0] == "moof")
    at = data.index(b"mvex", moov[1], moov[1] + moov[2])
    data = data[:at] + b"free" + data[at + 4:moof[1]] + _free(300_000) + data[moof[1]:]
    (cdn.root / "frag-no-mvex.mp4").write_bytes(data)
    report = any_engine.report(cdn.url("frag-no-mvex.mp4"))
    assert not report.ok and report.plan == "streamed" and "\n" not in report.error
    if report.results:     # what it could decode before FFmpeg stopped is kept, and right
        assert_matches(report, reference(path, len(report.results)), tolerance=1.0)
    with pytest.raises(av.error.InvalidDataError):
        av.open(str(cdn.root / "frag-no-mvex.mp4")).close()


@pytest.mark.parametrize("max_frames", [None, 5])
def test_a_box_after_the_mdat_past_the_head_is_read_before_planning(engine, cdn, small_clips,
                                                                    max_frames):
    """moov, mdat, then boxes whose headers the first request does not hold: the planner
    fetches them before it trusts the table; none is a fragment, so the job is planned."""
    data = small_clips["small"].read_bytes() + _free(300_000) + _free(64)
    (cdn.root / "small-trailing-boxes.mp4").write_bytes(data)
    report = engine.report(cdn.url("small-trailing-boxes.mp4"), max_frames=max_frames)
    assert report.ok, report.error
    assert report.plan == "planned"
    assert_matches(report, reference(small_clips["small"], max_frames))
