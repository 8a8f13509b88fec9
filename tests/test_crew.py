"""A worker's lifecycle rules (engine.crew), driven by events: no processes."""
from __future__ import annotations

import signal

from engine.config import Config
from engine.crew import State, WorkerHandle
from engine.messages import Heartbeat, Hello

CFG = Config(heartbeat_timeout_s=10.0, stall_timeout_s=30.0)


class Alive:
    """A process that is running, for ``alive``."""
    def is_alive(self) -> bool:
        return True


def ready_worker(now: float = 100.0) -> WorkerHandle:
    w = WorkerHandle("decoder", 0, None)
    w.process, w.state, w.started_at = Alive(), State.STARTING, now
    w.heard(Hello(role="decoder", pid=1, info={}), now)
    return w


def test_hello_makes_it_ready_or_failed():
    assert ready_worker().state is State.READY
    w = WorkerHandle("gpu", 0, None)
    w.state = State.STARTING
    w.heard(Hello(role="gpu", pid=1, info={"error": "bad processor"}), 1.0)
    assert w.state is State.FAILED


def test_silence_past_the_heartbeat_timeout_is_overdue():
    w = ready_worker()
    assert w.overdue(109.0, CFG) is None
    assert w.overdue(111.0, CFG) == "no heartbeat for 11 s"


def test_busy_without_progress_is_a_stall_and_progress_resets_it():
    w = ready_worker()
    w.heard(Heartbeat(role="decoder", pid=1, busy=True, progress=5), 100.0)
    w.heard(Heartbeat(role="decoder", pid=1, busy=True, progress=5), 125.0)
    assert w.overdue(129.0, CFG) is None
    w.heard(Heartbeat(role="decoder", pid=1, busy=True, progress=5), 131.0)
    assert w.overdue(131.0, CFG).startswith("stalled: busy without progress for 31 s")
    w.heard(Heartbeat(role="decoder", pid=1, busy=True, progress=6), 131.5)
    assert w.overdue(132.0, CFG) is None


def test_an_idle_worker_never_stalls():
    w = ready_worker()
    for t in (105.0, 140.0):
        w.heard(Heartbeat(role="decoder", pid=1, busy=False, progress=0), t)
    assert w.overdue(141.0, CFG) is None


def test_death_names_its_cause_and_a_recycle_keeps_the_reason():
    w = ready_worker()
    assert w.died(-signal.SIGKILL) == "killed by signal SIGKILL"
    assert w.state is State.DOWN and w.process is None
    w = ready_worker()
    w.recycling = "recycled at 900 MB RSS"
    assert w.died(0) == "recycled at 900 MB RSS" and w.recycling is None
    assert w.causes == ["recycled at 900 MB RSS"]


def test_quick_deaths_back_off_longer_and_a_long_life_starts_over():
    cfg = Config(restart_backoff_s=(0.0, 1.0, 5.0), quick_death_s=10.0)
    w = ready_worker(now=0.0)
    waits = []
    for now in (1.0, 2.0, 3.0, 4.0):
        w.started_at = now - 0.5
        w.schedule_restart(now, cfg)
        waits.append(w.restart_at - now)
    assert waits == [1.0, 5.0, 5.0, 5.0] and w.restarts == 4
    w.started_at = 0.0
    w.schedule_restart(100.0, cfg)
    assert w.restart_at == 100.0 and w.quick_deaths == 0
