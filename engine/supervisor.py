"""The supervisor: starts every worker, keeps it alive, routes every message.

One thread runs one loop over ``multiprocess.connection.wait``: client connections,
worker pipes and worker sentinels. Nothing is shared between threads but the accept
queue, so job state needs no locks. Workers talk only to the supervisor (a star), which
keeps restarts simple: it always knows what each worker holds and can requeue it.

The jobs themselves -- range plan, segments, decode, results, reports -- are
``engine.pipeline``, run by this same loop. Segments are created and unlinked in this
process only; workers attach by name. A crash of the supervisor itself is covered twice:
workers die with it (``workers.base``) and the next start sweeps its segments
(``shm.sweep``).
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import signal
import sys
import threading
import time

from multiprocess.connection import wait

from engine.config import Config
from engine.crew import State, WorkerHandle
from engine.errors import ErrorKind
from engine.messages import (CancelJob, Heartbeat, Hello, Prewarm, PrewarmOrigins,
                             ReleaseFrames, Reply, Shutdown, StatusQuery, Submit)
from engine.pipeline import Pipeline
from engine.shm import sweep_stale
from engine.shm.sweep import owned_blocks
from engine.shm.block import unlink_block
from engine.workers.base import child_env

log = logging.getLogger("engine.supervisor")

SAMPLE_EVERY_S = 2.0        # psutil sampling for status and RSS recycling
TICK_FETCHING_S = 0.05      # ranges wait for a free connection: look again soon
TICK_IDLE_S = 0.25          # deadlines and restarts need no finer clock
REAP_S = 0.1                # a dead worker's exit status is there by now
KILL_WAIT_S = 1.0           # after SIGKILL at shutdown


class Supervisor:
    def __init__(self, config: Config, listener=None):
        self.config = config
        self.listener = listener
        self.child_env = child_env()
        self.clients: list = []
        self.accepted: queue.Queue = queue.Queue()
        self.wake_r, self.wake_w = os.pipe()
        self.running = True
        self.stopping_since: float | None = None
        self.prewarms: dict[int, tuple[object, int, int]] = {}  # token -> (client, waiting, opened)
        self.ready_waiters: list = []    # (client, token) waiting for every worker up
        self.was_ready = False
        self.workers: list[WorkerHandle] = []
        self.sampled_at = 0.0
        self.touched: set[int] = set()    # jobs the event being handled concerns
        self.last_status: dict = {}
        from engine.workers import decoder, fetcher, gpu
        for i in range(config.fetchers):
            self.workers.append(WorkerHandle("fetcher", i, fetcher.main))
        for i in range(config.decoders):
            self.workers.append(WorkerHandle("decoder", i, decoder.main))
        self.workers.append(WorkerHandle("gpu", 0, gpu.main))
        self.pipeline = Pipeline(config, lambda: [w for w in self.workers if w.alive])
        self.client_handlers = {Submit: self._on_submit, Prewarm: self._on_prewarm,
                                StatusQuery: self._on_status_query, CancelJob: self._on_cancel,
                                ReleaseFrames: self._on_release_frames}
        self.worker_handlers = {Heartbeat: self._on_heartbeat, Reply: self._on_prewarmed,
                                Hello: self._on_hello}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        swept = sweep_stale()
        for name in owned_blocks(os.getpid()):   # a dead engine that had our pid
            unlink_block(name)
            swept.append(name)
        if swept:
            log.info("swept %d stale shared-memory segments of dead engines", len(swept))
        for note in self.config.notes:
            log.info(note)
        for w in self.workers:
            self._spawn(w)
        if self.listener is not None:
            threading.Thread(target=self._accept, name="accept", daemon=True).start()

    def _spawn(self, w: WorkerHandle) -> None:
        w.spawn(self.config, self.child_env)

    def _accept(self) -> None:
        while self.running:
            try:
                conn = self.listener.accept()
            except (OSError, EOFError) as exc:
                if not self.running:
                    return
                if getattr(exc, "errno", None) in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                    log.error("cannot accept a client: %s (it waits in the backlog)", exc)
                    time.sleep(0.2)   # the connection stays queued: no busy loop meanwhile
                continue
            self.accepted.put(conn)
            try:
                os.write(self.wake_w, b"x")
            except OSError:
                return   # shut down meanwhile

    def add_client(self, conn) -> None:
        self.clients.append(conn)

    def request_stop(self, *_) -> None:
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            self.pipeline.stopping = True
            try:
                os.write(self.wake_w, b"x")
            except OSError:
                pass   # already shut down

    def run(self) -> None:
        """The loop. Returns after a stop request once jobs are done (at most 5 s).

        An exception out of one event is a bug: it is logged with its traceback, the
        jobs that event touched fail, and the loop goes on. Only the loop's own machinery
        failing (``wait`` itself) ends it: ``shutdown`` still unlinks every segment."""
        try:
            while True:
                if self.stopping_since is not None:
                    if not self.pipeline.live or \
                            time.monotonic() - self.stopping_since > self.config.stop_grace_s:
                        break
                self._guarded(self._tick)
                handles = [self.wake_r] + list(self.clients)
                for w in self.workers:
                    if w.process is not None:
                        handles += [w.conn, w.process.sentinel]
                for ready in wait(handles, timeout=self._next_timeout()):
                    self._guarded(self._dispatch, ready)
        finally:
            self.shutdown()

    def _guarded(self, fn, *args) -> None:
        self.touched = set()
        before = set(self.pipeline.jobs)
        try:
            fn(*args)
        except Exception:
            log.exception("internal error in the supervisor loop (it goes on)")
            touched = self.touched | (set(self.pipeline.jobs) - before)
            for job in self.pipeline.live:
                # a fetcher's message names the job's fetch key (one counter draws both)
                if job.id in touched or job.fetch_key in touched:
                    self.pipeline.fail(job, ErrorKind.ENGINE,
                                       f"{job.url}: internal error in the engine (see its log)")
        self._flush()

    def _flush(self) -> None:
        """Send what the pipeline's events asked for, in order."""
        by_name = {w.name: w for w in self.workers}
        for out in self.pipeline.take():
            if out.to_worker:
                w = by_name[out.to]
                if w.conn is not None:
                    self.send_worker(w, out.msg)
            else:
                self.send(out.to, out.msg)

    def _next_timeout(self) -> float:
        return TICK_FETCHING_S if self.pipeline.fetching else TICK_IDLE_S

    def shutdown(self) -> None:
        self.running = False
        self.pipeline.fail_all(ErrorKind.ENGINE, "engine is shutting down")
        self._flush()
        self.pipeline.close()
        for w in self.workers:
            if w.process is not None and w.process.is_alive():
                try:
                    w.conn.send(Shutdown())
                except OSError:
                    pass
        deadline = time.monotonic() + self.config.worker_exit_s
        for w in self.workers:
            if w.process is not None:
                w.process.join(max(0.0, deadline - time.monotonic()))
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join(KILL_WAIT_S)
                w.process.close()
        for conn in self.clients:
            try:
                conn.close()
            except OSError:
                pass
        if self.listener is not None:
            try:
                self.listener.close()
            except OSError:
                pass
        for name in owned_blocks(os.getpid()):
            unlink_block(name)
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------ events
    def _dispatch(self, ready) -> None:
        if ready == self.wake_r:
            os.read(self.wake_r, 4096)
            while not self.accepted.empty():
                self._admit_client(self.accepted.get())
            return
        if ready in self.clients:
            try:
                msg = ready.recv()
            except (EOFError, OSError):
                self._client_gone(ready)
                return
            except Exception:   # not one of our messages (garbage on the socket)
                log.warning("a client sent something that is not a message: dropping it")
                self._client_gone(ready)
                return
            self.touched = {j.id for j in self.pipeline.live if j.client is ready}
            self.on_client(ready, msg)
            return
        for w in self.workers:
            if w.process is None:
                continue
            if ready is w.conn:
                self._drain_worker(w)
                return
            if ready == w.process.sentinel:
                self._drain_worker(w)
                self.on_worker_death(w)
                return

    def _drain_worker(self, w: WorkerHandle) -> None:
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                job = getattr(msg, "job", None)
                self.touched = {job} if isinstance(job, int) else set()
                self.on_worker(w, msg)
        except (EOFError, OSError):
            pass

    def _admit_client(self, conn) -> None:
        """Serve mode: past ENGINE_MAX_CLIENTS connections, a new one is told at once
        that the engine is busy instead of waiting unanswered."""
        if len(self.clients) >= self.config.max_clients:
            try:
                busy = (f"engine busy: {len(self.clients)} clients connected "
                        f"(ENGINE_MAX_CLIENTS={self.config.max_clients})")
                conn.send(Reply(token=-1, payload={}, error=busy, kind=ErrorKind.BUSY))
            except (OSError, EOFError):
                pass
            conn.close()
            return
        self.clients.append(conn)

    def _tick(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.process is None and w.restart_at is not None and now >= w.restart_at:
                self._spawn(w)
            elif why := w.overdue(now, self.config):
                self._kill(w, why)
        if now - self.sampled_at >= SAMPLE_EVERY_S:
            self.sampled_at = now
            self._sample()
        self.pipeline.tick(now)

    def _kill(self, w: WorkerHandle, why: str) -> None:
        """A worker that stopped answering: SIGKILL works on a stopped process too; its
        death (sentinel) fails or requeues what it held and restarts it."""
        log.warning("%s (pid %s) %s: killing it", w.name, w.pid, why)
        w.state = State.STOPPING
        w.recycling = why
        w.process.kill()

    def _sample(self) -> None:
        """psutil at a low fixed rate: the status view, and recycling of bloated workers."""
        from engine.status import snapshot
        self.last_status = snapshot(self)
        limit = self.config.max_rss_mb
        if not limit:
            return
        by_pid = {p["pid"]: p for p in self.last_status["processes"] if p["pid"]}
        for w in self.workers:
            rss = (by_pid.get(w.pid) or {}).get("rss_mb") or 0
            idle = self.pipeline.ledger.of(w.name).idle
            if w.alive and w.ready and idle and rss > limit:
                log.warning("%s (pid %s) uses %.0f MB > ENGINE_MAX_RSS_MB=%d: recycling it",
                            w.name, w.pid, rss, limit)
                w.recycling = f"recycled at {rss:.0f} MB RSS"
                w.state = State.STOPPING
                self.send_worker(w, Shutdown())

    # ------------------------------------------------------------------ clients
    def send(self, client, msg) -> None:
        if client is None:
            return
        try:
            client.send(msg)
        except (OSError, EOFError):
            self._client_gone(client)

    def _client_gone(self, client) -> None:
        if client in self.clients and self.listener is None and len(self.clients) == 1:
            self.request_stop()   # an owned engine ends with its owner
        if client in self.clients:
            self.clients.remove(client)
            try:
                client.close()
            except OSError:
                pass
        self.pipeline.fail_all(ErrorKind.ENGINE, "the client went away", client=client)

    def on_client(self, client, msg) -> None:
        handler = self.client_handlers.get(type(msg))
        if handler is None:
            log.warning("a client sent an unexpected %s: dropped", type(msg).__name__)
            return
        handler(client, msg)

    def _on_submit(self, client, msg: Submit) -> None:
        self.pipeline.submit(client, msg)

    def _on_cancel(self, client, msg: CancelJob) -> None:
        self.pipeline.cancel(client, msg.token)

    def _on_release_frames(self, client, msg: ReleaseFrames) -> None:
        self.pipeline.release_output(client, msg.output)

    def _on_prewarm(self, client, msg: Prewarm) -> None:
        fetchers = [w for w in self.workers if w.role == "fetcher" and w.alive]
        self.prewarms[msg.token] = (client, len(fetchers), 0)
        for w in fetchers:
            self.send_worker(w, PrewarmOrigins(origins=tuple(msg.origins), token=msg.token))
        if not fetchers:
            self.send(client, Reply(token=msg.token, payload={"opened": 0}))

    def _on_status_query(self, client, msg: StatusQuery) -> None:
        if msg.ready:
            self.ready_waiters.append((client, msg.token))
            self._maybe_ready()
        else:
            from engine.status import snapshot
            self.send(client, Reply(token=msg.token, payload=snapshot(self)))

    def _maybe_ready(self) -> None:
        if not self.ready_waiters:
            return
        failed = [w for w in self.workers if w.info.get("error") or w.quick_deaths >= 3]
        if failed:
            w = failed[0]
            error = w.info.get("error") or (f"{w.name} cannot start ({w.causes[-1]}; "
                                            "see its log above)")
            for client, token in self.ready_waiters:
                self.send(client, Reply(token=token, payload={}, error=error,
                                        kind=ErrorKind.PROCESSOR))
            self.ready_waiters = []
            if not self.was_ready:
                self.request_stop()     # an engine that cannot start stops
        elif all(w.ready for w in self.workers):
            self.was_ready = True
            info = {w.name: w.info for w in self.workers}
            for client, token in self.ready_waiters:
                self.send(client, Reply(token=token, payload={"ready": True, "workers": info}))
            self.ready_waiters = []

    # ------------------------------------------------------------------ workers
    def send_worker(self, w: WorkerHandle, msg) -> None:
        try:
            w.conn.send(msg)
        except (OSError, EOFError):
            pass   # its death is noticed through the sentinel

    def on_worker(self, w: WorkerHandle, msg) -> None:
        """The worker's own messages are handled here; the rest are about jobs."""
        self.worker_handlers.get(type(msg), self.pipeline.on_message)(w, msg)

    def _on_heartbeat(self, w: WorkerHandle, msg: Heartbeat) -> None:
        w.heard(msg, time.monotonic())

    def _on_prewarmed(self, w: WorkerHandle, msg: Reply) -> None:
        """A fetcher finished a prewarm: the client hears once all of them have."""
        entry = self.prewarms.get(msg.token)
        if entry is not None:
            client, waiting, opened = entry
            opened += msg.payload.get("opened", 0)
            if waiting <= 1:
                self.prewarms.pop(msg.token)
                self.send(client, Reply(token=msg.token, payload={"opened": opened}))
            else:
                self.prewarms[msg.token] = (client, waiting - 1, opened)

    def _on_hello(self, w: WorkerHandle, msg: Hello) -> None:
        w.heard(msg, time.monotonic())
        if msg.info.get("error"):
            log.error("%s", msg.info["error"])
        if w.role in ("decoder", "gpu"):
            self.pipeline.dispatch()
        self._maybe_ready()

    def on_worker_death(self, w: WorkerHandle) -> None:
        w.process.join(REAP_S)
        code, pid = w.process.exitcode, w.pid
        w.process.close()
        cause = w.died(code)
        if self.running and self.stopping_since is None:
            log.warning("%s (pid %s) %s: restarting it", w.name, pid, cause)
        self.pipeline.worker_lost(w, cause)
        if not self.running or self.stopping_since is not None:
            return
        if w.state is State.FAILED:
            return   # it cannot start (bad processor): reported, not spun
        w.schedule_restart(time.monotonic(), self.config)
        if w.restart_at <= time.monotonic():
            self._spawn(w)
        self._maybe_ready()


def main(conn, config: Config) -> None:
    """Entry of a supervisor spawned by ``Engine``: its only client is the pipe."""
    from engine.workers.base import die_with_parent
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)   # a broken pipe is an error we handle
    logging.basicConfig(level=config.log_level, format="%(asctime)s supervisor %(message)s")
    sup = Supervisor(config)
    signal.signal(signal.SIGTERM, sup.request_stop)
    # Its owner gone (a miner killed with kill -9), it stops as on SIGTERM: workers
    # stopped and every segment unlinked now, not left for the next start's sweep.
    die_with_parent(signal.SIGTERM, on_orphan=sup.request_stop)
    sup.add_client(conn)
    try:
        sup.start()
        sup.run()
    except Exception as exc:   # the loop itself broke: segments are unlinked by now
        logging.getLogger("engine.supervisor").exception("supervisor failed")
        print(f"error: the engine's supervisor cannot go on: {exc}", flush=True,
              file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    # ``Engine`` starts us as ``python -m engine.supervisor FD``: a plain exec, so the
    # miner's own main module is never re-imported here (multiprocess' spawn would).
    from multiprocess.connection import Connection
    _conn = Connection(int(sys.argv[1]))
    main(_conn, _conn.recv())
