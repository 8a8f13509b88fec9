"""Which frames a job wants: the contract's selection vocabulary, decided without I/O.

A ``Selection`` is what the caller asked (``every``, ``fps``, ``count``, ``frames``, a
``start_s``/``end_s`` window, ``max_frames``); ``pick`` turns it into presentation
indices once the frames' times are known (from the sample table, or from a first pass
over a streamed file); ``Picker`` decides frame by frame as a streamed decode goes, for
the kinds that need no frame count. ``gop_spans`` says which samples a decoder must see
to output the picked frames of a planned MP4, and ``byte_regions`` which bytes hold them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from engine.errors import SelectionError

# A span whose bytes lie closer than this to the previous one is fetched with it: the gap
# costs less than the round trip of another request on a long-haul link.
MERGE_GAP = 256 * 1024
_EPS = 1e-9


@dataclass(frozen=True)
class Selection:
    every: int | None = None
    fps: float | None = None
    count: int | None = None
    frames: tuple[int, ...] | None = None
    start_s: float | None = None
    end_s: float | None = None
    max_frames: int | None = None

    @classmethod
    def of(cls, **options) -> "Selection":
        """The selection from keyword options; a malformed one is a one-line error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown job option {unknown[0]!r} (known: processor, "
                            f"{', '.join(sorted(known))})")
        opts = {k: v for k, v in options.items() if v is not None}
        for key in ("every", "count", "max_frames"):
            if key in opts:
                opts[key] = _positive_int(key, opts[key])
        for key in ("fps", "start_s", "end_s"):
            if key in opts:
                opts[key] = _number(key, opts[key])
        if "fps" in opts and opts["fps"] <= 0:
            raise SelectionError(f"fps must be > 0, not {opts['fps']:g}")
        if opts.get("start_s", 0) < 0:
            raise SelectionError(f"start_s must be >= 0, not {opts['start_s']:g}")
        if "end_s" in opts and opts["end_s"] <= opts.get("start_s", 0):
            raise SelectionError(f"end_s ({opts['end_s']:g}) must be after start_s "
                                 f"({opts.get('start_s', 0):g})")
        if "frames" in opts:
            opts["frames"] = _indices(opts["frames"])
        kinds = [k for k in ("every", "fps", "count", "frames") if k in opts]
        if len(kinds) > 1:
            raise SelectionError(f"choose one of every, fps, count and frames, not "
                                 f"{' and '.join(kinds)}")
        return cls(**opts)

    @property
    def everything(self) -> bool:
        """Every frame (``max_frames`` alone keeps today's first-N prefix)."""
        return not any((self.every, self.fps, self.count, self.frames is not None,
                        self.start_s, self.end_s))

    @property
    def takes_first(self) -> bool:
        """The first frame is surely selected (its bytes are worth asking for early)."""
        if self.start_s:
            return False
        return self.frames is None or self.frames[0] == 0

    @property
    def needs_count(self) -> bool:
        """Deciding needs the video's frame count (or the whole list of times)."""
        return self.count is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["frames"] is not None:
            d["frames"] = list(d["frames"])
        return d


NAMES = tuple(f.name for f in fields(Selection))


def options_of(obj) -> dict:
    """The selection options an object carries as attributes (a ``Submit``, CLI args)."""
    return {name: getattr(obj, name, None) for name in NAMES}


def _positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise SelectionError(f"{key} must be a whole number, not {value!r}") from None
        if not as_float.is_integer():
            raise SelectionError(f"{key} must be a whole number, not {value!r}")
        value = int(as_float)
    if value <= 0:
        raise SelectionError(f"{key} must be > 0, not {value}")
    return int(value)


def _number(key: str, value) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SelectionError(f"{key} must be a number, not {value!r}") from None
    if not math.isfinite(out):
        raise SelectionError(f"{key} must be a finite number, not {value!r}")
    return out


def _indices(values) -> tuple[int, ...]:
    if isinstance(values, str):
        values = [v for v in values.replace(" ", "").split(",") if v]
    try:
        out = [int(v) for v in values]
        if any(float(v) != int(v) for v in values):
            raise ValueError
    except (TypeError, ValueError):
        raise SelectionError(f"frames must be whole numbers, not {values!r}") from None
    if not out:
        raise SelectionError("frames is empty: name at least one frame index")
    if min(out) < 0:
        raise SelectionError(f"frame index {min(out)} is negative")
    return tuple(sorted(set(out)))


def end_time(times: np.ndarray) -> float:
    """When the last frame stops being shown: as long after it as it came after the one
    before (what a streamed decode also knows when the last frame arrives)."""
    if len(times) == 0:
        return 0.0
    step = float(times[-1] - times[-2]) if len(times) > 1 else 0.0
    return float(times[-1]) + (step if step > 0 else 1.0)


