"""``python -m engine bench --fetch``: the transfer alone (time until every byte of the clip
is local, no decoding in the measure): ``engine-warm`` (prewarmed,
``engine.processors:null``, the report's ``download_done``), ``engine-cold`` (a fresh
engine's first job; start-up apart), ``httpx-get`` (one streamed GET to a temp file on a
new connection), ``aria2`` (``aria2c -x16 -s16 -k1M``, subprocess wall clock) and
``link`` (the floor: RTT + size / total_bps), with the issue's three goal checks.
"""
from __future__ import annotations

from engine.tools.bench.context import Context, options_parser, parse_options
from engine.tools.bench.contenders import Aria2, EngineWarm, Link, Worker
from engine.tools.bench.runner import Runner
from engine.tools.bench.tables import fmt_stage, num, rate, summarize, table

FETCH_CONTENDERS = ("engine-warm", "engine-cold", "httpx-get", "aria2", "link")
NULL_PROCESSOR = "engine.processors:null"


def parse_fetch_args(argv):
    ap = options_parser("python -m engine bench --fetch",
                        "Fetch only: the time until every byte of the clip is local, for the "
                        "engine (warm and cold), one httpx GET, aria2c and the link's floor.",
                        runs=5, timeout=60.0, budget=180.0)
    ap.add_argument("--contenders", help=f"comma-separated subset of {','.join(FETCH_CONTENDERS)}")
    a = parse_options(ap, argv, FETCH_CONTENDERS, FETCH_CONTENDERS)
    a.processor = NULL_PROCESSOR
    return a


def fetch_checks(summary: dict, prof, size: int) -> list[dict]:
    """The issue's goals, on the medians."""
    warm = summary.get("engine-warm", {})
    dl = warm.get("download_done", {}).get("median")
    fb = warm.get("first_byte", {}).get("median")
    return (_capacity_checks(dl, fb, prof, size) + _aria2_checks(summary, dl)
            + [_first_byte_check(fb, prof.rtt_s)])


def _capacity_checks(dl, fb, prof, size: int) -> list[dict]:
    """Throughput is defined two ways: end to end = size / download_done (submit to last
    byte local), and after one RTT = size / (download_done - RTT) (the request's
    unavoidable round trip taken out: what the transfer itself reached). Informational:
    size / (download_done - first_byte), the rate once the first byte is in (the engine's
    first byte is its head request's)."""
    goal, cap = "warm engine >= 0.9 x aggregate capacity", prof.total_bps
    if not (dl and cap):
        return [{"goal": goal, "how": "-", "pass": None,
                 "text": "n/a (" + ("the link is unlimited" if not cap else "no engine-warm run")
                         + ")"}]
    checks, target = [], 0.9 * cap
    for label, denom, gating in (("end to end: size / download_done", dl, True),
                                 ("after one RTT: size / (download_done - RTT)", dl - prof.rtt_s,
                                  True),
                                 ("after first byte: size / (download_done - first_byte)",
                                  dl - fb if fb is not None else None, False)):
        if not denom or denom <= 0:
            continue
        rate = size / denom
        checks.append({"goal": goal, "how": label, "value": rate, "target": target,
                       "ratio": rate / cap, "pass": rate >= target if gating else None,
                       "text": f"{rate / 1e6:.1f} MB/s = {rate / cap:.2f} x capacity "
                               f"(goal >= {target / 1e6:.1f} MB/s)"})
    return checks


def _aria2_checks(summary: dict, dl) -> list[dict]:
    goal = "no slower than aria2"
    ar = summary.get("aria2", {}).get("download_done", {}).get("median")
    if not (dl and ar):
        why = summary.get("aria2", {}).get("skipped") or "no successful aria2/engine-warm run"
        return [{"goal": goal, "how": "-", "pass": None, "text": f"n/a ({why})"}]
    checks = [{"goal": goal, "how": "engine-warm download_done vs aria2 wall",
               "value": dl, "target": ar, "ratio": dl / ar, "pass": dl <= ar,
               "text": f"{dl:.3f} s vs {ar:.3f} s = {dl / ar:.2f} x aria2's time"}]
    cold = summary.get("engine-cold", {}).get("download_done", {}).get("median")
    if cold:
        checks.append({"goal": goal, "pass": None,
                       "how": "engine-cold (start-up excluded) vs aria2 wall, both on new "
                              "connections",
                       "value": cold, "target": ar, "ratio": cold / ar,
                       "text": f"{cold:.3f} s vs {ar:.3f} s = {cold / ar:.2f} x aria2's time"})
    return checks


def _first_byte_check(fb, rtt: float) -> dict:
    goal = "warm time-to-first-byte within 1.2 x one RTT"
    if fb is None or rtt <= 0:
        return {"goal": goal, "how": "-", "pass": None,
                "text": "n/a (" + ("RTT is 0 on this profile" if fb is not None
                                   else "no engine-warm run") + ")"}
    return {"goal": goal, "how": "engine-warm first_byte / RTT", "value": fb,
            "target": 1.2 * rtt, "ratio": fb / rtt, "pass": fb <= 1.2 * rtt,
            "text": f"{fb * 1000:.0f} ms = {fb / rtt:.2f} x RTT ({rtt * 1000:.0f} ms; "
                    f"goal <= {1.2 * rtt * 1000:.0f} ms)"}


