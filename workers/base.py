"""What every worker process does the same way: start, die with its parent, heartbeat,
and talk to the supervisor over one pipe.

A worker must never outlive the supervisor (no orphans after ``kill -9``), so it asks
the kernel for SIGKILL when its parent dies and also watches ``getppid`` itself. The
supervisor does the same towards its owner, with SIGTERM: it then stops cleanly.

Workers are started by ``spawn`` as ``python -m workers.base FD``, a plain exec with one
socket, not through ``multiprocess``: its spawn also starts a resource-tracker process
that nothing watches (killed, it made the supervisor's next spawn die of SIGPIPE), and
the engine needs none of it -- its segments are unlinked by their creator and swept by
pid (``shm.sweep``), it uses no library semaphores. So every process of the engine's tree
is one the supervisor started, knows and restarts.

The heartbeat says whether the main thread is busy with work and how far it got
(``Link.progress``): a heartbeat thread keeps beating while the main thread is stuck in
a C call or an endless loop, so the supervisor judges liveness by progress.
"""
from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import socket
import subprocess
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
    """The worker's end of its pipe: thread-safe sends, a heartbeat, a hello.

    ``busy`` is true while the main thread holds work (between two ``recv``);
    ``progress`` counts what it did meanwhile: every message sent and every ``tick``
    of a wait that is still alive (bytes or ring slots not there yet)."""

    def __init__(self, conn, role: str):
        self.conn = conn
        self.role = role
        self._lock = threading.Lock()
        self.busy = False
        self.progress = 0

    def send(self, msg) -> None:
        with self._lock:
            self.progress += 1
            try:
                self.conn.send(msg)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                os._exit(1)  # the supervisor is gone

    def tick(self) -> None:
        self.progress += 1

    def recv(self):
        self.busy = False
        try:
            msg = self.conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            os._exit(0)
        self.busy = True
        self.progress += 1
        return msg

    def start(self, **info) -> None:
        self.send(Hello(role=self.role, pid=os.getpid(), info=info))

        def beat():
            while True:
                time.sleep(HEARTBEAT_S)
                with self._lock:
                    try:
                        self.conn.send(Heartbeat(role=self.role, pid=os.getpid(), busy=self.busy,
                                                 progress=self.progress))
                    except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                        os._exit(1)

        threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def worker_setup(role: str, level: str = "INFO") -> None:
    """Signals: the supervisor alone handles Ctrl-C and decides when workers stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    die_with_parent()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s {role}[%(process)d] %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def child_env() -> dict:
    """A worker imports what this process can import (the engine, and the caller's
    processor modules), whether or not they are installed."""
    env = dict(os.environ)
    paths = [os.path.abspath(p or os.getcwd()) for p in sys.path if os.path.isdir(p or ".")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class Child:
    """A worker process and the supervisor's end of its socket. ``sentinel`` (a pidfd)
    turns readable when it exits, like ``multiprocess.Process.sentinel``."""

    def __init__(self, target, args: tuple, name: str, env: dict):
        from multiprocess.connection import Connection
        mine, theirs = socket.socketpair()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), name],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.pid = self.popen.pid
        self.conn = Connection(mine.detach())
        try:
            self.sentinel = os.pidfd_open(self.pid)
            self.conn.send_bytes(pickle.dumps((target, args)))
        except BaseException:   # EMFILE for the pidfd: no half-started worker left behind
            self.popen.kill()
            self.popen.wait()
            self.conn.close()
            raise

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Once it has exited: give back the pidfd and the socket."""
        for close in (lambda: os.close(self.sentinel), self.conn.close):
            try:
                close()
            except OSError:
                pass


def _child_main(fd: int) -> None:
    from multiprocess.connection import Connection
    conn = Connection(fd)
    target, args = pickle.loads(conn.recv_bytes())
    target(conn, *args)


if __name__ == "__main__":
    # argv[2] only names the process in ps/psutil (engine-fetcher0, ...)
    _child_main(int(sys.argv[1]))
