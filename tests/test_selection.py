"""engine.selection: the selection vocabulary, decided without I/O."""
from __future__ import annotations

import numpy as np
import pytest

from engine.errors import SelectionError
from engine.selection import Picker, Selection, byte_regions, gop_spans, pick

T50 = np.arange(100) / 50.0          # 2 s at 50 fps


def picked(times=T50, **kw) -> list[int]:
    return pick(Selection.of(**kw), times).tolist()


def streamed(times=T50, **kw) -> list[int]:
    p, out = Picker(Selection.of(**kw)), []
    for i, t in enumerate(times):
        out += p.offer(i, float(t))
    return out + p.finish()


@pytest.mark.parametrize("kw, want", [
    (dict(), list(range(100))),
    (dict(every=5), list(range(0, 100, 5))),
    (dict(fps=25), list(range(0, 100, 2))),
    (dict(fps=1), [0, 50]),
    (dict(count=4), [0, 33, 66, 99]),
    (dict(frames=[7, 3, 3]), [3, 7]),
    (dict(frames="1,2"), [1, 2]),
    (dict(start_s=0.5, end_s=0.6), [25, 26, 27, 28, 29]),
    (dict(start_s=1.9), list(range(95, 100))),
    (dict(every=2, start_s=0.5, end_s=0.6), [25, 27, 29]),
    (dict(every=5, max_frames=3), [0, 5, 10]),
    (dict(count=3, start_s=1.0), [50, 74, 99]),
])
def test_pick(kw, want):
    assert picked(**kw) == want


def test_count_follows_numpy_linspace_and_drops_duplicates():
    assert picked(count=7) == np.linspace(0, 99, 7).astype(int).tolist()
    assert picked(np.arange(5) / 25.0, count=12) == [0, 1, 2, 3, 4]


def test_fps_uses_timestamps_so_variable_frame_rate_works():
    # frames at 0, 0.1, 0.5, 0.55, 1.2 s: at 2 fps the times 0, 0.5, 1.0, 1.5 show 0, 2, 3, 4
    times = np.array([0.0, 0.1, 0.5, 0.55, 1.2])
    assert picked(times, fps=2) == [0, 2, 3, 4]
    assert streamed(times, fps=2) == [0, 2, 3, 4]


def test_fps_in_a_window_takes_only_frames_shown_from_its_start():
    # the frame on screen at 1/3 s came at 0.32 s, before the window opens at 0.33 s
    assert 16 not in picked(fps=3, start_s=0.33)
    assert picked(fps=3, start_s=0.33) == streamed(fps=3, start_s=0.33) == [33, 50, 66, 83]


@pytest.mark.parametrize("kw", [dict(every=3), dict(fps=25), dict(fps=7.5), dict(frames=[0, 99]),
                                dict(start_s=0.3, end_s=1.1, every=4), dict(fps=10, max_frames=4),
                                dict(start_s=0.31, fps=3), dict(start_s=0.33, end_s=1.5, fps=4)])
def test_streamed_picker_agrees_with_pick(kw):
    assert streamed(**kw) == picked(**kw)


@pytest.mark.parametrize("kw, words", [
    (dict(every=0), "every must be > 0"),
    (dict(count=-2), "count must be > 0"),
    (dict(fps=0), "fps must be > 0"),
    (dict(fps="fast"), "fps must be a number"),
    (dict(every=2.5), "every must be a whole number"),
    (dict(count=3, frames=[1]), "choose one of"),
    (dict(frames=[]), "frames is empty"),
    (dict(frames=[-1]), "negative"),
    (dict(start_s=2, end_s=1), "must be after"),
    (dict(start_s=-1), "start_s must be >= 0"),
])
def test_malformed_selection_is_one_line(kw, words):
    with pytest.raises(SelectionError, match=words) as err:
        Selection.of(**kw)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_unknown_option_and_index_past_the_end():
    with pytest.raises(TypeError, match="unknown job option 'evry'"):
        Selection.of(evry=2)
    with pytest.raises(SelectionError, match="it has 100 frames"):
        picked(frames=[100])


def test_gop_spans_with_b_frames():
    # decode order I0 P4 B2 B1 B3 | I5 P7 B6: pts (presentation index) per decode index
    pts = np.array([0, 4, 2, 1, 3, 5, 7, 6])
    keys = np.array([1, 0, 0, 0, 0, 1, 0, 0], dtype=bool)
    order = np.argsort(pts, kind="stable")
    # frame 1 (decode 3) needs decode 0..3; frame 4 (decode 1) needs all frames shown before it
    assert gop_spans(keys, order, pts, np.array([1])) == [(0, 3)]
    assert gop_spans(keys, order, pts, np.array([4])) == [(0, 4)]
    assert gop_spans(keys, order, pts, np.array([6])) == [(5, 7)]
    # spans that touch merge: the decoder goes on without a drain
    assert gop_spans(keys, order, pts, np.array([4, 5])) == [(0, 5)]
    assert gop_spans(keys, order, pts, np.array([0, 6])) == [(0, 0), (5, 7)]


def test_gop_spans_start_before_a_leading_picture():
    # open GOP: B at decode 3 is shown before the keyframe at decode 2
    pts = np.array([0, 2, 4, 3, 5])
    keys = np.array([1, 0, 1, 0, 0], dtype=bool)
    order = np.argsort(pts, kind="stable")
    assert gop_spans(keys, order, pts, np.array([2])) == [(0, 3)]


def test_byte_regions_merge_small_gaps_only():
    offsets = np.array([0, 100, 200, 10_000_000, 10_000_100])
    sizes = np.array([100, 100, 100, 100, 100])
    assert byte_regions(offsets, sizes, [(0, 0), (2, 2)]) == [(0, 300)]
    assert byte_regions(offsets, sizes, [(0, 1), (3, 4)]) == [(0, 200), (10_000_000, 10_000_200)]
