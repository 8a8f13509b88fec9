"""Measurements into medians [min-max] and the tables that print them."""
from __future__ import annotations

import statistics

# the parts of the model's idle time that the wait processor's timeline tells apart
WAIT_PARTS = ("to_first_call", "ramp_gaps", "gaps", "after_last", "overrun")


def _spread(values) -> dict | None:
    vals = [v for v in values if v is not None]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)} if vals else None


def summarize(runs: list[dict], rows: list[str], stages, meds, ratios: dict) -> dict:
    """Per row: runs ok/failed (and why skipped), median/min/max of each stage in ``stages``
    (and of model idle), medians of ``meds``, and ``ratios`` ({key: stage}) of its median
    over engine-warm's."""
    out = {}
    for c in rows:
        mine = [r for r in runs if r["contender"] == c]
        rs = [r for r in mine if r.get("ok")]
        s = {"runs_ok": len(rs), "runs_failed": sum(1 for r in mine
                                                   if not r.get("ok") and not r.get("skipped"))}
        skipped = next((r["error"] for r in mine if r.get("skipped")), None)
        if skipped:
            s["skipped"] = skipped
        spreads = {k: _spread((r.get("t") or {}).get(k) for r in rs) for k in stages}
        spreads["model_idle"] = _spread(r.get("model_idle_s") for r in rs)
        s.update((k, v) for k, v in spreads.items() if v)
        waits = [r["model_waits"] for r in rs if r.get("model_waits")]
        if waits:
            s["model_waits"] = {k: statistics.median(w[k] for w in waits) for k in WAIT_PARTS}
        s.update((k, v["median"]) for k in meds if (v := _spread(r.get(k) for r in rs)))
        out[c] = s
    ref = out.get("engine-warm", {})
    for s in out.values():
        for key, stage in ratios.items():
            if stage in s and stage in ref and ref[stage]["median"]:
                s[key] = s[stage]["median"] / ref[stage]["median"]
    return out


def num(v, f="{:.2f}") -> str:
    return "-" if v is None else f.format(v)


def fmt_stage(s: dict, key: str) -> str:
    v = s.get(key)
    if not v:
        return "-"
    if v["min"] == v["max"]:
        return f"{v['median']:.3f}"
    return f"{v['median']:.3f} [{v['min']:.2f}-{v['max']:.2f}]"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    def line(cells):
        return "  ".join((str(c).ljust(w) if i == 0 else str(c).rjust(w))
                         for i, (c, w) in enumerate(zip(cells, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def rate(bps) -> str:
    return "unlimited" if not bps else f"{bps / 1e6:g} MB/s"
