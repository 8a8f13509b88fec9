"""Frame selection end to end: real clips through the real nginx, every selected frame
against a plain sequential PyAV decode of the whole file."""
from __future__ import annotations

import fractions
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from engine import Engine, SelectionError
from engine.demo.clips import make_clip
from tests.reference import frame_stats


def _vfr_clip(path: Path) -> Path:
    """H.264 with B-frames and frame durations of 20, 40 and 100 ms."""
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25, options={"bf": "2", "g": "30"})
        s.width, s.height, s.pix_fmt = 160, 120, "yuv420p"
        s.codec_context.time_base = fractions.Fraction(1, 1000)
        t = 0
        for i in range(90):
            img = np.full((120, 160, 3), (i * 7) % 256, np.uint8)
            img[:, : (i * 3) % 160] = 255
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = t, fractions.Fraction(1, 1000)
            c.mux(s.encode(f))
            t += (20, 40, 100)[i % 3]
        c.mux(s.encode(None))
    return path


def _remux(src: Path, dst: Path, fmt: str, options: dict | None = None) -> Path:
    with av.open(str(src)) as inp, av.open(str(dst), "w", format=fmt, options=options or {}) as out:
        vin = inp.streams.video[0]
        vout = out.add_stream_from_template(vin)
        for packet in inp.demux(vin):
            if packet.dts is None:
                continue
            packet.stream = vout
            out.mux(packet)
    return dst


@pytest.fixture(scope="module")
def clips(cdn, tmp_path_factory) -> dict[str, Path]:
    """Many-GOP clips (a keyframe every 50 frames, B-frames), served by ``cdn``."""
    tmp = tmp_path_factory.mktemp("sel")
    gop = make_clip(tmp / "gop.mp4", frames=260, width=320, height=240)
    made = {
        "gop": gop,
        "gop-moov-end": make_clip(tmp / "gop-moov-end.mp4", frames=260, width=320, height=240,
                                  faststart=False),
        "fifty": make_clip(tmp / "fifty.mp4", frames=120, width=160, height=120, fps=50),
        "vfr": _vfr_clip(tmp / "vfr.mp4"),
        "mkv": _remux(gop, tmp / "gop.mkv", "matroska"),
        "frag": _remux(gop, tmp / "frag.mp4", "mp4", {"movflags": "frag_keyframe+empty_moov"}),
    }
    for name, path in made.items():
        (cdn.root / path.name).write_bytes(path.read_bytes())
    return made


@functools.lru_cache(maxsize=16)
def plain(path: Path) -> tuple[list[dict], list[float]]:
    """Every frame's stats and presentation time, decoding the whole file in order."""
    stats, times = [], []
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            stats.append(frame_stats(frame.to_ndarray(format="rgb24")))
            times.append(float(frame.time))
    return stats, [t - times[0] for t in times]


def expected(path: Path, every=None, fps=None, count=None, frames=None, start_s=None,
             end_s=None, max_frames=None) -> list[int]:
    """The contract's definitions, computed the plain way from the decoded times."""
    _, times = plain(path)
    lo = start_s if start_s is not None else -1.0
    hi = end_s if end_s is not None else 1e9
    inside = [i for i, t in enumerate(times) if lo <= t < hi]
    if every:
        out = inside[::every]
    elif count:
        out = sorted({inside[k] for k in np.linspace(0, len(inside) - 1, count).astype(int)})
    elif frames:
        out = [i for i in sorted(set(frames)) if i in inside]
    elif fps:
        end = times[-1] + (times[-1] - times[-2])
        out, k = [], 0
        while k / fps < min(end, hi):
            shown = max(i for i, t in enumerate(times) if t <= k / fps + 1e-9)
            if k / fps >= lo and times[shown] >= lo and shown not in out:
                out.append(shown)
            k += 1
    else:
        out = inside
    return out[:max_frames] if max_frames else out


def check(report, path: Path, **selection) -> None:
    want = expected(path, **selection)
    assert report.ok, report.error
    assert [r["frame_number"] for r in report.results] == want
    stats, _ = plain(path)
    for r in report.results:
        assert r["result"] == stats[r["frame_number"]], f"frame {r['frame_number']}"
    assert report.frames_selected == len(want)
    assert report.selection == {**dict.fromkeys(
        ("every", "fps", "count", "frames", "start_s", "end_s", "max_frames")),
        **{k: (sorted(set(v)) if k == "frames" else v) for k, v in selection.items()}}


SELECTIONS = [dict(every=7), dict(count=5), dict(frames=[0, 51, 52, 149, 259]),
              dict(fps=3.0), dict(start_s=4.1, end_s=7.0, every=3), dict(count=4, start_s=2.0),
              dict(every=10, max_frames=4)]


