"""What every worker process does the same way: die with its parent, heartbeat,
and talk to the supervisor over one pipe.

A worker must never outlive the supervisor (no orphans after ``kill -9``), so it asks
the kernel for SIGKILL when its parent dies and also watches ``getppid`` itself. The
supervisor does the same towards its owner, with SIGTERM: it then stops cleanly.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

from engine.messages import Heartbeat, Hello

HEARTBEAT_S = 0.5
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, on_orphan=None) -> None:
    """The kernel sends ``sig`` when the parent dies; a thread also watches ``getppid``
    and then calls ``on_orphan`` (default: exit at once)."""
    parent = os.getppid()
    orphaned = on_orphan or (lambda: os._exit(1))
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - non-Linux
        pass
    if os.getppid() != parent:  # the parent died before prctl
        orphaned()
        return

    def watch():
        while os.getppid() == parent:
            time.sleep(0.25)
        orphaned()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class Link:
    """The worker's end of its pipe: thread-safe sends, a heartbeat, a hello."""

    def __init__(self, conn, role: str):
        self.conn = conn
        self.role = role
        self._lock = threading.Lock()

    def send(self, msg) -> None:
        with self._lock:
            try:
                self.conn.send(msg)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                os._exit(1)  # the supervisor is gone

    def recv(self):
        try:
            return self.conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            os._exit(0)

    def start(self, **info) -> None:
        self.send(Hello(self.role, os.getpid(), info))

        def beat():
            while True:
                time.sleep(HEARTBEAT_S)
                self.send(Heartbeat(self.role, os.getpid()))

        threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def worker_setup(role: str, level: str = "INFO") -> None:
    """Signals: the supervisor alone handles Ctrl-C and decides when workers stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    die_with_parent()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s {role}[%(process)d] %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
