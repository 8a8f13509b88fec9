"""The rounds, the notes and the JSON file of one bench run."""
from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # annotations only: the runner takes any context and contenders
    from engine.tools.bench.contenders import Contender
    from engine.tools.bench.context import Context


class Runner:
    """Rounds: every contender once a round, the order rotated by one each round so that
    drift and noise spread over all of them, no new round once ``--budget`` seconds have
    passed since the start. ``progress`` is the stage reported on stderr after each run;
    ``after`` adds derived fields to each measurement."""

    def __init__(self, ctx: Context, progress: str, after=None):
        self.ctx, self.progress, self.after = ctx, progress, after
        self.runs: list[dict] = []
        self.notes: list[str] = []

    def measure(self, contenders: list[Contender]) -> list[str]:
        """Measure; returns the table's rows."""
        a, ready = self.ctx.a, []
        for c in contenders:
            why = c.missing()
            if why:
                print(f"{why}: skipping the {c.name} contender", file=sys.stderr)
                self.runs.append({"ok": False, "skipped": True, "contender": c.name, "round": 0,
                                  "error": why})
            else:
                ready.append(c)
        timed = [c for c in ready if c.every_round]
        with self.ctx:
            self.notes += filter(None, (c.prepare(self.ctx) for c in ready))
            for c in ready:
                if not c.every_round:
                    self._once(c, 0)
            for rnd in range(a.runs):
                if rnd and time.monotonic() - self.ctx.started > a.budget:
                    self.notes.append(f"stopped after {rnd} rounds: the {a.budget:.0f} s budget "
                                      "was spent")
                    break
                k = rnd % max(len(timed), 1)
                for c in timed[k:] + timed[:k]:
                    print(f"round {rnd + 1}/{a.runs}: {c.name} ...", file=sys.stderr, flush=True)
                    self._once(c, rnd)
        return [row for c in contenders for row in c.rows]

    def _once(self, c: Contender, rnd: int) -> None:
        emu = self.ctx.emu
        before = emu.stats()
        res = c.run(self.ctx)
        before = res.pop("_emu_before", before)
        if c.wire:
            res.update(emu_delta(before, emu.stats()))
        if self.after:
            self.after(res)
        self.runs += [dict(r, contender=row, round=rnd) for row, r in res.pop("also", {}).items()]
        self.runs.append(dict(res, contender=c.name, round=rnd))
        t = (res.get("t") or {}).get(self.progress)
        status = f"FAILED: {res.get('error')}"
        if res.get("ok") and t is not None:
            frames = f", {res['frames']} frames" if res.get("frames") else ""
            status = f"{self.progress} {t:.3f} s{frames}"
        print(f"  {c.name}: {status}", file=sys.stderr, flush=True)

    def finish(self, summary: dict, rows: list[str], warm: str, notes: list[str], **extra) -> int:
        """Print the notes, write ``--json``; 1 if a run failed."""
        ctx, a = self.ctx, self.ctx.a
        notes = self.notes + notes + [
            f"{r['contender']} round {r['round'] + 1} failed: {r.get('error')}"
            for r in self.runs if not r.get("ok") and not r.get("skipped")]
        if ctx.warm_startup is not None:
            notes.insert(0, f"engine-warm: started once in {ctx.warm_startup:.2f} s {warm}")
        if notes:
            print()
            for n in notes:
                print(f"- {n}")
        if a.json:
            p = ctx.prof
            with open(a.json, "w") as fh:
                json.dump({"command": ctx.cmdline, "machine": ctx.machine,
                           "profile": {"name": p.name, "rtt_s": p.rtt_s, "new_conn_s": p.new_conn_s,
                                       "per_conn_bps": p.per_conn_bps, "total_bps": p.total_bps},
                           "video": {"path": str(ctx.video), "bytes": ctx.size}, **extra,
                           "runs_per_contender": a.runs, "contenders": a.contenders, "rows": rows,
                           "runs": self.runs, "summary": summary, "notes": notes,
                           "elapsed_s": round(time.monotonic() - ctx.started, 1)}, fh, indent=1)
        print(f"\n{ctx.prog} finished in {time.monotonic() - ctx.started:.0f} s", file=sys.stderr)
        return 0 if all(r.get("ok") or r.get("skipped") for r in self.runs) else 1


def emu_delta(before: dict, after: dict) -> dict:
    return {"wire_bytes": after["bytes_server_to_client"] - before["bytes_server_to_client"],
            "conns_accepted": after["connections_accepted"] - before["connections_accepted"]}