@pytest.mark.parametrize("name", ["gop", "gop-moov-end", "mkv", "frag"])
@pytest.mark.parametrize("selection", SELECTIONS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_selection_is_frame_exact(engine, cdn, clips, name, selection):
    path = clips[name]
    report = engine.process(cdn.url(path.name), **selection)
    check(report, path, **selection)
    assert report.plan == ("planned" if name.startswith("gop") else "streamed")


@pytest.mark.parametrize("selection", [dict(fps=25.0), dict(fps=10.0), dict(every=2)])
def test_fps_on_a_fifty_fps_clip(engine, cdn, clips, selection):
    report = engine.process(cdn.url("fifty.mp4"), **selection)
    check(report, clips["fifty"], **selection)


@pytest.mark.parametrize("selection", [dict(fps=4.0), dict(fps=30.0), dict(count=9),
                                       dict(start_s=1.0, end_s=2.5),
                                       dict(fps=4.0, start_s=1.03, end_s=3.0)])
def test_variable_frame_rate(engine, cdn, clips, selection):
    report = engine.process(cdn.url("vfr.mp4"), **selection)
    check(report, clips["vfr"], **selection)


def test_stream_delivers_selected_frames_in_order(engine, cdn, clips):
    numbers = []
    for batch in engine.stream(cdn.url("gop.mp4"), every=25):
        numbers += batch.frame_numbers
        assert batch.frames_total == len(expected(clips["gop"], every=25))
    assert numbers == expected(clips["gop"], every=25)


def test_sparse_fetch_takes_only_the_selected_gops(engine, cdn, sn44_clips):
    """count=3 of 15 GOPs: the bytes fetched are those of the 3 GOPs, the moov and the
    head (with the first GOP's early ranges), not the file."""
    path = sn44_clips["sn44"]
    with av.open(str(path)) as c:
        packets = [(p.pts, p.pos, p.size, p.is_keyframe) for p in c.demux(video=0) if p.size]
    gop_of, gop_bytes, g = [], [], -1
    for _, _, size, key in packets:
        if key:
            g += 1
            gop_bytes.append(0)
        gop_of.append(g)
        gop_bytes[g] += size
    rank = {pts: i for i, pts in enumerate(sorted(p[0] for p in packets))}
    chosen = expected(path, count=3)
    gops = {gop_of[d] for d, p in enumerate(packets) if rank[p[0]] in chosen}
    report = engine.process(cdn.url("sn44.mp4"), count=3)
    check(report, path, count=3)
    allowance = (1 << 20) + 2 * len(gops) * 65536 + 200_000   # head, early ranges, chunks, moov
    assert report.fetch["bytes"] <= sum(gop_bytes[g] for g in gops) + allowance
    assert report.fetch["bytes"] < 0.4 * path.stat().st_size


def test_bad_selection_is_refused_before_any_work(engine, cdn, clips):
    with pytest.raises(SelectionError, match="every must be > 0"):
        engine.process(cdn.url("gop.mp4"), every=0)
    with pytest.raises(TypeError, match="unknown job option"):
        engine.process(cdn.url("gop.mp4"), evry=3)


@pytest.mark.parametrize("name", ["gop", "mkv"])
def test_index_past_the_end_names_the_frame_count(engine, cdn, clips, name):
    report = engine.report(cdn.url(clips[name].name), frames=[3, 400])
    assert not report.ok and "it has 260 frames" in report.error
    assert "\n" not in report.error


def test_cli_selection(cdn, clips, tmp_path):
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "engine", "run", cdn.url("gop.mp4"), "--count",
                           "4", "--start", "1", "--json", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [r["frame_number"] for r in report["results"]] == \
        expected(clips["gop"], count=4, start_s=1.0)
    bad = subprocess.run([sys.executable, "-m", "engine", "run", cdn.url("gop.mp4"),
                          "--every", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: every must be > 0, not 0"


@functools.lru_cache(maxsize=4)
def plain_rgb(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.parametrize("name, selection", [("gop", dict(count=6)), ("gop-moov-end", dict(fps=2.0)),
                                             ("mkv", dict(every=40)), ("frag", dict(count=4))])
def test_frames_come_back_through_shared_memory(engine, cdn, clips, name, selection):
    path = clips[name]
    got = engine.frames(cdn.url(path.name), **selection)
    want = expected(path, **selection)
    assert got.frame_numbers == want and got.report.ok and got.report.video_result is None
    assert got.array.dtype == np.uint8 and got.array.shape == (len(want), 240, 320, 3)
    assert np.array_equal(got.array, plain_rgb(path)[want])
    assert _outputs(engine) == []    # the output block went once the frames were copied


def _outputs(engine) -> list[str]:
    """Output blocks of the engine's supervisor still in /dev/shm."""
    return [n for n in os.listdir("/dev/shm")
            if n.startswith(f"engine-{engine.pid}-") and n.endswith(".out")]


def test_frames_of_a_failed_job_raise_and_leave_nothing(engine, cdn, clips):
    with pytest.raises(SelectionError, match="it has 260 frames"):
        engine.frames(cdn.url("gop.mp4"), frames=[300])
    with pytest.raises(Exception, match="404"):
        engine.frames(cdn.url("missing.mp4"), count=2)
    assert _outputs(engine) == []


def test_serve_mode_takes_the_selection(cdn, clips, tmp_path):
    """``submit --every`` and ``Engine.connect(...).frames`` against ``run --socket``."""
    from tests.conftest import served
    with served(tmp_path, processor="engine.processors:stats") as s:
        out = tmp_path / "r.json"
        done = subprocess.run([sys.executable, "-m", "engine", "submit", cdn.url("gop.mp4"),
                               "--socket", s.path, "--every", "50", "--json", str(out),
                               "--quiet"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        report = json.loads(out.read_text())
        assert [r["frame_number"] for r in report["results"]] == [0, 50, 100, 150, 200, 250]
        assert report["selection"]["every"] == 50 and report["frames_selected"] == 6
        with s.client() as c:
            got = c.frames(cdn.url("gop-moov-end.mp4"), frames=[5, 130])
        assert got.frame_numbers == [5, 130]
        assert np.array_equal(got.array, plain_rgb(clips["gop-moov-end"])[[5, 130]])


def test_max_selected_on_both_ways(cdn, clips):
    with Engine(processor="engine.processors:null", device="cpu", max_selected=5) as eng:
        assert eng.report(cdn.url("gop.mp4"), count=5).ok
        for name in ("gop.mp4", "gop.mkv"):
            for selection in (dict(every=7), dict()):
                report = eng.report(cdn.url(name), **selection)
                assert not report.ok and report.error.endswith(
                    "over the limit of 5 (ENGINE_MAX_SELECTED)"), report.error
        assert eng.report(cdn.url("gop.mkv"), frames=[1, 200]).ok
        # frames back to the caller: the same refusal, not the output block's own limit
        with pytest.raises(SelectionError, match="ENGINE_MAX_SELECTED"):
            eng.frames(cdn.url("gop.mkv"), every=7)


def test_decord_backend_picks_by_index(cdn, clips):
    """decord reads the whole file and picks the selected indices: the same frames."""
    with Engine(processor="engine.processors:stats", device="cpu", decoder="decord") as eng:
        for selection in (dict(count=5), dict(frames=[3, 120, 259]), dict(fps=2.0)):
            report = eng.process(cdn.url("gop-moov-end.mp4"), **selection)
            assert report.decoder == "decord"
            check(report, clips["gop-moov-end"], **selection)


def _gop_prefixes(path: Path, chosen: list[int]) -> int:
    """Frames shown from each chosen frame's keyframe through it, per GOP: what a decoder
    that decodes every frame of the spans must at least decode."""
    with av.open(str(path)) as c:
        keys = [f.key_frame for f in c.decode(video=0)]
    last: dict[int, int] = {}
    for i in chosen:
        k = max(j for j in range(i + 1) if keys[j])
        last[k] = max(last.get(k, k), i)
    return sum(i - k + 1 for k, i in last.items())


@pytest.mark.parametrize("lanes", [1, 3])
def test_decode_lanes_and_skipped_frames_keep_the_selection_exact(cdn, clips, lanes):
    """Sparse spans decoded by one or several lanes give the same frames; unselected
    non-reference frames are skipped, so fewer frames are decoded than the GOP prefixes
    that hold the selected ones."""
    selections = [dict(count=9), dict(every=3), dict(frames=[2, 49, 50, 151, 259])]
    with Engine(processor="engine.processors:stats", device="cpu", decode_lanes=lanes) as eng:
        for selection in selections:
            report = eng.process(cdn.url("gop-moov-end.mp4"), **selection)
            check(report, clips["gop-moov-end"], **selection)
            chosen = expected(clips["gop-moov-end"], **selection)
            assert report.frames_decoded < _gop_prefixes(clips["gop-moov-end"], chosen)
            got = eng.frames(cdn.url("gop.mp4"), **selection)
            assert np.array_equal(got.array, plain_rgb(clips["gop"])[chosen])


def test_decode_lanes_on_a_cut_file_keep_what_is_there_and_name_the_rest(cdn, clips):
    """A file cut after its third GOP: the lanes deliver the selected frames before the
    cut, exactly, and the report names the others; nothing hangs."""
    data = clips["gop"].read_bytes()
    cut = len(data) * 3 // 5
    (cdn.root / "gop-cut.mp4").write_bytes(data[:cut])
    frames = [2, 60, 110, 200, 259]
    with Engine(processor="engine.processors:stats", device="cpu", decode_lanes=3) as eng:
        report = eng.report(cdn.url("gop-cut.mp4"), frames=frames)
    assert not report.ok and "truncated file" in report.error
    got = [r["frame_number"] for r in report.results]
    assert got and got == frames[:len(got)] and report.missing_frames == frames[len(got):]
    stats, _ = plain(clips["gop"])
    for r in report.results:
        assert r["result"] == stats[r["frame_number"]]