def render_fetch(summary: dict, rows: list[str], prof, size: int, checks: list[dict]) -> str:
    out = []
    for c in rows:
        s = summary[c]
        if s.get("skipped"):
            out.append([c, "skipped"] + ["-"] * 7)
            continue
        fail = f" ({s['runs_failed']} failed)" if s["runs_failed"] else ""
        dl, fb = s.get("download_done"), s.get("first_byte")
        fb_rtt = (fb["median"] / prof.rtt_s) if fb and prof.rtt_s > 0 else None
        conns = "-"
        if s.get("conns_new") is not None:
            conns = f"{s['conns_new']:.0f}/{num(s.get('conns_reused'), '{:.0f}')}"
        if s.get("conns_accepted") is not None:
            conns += f" ({s['conns_accepted']:.0f})"
        out.append([c + fail, fmt_stage(s, "download_done"), num(s.get("ratio"), "{:.2f}x"),
                    fmt_stage(s, "first_byte"), num(fb_rtt, "{:.2f}"),
                    num(size / dl["median"] / 1e6 if dl and dl["median"] else None, "{:.1f}"),
                    conns, num(s["wire_bytes"] / 1e6 if s.get("wire_bytes") else None),
                    num(s.get("startup_s"))])
    lines = [
        "time until all bytes are local: median [min-max] over the runs, seconds; /warm = "
        "median over engine-warm's; fb/RTT = first byte / one RTT; MB/s = size / median; "
        "requests on new/reused connections as the client counts them, and in brackets the "
        "connections the emulator accepted during the run",
        table(out, ["contender", "all bytes local s", "/warm", "first byte s", "fb/RTT",
                    "MB/s", "req new/reused (conns)", "MB wire", "start-up s"]), "",
        f"link: aggregate capacity {rate(prof.total_bps)}"
        + (f" = {prof.total_bps / prof.per_conn_bps:g} connections at {rate(prof.per_conn_bps)}"
           if prof.total_bps and prof.per_conn_bps else "")
        + f"; floor for {size / 1e6:.2f} MB = RTT + size/capacity "
        f"= {prof.rtt_s:.3f} + {(size / prof.total_bps if prof.total_bps else 0):.3f} s; "
        f"cold floor adds one new connection ({prof.new_conn_s:.3f} s; the emulator's TLS "
        "handshake round trips come on top of it)", "goal checks (medians):"]
    for ch in checks:
        verdict = {True: "PASS", False: "FAIL", None: "info"}[ch["pass"]]
        how = f" [{ch['how']}]" if ch.get("how") and ch["how"] != "-" else ""
        lines.append(f"  {verdict:4}  {ch['goal']}{how}: {ch['text']}")
    return "\n".join(lines)


def _fetch_notes(summary: dict) -> list[str]:
    notes = []
    c = summary.get("engine-cold", {})
    if c.get("startup_s"):
        notes.append(f"engine-cold: Engine() start-up {c['startup_s']:.2f} s (median), excluded; "
                     "its time starts at submit")
    if "httpx-get" in summary:
        notes.append("httpx-get: a fresh subprocess, httpx.Client().stream('GET') on a new "
                     "connection to a temp file, clock from just before the request")
    if "aria2" in summary and not summary["aria2"].get("skipped"):
        notes.append("aria2: aria2c -x16 -s16 -k1M --file-allocation=none, subprocess wall clock "
                     "(process start included)")
    notes.append("the engines still decode (null processor) while fetching; download_done is "
                 "when the last byte is in shared memory, not when the job ends")
    return notes


def fetch_main(argv: list[str]) -> int:
    a = parse_fetch_args(argv)
    ctx = Context(a, "bench --fetch", argv)
    m = ctx.machine
    ctx.head(f"machine: {m['cpu']}, {m['cores_logical']} logical cores (affinity {m['affinity']}), "
             f"load average {ctx.load} at start; httpx {m['httpx']}",
             ctx.profile_line + " (the link's aggregate capacity)",
             f"clip: {ctx.video.name} ({ctx.size / 1e6:.2f} MB); runs {a.runs}; measured: the time "
             "until every byte is local (engine: report download_done, since submit)")
    # engine-cold's worker starts its engine before its clock does, within the same timeout
    special = {"engine-warm": EngineWarm(), "engine-cold": Worker("engine-cold", a.timeout + 60),
               "aria2": Aria2(a.timeout), "link": Link()}
    runner = Runner(ctx, "download_done")
    rows = runner.measure([special.get(c) or Worker(c, a.timeout) for c in a.contenders])
    summary = summarize(runner.runs, rows, ("connect", "first_byte", "download_done"),
                        ("wall_s", "startup_s", "bytes", "wire_bytes", "conns_accepted",
                         "conns_new", "conns_reused", "cpu_s"), {"ratio": "download_done"})
    checks = fetch_checks(summary, ctx.prof, ctx.size)
    print()
    print(render_fetch(summary, rows, ctx.prof, ctx.size, checks))
    return runner.finish(summary, rows, "(start, prewarm and a warm-up job on another clip, off "
                         "the clock); prewarmed again before each run; processor "
                         f"{NULL_PROCESSOR}", _fetch_notes(summary), checks=checks)
