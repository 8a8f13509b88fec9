"""The supervisor's worker processes: each one's handle and lifecycle, and the rules that
decide when one is killed and when a dead one comes back (no I/O but ``spawn``).

A handle keeps only the process and its lifecycle (``State``); what a worker holds (its
heads and ranges, the job it decodes) is the pipeline's ledger (``engine.ledger``).
"""
from __future__ import annotations

import enum
import logging
import signal
import time

from engine.config import Config
from engine.messages import Heartbeat, Hello
from engine.workers.base import Child

log = logging.getLogger("engine.supervisor")


class State(enum.Enum):
    """A worker process' lifecycle, as the supervisor sees it."""
    STARTING = "starting"    # spawned, no Hello yet
    READY = "ready"          # said Hello: takes work
    STOPPING = "stopping"    # asked to exit or killed; its death is next
    DOWN = "down"            # dead, restart scheduled
    FAILED = "failed"        # cannot start (bad processor): reported, not restarted


class WorkerHandle:
    """One child process of a role: its lifecycle."""

    def __init__(self, role: str, index: int, target):
        self.role, self.index, self.target = role, index, target
        self.state = State.DOWN
        self.process: Child | None = None
        self.conn = None
        self.pid = None
        self.info: dict = {}
        self.started_at = 0.0
        self.last_beat = 0.0
        self.progress = (0, 0.0)     # (last progress counter, when it last moved)
        self.restarts = 0
        self.quick_deaths = 0
        self.causes: list[str] = []
        self.restart_at: float | None = None
        self.recycling: str | None = None             # why we asked it to exit
        self.busy = False                             # its last heartbeat: holding work

    @property
    def name(self) -> str:
        return f"{self.role}{self.index}" if self.role != "gpu" else "gpu"

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def spawn(self, config: Config, env: dict) -> None:
        """Start its process; a start that fails (EMFILE, EAGAIN, ENOMEM) is tried again
        after the longest back-off, never raised."""
        try:
            self.process = Child(self.target, (config, self.index), f"engine-{self.name}", env)
        except OSError as exc:
            log.error("cannot start %s: %s: retrying", self.name, exc)
            self.causes.append(f"cannot start: {exc.strerror or exc}")
            self.restart_at = time.monotonic() + config.restart_backoff_s[-1]
            return
        self.conn, self.pid, self.info = self.process.conn, self.process.pid, {}
        self.state = State.STARTING
        self.started_at = self.last_beat = time.monotonic()
        self.progress = (0, self.started_at)
        self.restart_at = None

    def heard(self, msg: Heartbeat | Hello, now: float) -> None:
        """A heartbeat or hello: alive; its progress counter says whether it moves."""
        self.last_beat = now
        if isinstance(msg, Hello):
            self.info, self.progress = msg.info, (0, now)
            if self.state is State.STARTING:
                self.state = State.FAILED if msg.info.get("error") else State.READY
            return
        self.busy = msg.busy
        if msg.progress != self.progress[0] or not msg.busy:
            self.progress = (msg.progress, now)

    def overdue(self, now: float, config: Config) -> str | None:
        """Why a ready worker must be killed now (silent, or busy without progress)."""
        if self.state is not State.READY or not self.alive:
            return None
        if now - self.last_beat > config.heartbeat_timeout_s:
            return f"no heartbeat for {now - self.last_beat:.0f} s"
        if self.busy and now - self.progress[1] > config.stall_timeout_s:
            return (f"stalled: busy without progress for {now - self.progress[1]:.0f} s "
                    "(ENGINE_STALL_TIMEOUT_S)")
        return None

    def died(self, code: int | None) -> str:
        """Its process is gone: the cause, kept; the handle is down (or failed)."""
        cause = (f"killed by signal {signal.Signals(-code).name}"
                 if code is not None and code < 0 else f"exited with code {code}")
        if self.recycling:
            cause, self.recycling = self.recycling, None
        self.causes = (self.causes + [cause])[-20:]
        self.process, self.conn, self.pid = None, None, None
        self.state = State.FAILED if self.info.get("error") else State.DOWN
        self.busy = False
        return cause

    def schedule_restart(self, now: float, config: Config) -> None:
        """Back off longer after each quick death (a crash loop); a worker that lived
        long enough starts again at the first step."""
        backoff = config.restart_backoff_s
        quick = now - self.started_at < config.quick_death_s
        self.quick_deaths = self.quick_deaths + 1 if quick else 0
        self.restarts += 1
        self.restart_at = now + backoff[min(self.quick_deaths, len(backoff) - 1)]
