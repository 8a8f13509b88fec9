"""Legal answers to a range request that nginx never gives, each through the tests' own
server (``tests.faulty_server``): the engine uses every one of them, frame-exact against
a plain PyAV decode, or says in one line why it cannot.

One engine for the module, with small heads and ranges so that a clip of half a megabyte
takes many ranges, one fetcher and two connections (at most two requests in flight).
"""
from __future__ import annotations

import pytest

from engine import Engine
from engine.demo.clips import make_clip
from tests.reference import assert_matches, reference

SLOTS = 2      # fetchers x connections


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    """About 0.5 MB each (many 64 KiB ranges): moov in front, and moov at the end."""
    tmp = tmp_path_factory.mktemp("answers")
    return {layout: make_clip(tmp / f"{layout}.mp4", frames=120, width=640, height=360,
                              faststart=layout == "front")
            for layout in ("front", "end")}


@pytest.fixture(scope="module")
def eng(cdn):
    with Engine(processor="engine.processors:stats", device="cpu", fetchers=1, connections=2,
                decoders=1, head_kb=64, range_mb=0.0625, job_timeout_s=60.0) as eng:
        yield eng


def _asked(server, path: str) -> list[str]:
    """The Range header of each request for ``path``."""
    return [rng for target, rng in server.asked if target.split("?")[0] == f"/{path}"]


@pytest.mark.parametrize("layout", ["front", "end"])
def test_a_200_to_a_later_range_brings_the_rest_of_the_job(eng, faulty_server, clips, layout):
    """The head's range is answered 206, every later one 200 with the whole file (a CDN
    edge forwarding a cache miss to an origin without Range): that body brings every byte
    the job lacks, and the job asks no more ranges. The next job asks for ranges again."""
    data = clips[layout].read_bytes()
    server = faulty_server(data, "whole-later")
    report = eng.report(server.url("a.mp4"))
    assert report.ok, report.error
    assert report.plan == "planned" and report.video["bytes"] == len(data)
    assert_matches(report, reference(clips[layout]))
    # the head, and at most what was in flight when the first 200 came
    assert len(_asked(server, "a.mp4")) <= SLOTS + 1, _asked(server, "a.mp4")
    again = eng.report(server.url("b.mp4"))
    assert again.ok, again.error
    assert any(not rng.startswith("bytes=0-") for rng in _asked(server, "b.mp4"))


def test_a_200_to_a_later_range_serves_a_partial_job(eng, faulty_server, clips):
    server = faulty_server(clips["end"].read_bytes(), "whole-later")
    report = eng.report(server.url("a.mp4"), max_frames=10)
    assert report.ok, report.error
    assert_matches(report, reference(clips["end"], 10))


@pytest.mark.parametrize("mode, layout", [("star", "front"), ("star", "end"),
                                          ("star-head", "front")])
def test_a_total_given_as_star_is_learned_at_the_body_s_end(eng, faulty_server, clips, mode,
                                                            layout):
    """``Content-Range: bytes 0-b/*``: the rest is asked for to its end, and the size is
    where the bytes end (or the total a later answer gives)."""
    data = clips[layout].read_bytes()
    report = eng.report(faulty_server(data, mode).url("clip.mp4"))
    assert report.ok, report.error
    assert report.video["bytes"] == len(data)
    assert_matches(report, reference(clips[layout]))


@pytest.mark.parametrize("layout", ["front", "end"])
def test_a_shorter_range_than_asked_has_its_rest_asked_again(eng, faulty_server, clips, layout):
    data = clips[layout].read_bytes()
    server = faulty_server(data, "short-range")
    report = eng.report(server.url("clip.mp4"))
    assert report.ok, report.error
    assert report.plan == "planned" and report.fetch["retries"] == 0
    assert_matches(report, reference(clips[layout]))
    assert server.requests > report.fetch["ranges"]     # each range took several answers


@pytest.mark.parametrize("layout", ["front", "end"])
def test_a_whole_body_encoded_though_none_was_asked_is_decoded(eng, faulty_server, clips,
                                                               layout):
    data = clips[layout].read_bytes()
    report = eng.report(faulty_server(data, "gzip").url("clip.mp4"))
    assert report.ok, report.error
    assert report.video["bytes"] == len(data)
    assert_matches(report, reference(clips[layout]))


def test_an_encoded_range_is_one_clear_line(eng, faulty_server, clips):
    report = eng.report(faulty_server(clips["front"].read_bytes(), "gzip-range").url("clip.mp4"))
    assert not report.ok and report.error_kind == "FetchError"
    assert "Content-Encoding" in report.error and "gzip" in report.error
    assert "\n" not in report.error


@pytest.mark.parametrize("mode, layout", [
    ("whole-later", "front"), ("whole-later", "end"), ("star", "front"), ("star", "end"),
    ("short-range", "front"), ("short-range", "end"), ("gzip", "end"), ("drop-once", "front"),
    ("chunked", "front")])
def test_a_sparse_selection_takes_every_answer(eng, faulty_server, clips, mode, layout):
    """A selection over the clip's three GOPs (only their spans fetched where the job is
    planned) through each answer: the selected frames are the plain decode's."""
    data = clips[layout].read_bytes()
    chosen = [5, 60, 61, 110, 119]
    report = eng.report(faulty_server(data, mode).url("sparse.mp4"), frames=chosen)
    assert report.ok, report.error
    assert [r["frame_number"] for r in report.results] == chosen
    ref = reference(clips[layout])
    assert all(r["result"] == ref[r["frame_number"]] for r in report.results)
