"""``python -m engine bench --model-bound``: a GPU model's stand-in in every contender's
place of the processor (``engine.processors:wait``: ``ENGINE_WAIT_MS_PER_FRAME`` ms a
frame, asleep), with model time (frames x that) and model idle (total - model time); the
warm engine's idle is split by the processor's own timeline (before its first call,
between growing batches, between full batches, after its last call, sleeps overrun).
Its default contenders are ``engine-warm`` and the peers a user would pick instead:
``ffmpeg-cli`` (the ``ffmpeg`` command line reading the URL, ``-hwaccel cuda`` on a GPU,
raw RGB frames piped to the processor in batches) and ``decord-file`` (one GET to a temp
file, then decord's ``get_batch``).
"""
from __future__ import annotations

import os

from engine.tools.bench.tables import WAIT_PARTS, fmt_stage, table

MODEL_CONTENDERS = ("engine-warm", "ffmpeg-cli", "decord-file")
WAIT_PROCESSOR = "engine.processors:wait"


def wait_s_per_frame() -> float:
    return float(os.environ.get("ENGINE_WAIT_MS_PER_FRAME", "4")) / 1000.0


def model_time(res: dict) -> None:
    """The wait processor holds exactly this per frame: model time = frames x that;
    model idle = total - model time (the first frame's wait included)."""
    t = res.get("t") or {}
    if res.get("ok") and res.get("frames") and t.get("total") is not None:
        res["model_s"] = round(res["frames"] * wait_s_per_frame(), 4)
        res["model_idle_s"] = round(t["total"] - res["model_s"], 4)
        if res.get("model_waits"):
            waits = res["model_waits"]
            waits["overrun"] = round(waits["held_s"] - res["model_s"], 4)


def render_model(summary: dict, contenders: list[str]) -> str:
    rows, parts = [], []
    for c in contenders:
        s = summary[c]
        if s.get("model_s") is None:
            continue
        rows.append([c, fmt_stage(s, "total"), f"{s['model_s']:.3f}",
                     fmt_stage(s, "model_idle"), fmt_stage(s, "first_result"),
                     f"{s.get('frames', 0):.0f}"])
        if s.get("model_waits"):
            parts.append([c] + [f"{s['model_waits'][k]:.3f}" for k in WAIT_PARTS])
    waits = ""
    if parts:
        waits = ("\n\nwhere the model waited (medians, s; from the processor's own timeline): "
                 "before its first call, between batches while they still grew, between "
                 "full batches, after its last call, sleeps overrun\n"
                 + table(parts, ["contender", "to 1st call", "ramp gaps", "gaps",
                                 "after last", "overrun"]))
    return (f"model-bound: {WAIT_PROCESSOR}, {wait_s_per_frame() * 1000:g} ms a frame asleep; "
            "model idle = total - model time\n"
            + table(rows, ["contender", "total s", "model s", "model idle s", "first result s",
                           "frames"]) + waits)
