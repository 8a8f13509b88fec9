"""Decoding while bytes arrive: both backends, frame numbering, bad videos."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest

from engine import DecodeError, Engine
from tests.reference import assert_matches, reference
from engine.demo.emulator import CdnEmulator, Profile


@pytest.fixture(scope="module")
def decord_engine(cdn):
    with Engine(processor="engine.processors:stats", device="cpu", decoder="decord",
                fetchers=1, decoders=1) as eng:
        yield eng


@pytest.mark.parametrize("name", ["small", "small-moov-end"])
def test_decord_gives_the_same_frames_as_pyav(decord_engine, cdn, small_clips, name):
    report = decord_engine.process(cdn.url(f"{name}.mp4"))
    assert report.decoder == "decord"
    assert_matches(report, reference(small_clips[name]), tolerance=1.0)


def test_decord_streams_a_big_moov_at_end_clip(decord_engine, cdn, sn44_clips):
    report = decord_engine.process(cdn.url("sn44-moov-end.mp4"))
    assert_matches(report, reference(sn44_clips["sn44-moov-end"]), tolerance=1.0)


def test_decord_partial_job(decord_engine, cdn, sn44_clips):
    report = decord_engine.process(cdn.url("sn44.mp4"), max_frames=20)
    assert report.frames_processed == 20
    assert_matches(report, reference(sn44_clips["sn44"], 20), tolerance=1.0)


@pytest.fixture(scope="module")
def rotated_clip(cdn, small_clips):
    """The small clip with 90-degree rotation metadata (the ffmpeg command line writes it)."""
    import shutil
    import subprocess
    if not shutil.which("ffmpeg"):
        pytest.skip("ffmpeg (the Debian package tools/setup.sh installs) is not here")
    path = cdn.root / "rotated.mp4"
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-i", str(small_clips["small"]),
                    "-c", "copy", "-metadata:s:v:0", "rotate=90", str(path)], check=True)
    with av.open(str(path)) as c:
        assert next(c.decode(video=0)).rotation in (90, -90, 270)
    return path


def test_rotation_metadata_decord_refuses_clearly_pyav_gives_the_coded_frames(
        decord_engine, engine, cdn, rotated_clip):
    """decord turns the frames by the rotation metadata; a plain decode (PyAV) does not.
    decord says it cannot take the input, and the default backend gives every frame."""
    with pytest.raises(DecodeError, match="decord cannot take this input.*ENGINE_DECODER=auto"):
        decord_engine.process(cdn.url("rotated.mp4"))
    report = engine.process(cdn.url("rotated.mp4"))
    assert report.decoder == "pyav"
    assert_matches(report, reference(rotated_clip))
    assert decord_engine.process(cdn.url("small.mp4")).frames_processed == 50


def test_first_frame_is_decoded_before_the_last_byte_arrives(cdn, sn44_clips):
    """Through an emulated CDN slower than the seed's (so that a loaded test machine
    still decodes faster than bytes arrive): the report's events are in streaming order."""
    slow = Profile("slow", rtt_s=0.08, new_conn_s=0.3, per_conn_bps=2.5e6, total_bps=8e6)
    with CdnEmulator("127.0.0.1", cdn.port, slow) as emu, \
            Engine(processor="engine.processors:null", device="cpu", decoder="pyav") as eng:
        eng.prewarm([emu.url("/")])
        for name in ("sn44", "sn44-moov-end"):
            t = eng.process(emu.url(f"/{name}.mp4")).timings_s
            assert t["moov_ready"] < t["first_frame"] < t["download_done"], (name, t)
            assert t["first_result"] < t["download_done"], (name, t)


def _serve(cdn, name: str, data: bytes) -> str:
    (cdn.root / name).write_bytes(data)
    return cdn.url(name)


def test_truncated_files_fail_cleanly(engine, cdn, small_clips):
    front = small_clips["small"].read_bytes()
    cut = len(front) * 2 // 3
    url = _serve(cdn, "trunc-front.mp4", front[:cut])
    with pytest.raises(DecodeError, match=f"truncated file: it ends at byte {cut}"):
        engine.process(url)
    # the frames before the cut are kept, the others named
    report = engine.report(url)
    assert not report.ok and report.frames_processed > 10 and report.missing_frames
    assert report.frames_processed + len(report.missing_frames) == 50
    end = small_clips["small-moov-end"].read_bytes()
    url = _serve(cdn, "trunc-end.mp4", end[: len(end) // 2])
    with pytest.raises(DecodeError, match="truncated file"):
        engine.process(url)


def test_corrupt_frames_in_the_middle_keep_every_decodable_frame_and_are_named(engine, cdn, small_clips):
    data = bytearray(small_clips["small"].read_bytes())
    mid = len(data) // 2
    data[mid:mid + 3000] = np.random.default_rng(1).integers(0, 256, 3000, np.uint8).tobytes()
    report = engine.report(_serve(cdn, "corrupt.mp4", bytes(data)))
    # never ok with frames missing: the report keeps every decodable frame and names the rest
    assert not report.ok and report.missing_frames
    assert f"{len(report.missing_frames)} of 50 frames could not be decoded" in report.error
    numbers = [r["frame_number"] for r in report.results]
    assert not set(numbers) & set(report.missing_frames)
    assert numbers == sorted(set(numbers))
    assert len(numbers) + len(report.missing_frames) == 50
    assert len(numbers) >= 40
    assert engine.process(cdn.url("small.mp4")).frames_processed == 50


def _audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=44100)
        t = np.linspace(0, 1, 44100, dtype=np.float32)
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 44100
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def test_no_video_track(engine, cdn):
    with pytest.raises(DecodeError, match="no video track"):
        engine.process(_serve(cdn, "audio-only.mp4", _audio_only_mp4()))


def test_unsupported_codec(engine, cdn, small_clips):
    data = small_clips["small"].read_bytes().replace(b"avc1", b"zzz9")
    with pytest.raises(DecodeError, match="cannot decode|no frame"):
        engine.process(_serve(cdn, "weird-codec.mp4", data))
    assert engine.process(cdn.url("small.mp4")).frames_processed == 50


def test_random_bytes_are_not_a_video(engine, cdn):
    data = np.random.default_rng(2).integers(0, 256, 200_000, np.uint8).tobytes()
    with pytest.raises(DecodeError, match="not a video FFmpeg can read"):
        engine.process(_serve(cdn, "noise.mp4", data))


def test_stream_yields_the_first_batch_before_the_last_byte(cdn, sn44_clips):
    """The first result batch reaches the caller while the download is still running."""
    import time
    slow = Profile("slow", rtt_s=0.08, new_conn_s=0.3, per_conn_bps=2.5e6, total_bps=8e6)
    with CdnEmulator("127.0.0.1", cdn.port, slow) as emu, \
            Engine(processor="engine.processors:null", device="cpu", decoder="pyav") as eng:
        eng.prewarm([emu.url("/")])
        start = time.monotonic()
        first_batch_at = None
        frames = 0
        for batch in eng.stream(emu.url("/sn44.mp4")):
            if first_batch_at is None:
                first_batch_at = time.monotonic() - start
            frames += len(batch.frame_numbers)
        report = eng.last_report
        assert frames == 750
        # Both clocks start at submission (the engine's a little later than ours).
        assert first_batch_at < report.timings_s["download_done"], (first_batch_at, report.timings_s)
