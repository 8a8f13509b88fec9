"""engine.workers.frames and the decoder's rule for lanes: spans decoded by several
threads give what one decoder gives, in the same order; lanes only where spans lie apart."""
from __future__ import annotations

import threading

import av
import numpy as np
import pytest

from engine.demo.clips import make_clip
from engine.messages import DecodeJob
from engine.workers import decoder
from engine.workers.frames import Lanes, Numbers, frames_of

SPANS = [(0, 3), (50, 60), (100, 104), (150, 170), (200, 203), (250, 259)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("lanes") / "gops.mp4", frames=260, width=160,
                     height=120)


def _one_decoder(path, spans) -> list[tuple[int, np.ndarray]]:
    with av.open(str(path)) as c:
        return [(n, f.to_ndarray(format="rgb24"))
                for n, f in frames_of(c, c.streams.video[0], Numbers(), spans)]


@pytest.mark.parametrize("count", [2, 3, 6])
def test_lanes_give_one_decoder_s_frames_in_its_order(clip, count):
    want = _one_decoder(clip, SPANS)
    threads_at_start = threading.active_count()

    def open_stream(stop):
        c = av.open(str(clip))
        return c, c.streams.video[0]

    lanes = Lanes(open_stream, SPANS, None, count, lambda n, f: f.to_ndarray(format="rgb24"),
                  depth=2, tick=lambda: None)
    assert len(lanes.threads) == count
    try:
        got = list(lanes.merged(on_wait=lambda: None))
    finally:
        lanes.close()
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want))
    assert lanes.decoded == len(want)
    assert threading.active_count() == threads_at_start


def test_closing_the_lanes_early_stops_them(clip):
    def open_stream(stop):
        c = av.open(str(clip))
        return c, c.streams.video[0]

    lanes = Lanes(open_stream, SPANS, None, 3, lambda n, f: f.to_ndarray(format="rgb24"),
                  depth=1, tick=lambda: None)
    next(lanes.merged(on_wait=lambda: None))
    lanes.close()
    assert not any(t.is_alive() for t in lanes.threads)


@pytest.mark.parametrize("spans, expected, lanes, pays", [
    ([(0, 3), (100, 110)], 300, 2, True),          # apart: a small share of the frames
    ([(0, 120), (130, 290)], 300, 2, False),       # most of the video: one lane
    ([(0, 3)], 300, 2, False),                     # one span
    ([(0, 3), (100, 110)], 300, 1, False),         # ENGINE_DECODE_LANES=1
    ([(0, 3), (100, 110)], None, 2, False),        # streamed: no table
])
def test_lanes_are_used_only_where_spans_lie_apart(monkeypatch, spans, expected, lanes, pays):
    monkeypatch.setattr(decoder, "LANES", lanes)
    job = DecodeJob(job=1, segment="s", amap="a", size=1, backend="pyav", batch=4,
                    frame_limit=None, readable_end=1, regions=[], spans=spans,
                    expected=expected)
    assert decoder._lanes_pay(job) is pays