def pick(sel: Selection, times: np.ndarray) -> np.ndarray:
    """Presentation indices ``sel`` selects, ascending, from every frame's presentation
    time in seconds (in presentation order, the first frame at 0)."""
    times = np.asarray(times, dtype=np.float64)
    n = len(times)
    if sel.frames is not None and sel.frames[-1] >= n:
        raise SelectionError(f"frame index {sel.frames[-1]} is past the video's last frame "
                             f"(it has {n} frames)")
    start = sel.start_s if sel.start_s is not None else -math.inf
    end = sel.end_s if sel.end_s is not None else math.inf
    inside = np.flatnonzero((times >= start - _EPS) & (times < end - _EPS))
    if sel.frames is not None:
        chosen = np.intersect1d(np.array(sel.frames, dtype=np.int64), inside)
    elif sel.every is not None:
        chosen = inside[::sel.every]
    elif sel.count is not None:
        chosen = inside[np.unique(np.linspace(0, len(inside) - 1, sel.count).astype(int))] \
            if len(inside) else inside
    elif sel.fps is not None:   # the streamed Picker's rule, over every frame at once
        nexts = np.append(times[1:], end_time(times))
        chosen = inside[fps_hit(sel.fps, times[inside], nexts[inside], start, end)]
    else:
        chosen = inside
    chosen = np.asarray(chosen, dtype=np.int64)
    return chosen[:sel.max_frames] if sel.max_frames is not None else chosen


def fps_hit(fps: float, t, t_next, start: float, end: float):
    """The frame is inside the window (start <= t < end) and a time k/fps falls while it
    is shown ([t, t_next)) inside the window; ``t`` and ``t_next`` may be arrays."""
    lo, hi = np.maximum(t, start), np.minimum(t_next, end)
    inside = (t >= start - _EPS) & (t < end - _EPS)
    return inside & (np.ceil(lo * fps - 1e-6) / fps < hi - _EPS)


class Picker:
    """Frame-by-frame decisions for a streamed decode (frames in presentation order).

    ``offer(number, t)`` returns the numbers now known to be selected: ``fps`` decides a
    frame when the next one shows (when it stops being displayed), so it lags by one.
    ``finish()`` decides the last one. Not for ``count``: that needs the frame count.
    """

    def __init__(self, sel: Selection):
        assert not sel.needs_count
        self.sel = sel
        self.start = sel.start_s if sel.start_s is not None else -math.inf
        self.end = sel.end_s if sel.end_s is not None else math.inf
        self.inside = 0                 # frames seen inside the window
        self.chosen = 0
        self.held: tuple[int, float] | None = None   # fps: the frame on screen
        self.step = 0.0

    @property
    def done(self) -> bool:
        sel = self.sel
        return (sel.max_frames is not None and self.chosen >= sel.max_frames) or \
            (sel.frames is not None and self.chosen >= len(sel.frames) and self.held is None)

    def _take(self, number: int) -> list[int]:
        if self.sel.max_frames is not None and self.chosen >= self.sel.max_frames:
            return []
        self.chosen += 1
        return [number]

    def offer(self, number: int, t: float) -> list[int]:
        sel = self.sel
        if sel.fps is not None:
            out = []
            if self.held is not None:
                held, held_t = self.held
                self.step = t - held_t if t > held_t else self.step
                if fps_hit(sel.fps, held_t, t, self.start, self.end):
                    out = self._take(held)
            self.held = (number, t)
            return out
        if not (self.start - _EPS <= t < self.end - _EPS):
            return []
        self.inside += 1
        if sel.frames is not None and number not in sel.frames:
            return []
        if sel.every is not None and (self.inside - 1) % sel.every:
            return []
        return self._take(number)

    def finish(self) -> list[int]:
        if self.sel.fps is None or self.held is None:
            return []
        held, held_t = self.held
        self.held = None
        step = self.step if self.step > 0 else 1.0
        return self._take(held) if fps_hit(self.sel.fps, held_t, held_t + step,
                                           self.start, self.end) else []


def gop_spans(keyframes: np.ndarray, order: np.ndarray, pts: np.ndarray,
              chosen: np.ndarray) -> list[tuple[int, int]]:
    """Decode-index spans ``[first, last]`` a decoder must see, each starting on a
    keyframe, to output the ``chosen`` presentation indices (then drain).

    A chosen frame needs its GOP from the keyframe on; and since a frame's number is its
    rank among the timestamps seen, the span runs through every frame of the GOP shown
    before it (B-frames decoded after it). A frame shown before its GOP's keyframe (an
    open GOP's leading picture) starts from the keyframe before.
    """
    if len(chosen) == 0:
        return []
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    keys = np.flatnonzero(keyframes)
    if len(keys) == 0 or keys[0] != 0:
        keys = np.concatenate([[0], keys])
    spans: dict[int, int] = {}
    for i in chosen:
        d = int(order[i])
        at = int(np.searchsorted(keys, d, side="right")) - 1
        while at > 0 and pts[keys[at]] > pts[d]:
            at -= 1
        k = int(keys[at])
        last = int(order[min(rank[k], i):i + 1].max())
        spans[k] = max(spans.get(k, -1), last, d)
    merged: list[list[int]] = []
    for k, last in sorted(spans.items()):
        if merged and k <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([k, last])
    return [(a, b) for a, b in merged]


def byte_regions(offsets: np.ndarray, sizes: np.ndarray,
                 spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The file regions holding the spans' samples, merged across small gaps."""
    out: list[list[int]] = []
    for a, b in spans:
        lo = int(offsets[a:b + 1].min())
        hi = int((offsets[a:b + 1] + sizes[a:b + 1]).max())
        if out and lo <= out[-1][1] + MERGE_GAP:
            out[-1][1] = max(out[-1][1], hi)
            out[-1][0] = min(out[-1][0], lo)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]
