"""The dispatcher of a cluster: ``ClusterEngine`` starts an engine per GPU (an actor per
GPU, or per unit of the custom resource ``engine`` on nodes without GPUs), chooses the
engine for each job (fewest in flight, at most ``cluster_jobs_per_engine`` each) and
retries a job whose engine was lost before it delivered anything. Ray places the
engines, restarts a dead one, and carries the results back (a streaming generator per
job: batch by batch, as on one machine).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from dataclasses import replace

from engine.api import EngineClient
from engine.cluster.actor import EngineActor, node_name
from engine.config import Config, check_device
from engine.errors import EngineBusy, EngineClosed, EngineError, first_line
from engine.report import Batch, Frames, Report, raise_for
from engine.selection import Selection

log = logging.getLogger("engine")

POLL_S = 1.0            # how often the dispatcher looks for joined nodes and restarted engines
START_TIMEOUT_S = 180.0  # a new engine: actor placement, supervisor start, workers up
CLOSE_TIMEOUT_S = 20.0
NAMESPACE = "engine"
QUOTES = "'\""    # Ray quotes some messages


class ClusterBusy(EngineBusy):
    pass


def _ray():
    try:
        import ray
    except ImportError:
        raise EngineError('a cluster needs Ray: pip install -e ".[cluster]"') from None
    return ray


def _cause(exc: Exception) -> str:
    """The one line of a Ray error that says what went wrong inside the actor."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error:" in ln and not ln.startswith(("File ", "ray.exceptions")):
            return ln
    return lines[0] if lines else type(exc).__name__


def _probe(address: str) -> None:
    """Ray's init retries an unreachable head for minutes: a clear error at once instead."""
    import socket
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise EngineError(f"cluster address {address!r}: expected HOST:PORT, auto or local")
    try:
        socket.create_connection((host, int(port)), timeout=5.0).close()
    except OSError as exc:
        raise EngineClosed(f"cannot join the Ray cluster at {address}: "
                           f"{exc.strerror or exc}") from None


class _Slot:
    """One engine of the cluster, as the dispatcher sees it."""

    def __init__(self, index: int, kind: str, handle):
        self.index = index
        self.kind = kind             # "GPU" or "engine": the resource it holds
        self.handle = handle
        self.info: dict = {}
        self.up = False
        self.pending = None          # an info() call awaiting the actor (start or restart)
        self.inflight = 0
        self.done = 0
        self.restarts = 0
        self.last_error: str | None = None

    @property
    def node(self) -> str:
        return self.info.get("node", "?")


class ClusterEngine(EngineClient):
    """``Engine(cluster=ADDRESS)``: the interface of a local engine (prewarm, process,
    stream, report, submit, status, close) over every engine of a Ray cluster."""

    def __init__(self, address: str, processor: str | None = None, device: str | None = None,
                 *, config: Config | None = None, busy_wait_s: float | None = None,
                 **overrides):
        ray = _ray()
        config = config or Config.from_env()
        if device is not None:
            device = check_device(device)
        self.config = config.with_(processor=processor, device=device, **overrides)
        self.address = address
        self.per_engine = self.config.cluster_jobs_per_engine
        self.busy_wait_s = self.config.job_timeout_s if busy_wait_s is None else busy_wait_s
        self._closed = False
        self._lock = threading.Condition()
        self._slots: list[_Slot] = []
        self._jobs = itertools.count(1)
        self._prefix = f"engine-{uuid.uuid4().hex[:8]}"
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            _probe(address)
            try:
                ray.init(address=None if address == "local" else address,
                         namespace=NAMESPACE, logging_level=logging.WARNING,
                         log_to_driver=False)
            except Exception as exc:   # Ray raises ConnectionError, RuntimeError, ValueError...
                raise EngineClosed(f"cannot join the Ray cluster at {address}: "
                                   f"{first_line(exc).strip(QUOTES)}") from None
        self._grow()
        if not self._slots:
            self.close()
            raise EngineError(f"the Ray cluster at {address} has no GPU and no 'engine' "
                              "resource to run an engine on")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any(s.up for s in self._slots):
            self._poll(timeout=1.0)
            if all(s.last_error for s in self._slots):   # e.g. the processor cannot load
                error = self._slots[0].last_error
                self.close()
                raise EngineError(f"no engine of the cluster at {address} started: {error}")
            if time.monotonic() > deadline:
                self.close()
                raise EngineError(f"no engine of the cluster at {address} started within "
                                  f"{START_TIMEOUT_S:.0f} s")
        self._monitor = threading.Thread(target=self._watch, name="cluster-monitor", daemon=True)
        self._monitor.start()
        # ENGINE_PREWARM travels in the config: each engine prewarms itself when it starts,
        # a restarted one too.

    # -- engines: one per GPU (or 'engine' unit); Ray places and restarts them ------------
    def _capacity(self) -> dict:
        ray = _ray()
        gpu = engine = 0
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            res = node.get("Resources", {})
            if res.get("GPU", 0) >= 1:
                gpu += int(res["GPU"])
            else:
                engine += int(res.get("engine", 0))
        return {"GPU": gpu, "engine": engine}

    def _grow(self) -> None:
        """An engine for every GPU and 'engine' unit not yet covered: at start, and when a
        node joins. A lost node's engines are not replaced here: Ray restarts them, and
        they take the next free GPU."""
        ray = _ray()
        cap = self._capacity()
        have = {"GPU": 0, "engine": 0}
        for s in self._slots:
            have[s.kind] += 1
        actor = ray.remote(EngineActor)
        engine_config = replace(self.config, cluster="")
        for kind in ("GPU", "engine"):
            for _ in range(cap[kind] - have[kind]):
                resources = {"num_gpus": 1} if kind == "GPU" else {"resources": {"engine": 1}}
                index = len(self._slots)
                handle = actor.options(
                    name=f"{self._prefix}-{index}", namespace=NAMESPACE, num_cpus=0,
                    max_restarts=-1, max_task_retries=0,
                    max_concurrency=self.per_engine + 4,   # jobs, plus status/cancel calls
                    **resources).remote(engine_config)
                slot = _Slot(index, kind, handle)
                slot.pending = handle.info.remote()
                with self._lock:
                    self._slots.append(slot)

    def _poll(self, timeout: float = 0.0) -> None:
        """Engines that finished starting (or restarting) come up."""
        ray = _ray()
        with self._lock:
            pending = {s.pending: s for s in self._slots if s.pending is not None}
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        for ref in ready:
            slot = pending[ref]
            slot.pending = None
            try:
                info = ray.get(ref)
            except ray.exceptions.RayError as exc:
                # its start failed or it died again: ask once more (Ray restarts it)
                slot.last_error = _cause(exc)
                slot.pending = slot.handle.info.remote()
                continue
            with self._lock:
                if slot.info and info["pid"] != slot.info.get("pid"):
                    slot.restarts += 1
                slot.info = info
                slot.up = True
                self._lock.notify_all()

    def _watch(self) -> None:
        while not self._closed:
            try:
                self._poll(timeout=POLL_S)
                self._grow()
            except Exception as exc:    # the cluster going away must not kill the thread
                if self._closed:
                    return
                log.warning("cluster monitor: %s", exc)
                time.sleep(POLL_S)
            if not any(s.pending for s in self._slots):
                time.sleep(POLL_S)

    def _lost(self, slot: _Slot, exc: Exception) -> None:
        with self._lock:
            if slot.up:
                slot.up = False
                slot.last_error = first_line(exc)
                slot.pending = slot.handle.info.remote()

    # -- dispatch ----------------------------------------------------------------------
    def _acquire(self, avoid: set[int]) -> _Slot:
        deadline = time.monotonic() + self.busy_wait_s
        with self._lock:
            while True:
                if self._closed:
                    raise EngineClosed("the cluster engine is closed")
                free = [s for s in self._slots
                        if s.up and s.inflight < self.per_engine and s.index not in avoid]
                if not free and avoid:     # a retry may go back to an engine that recovered
                    free = [s for s in self._slots if s.up and s.inflight < self.per_engine]
                if free:
                    slot = min(free, key=lambda s: (s.inflight, s.done))
                    slot.inflight += 1
                    return slot
                left = deadline - time.monotonic()
                if left <= 0:
                    up = sum(s.up for s in self._slots)
                    raise ClusterBusy(
                        f"cluster busy: {up} engine(s) up, each with {self.per_engine} "
                        f"jobs in flight, none free after {self.busy_wait_s:g} s")
                self._lock.wait(min(left, POLL_S))

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            slot.inflight -= 1
            slot.done += 1
            self._lock.notify_all()

    def submit(self, url: str, *, processor: str | None = None, stream: bool = False,
               **selection):
        """Start a job on the least busy engine; yields ``Batch`` objects if streaming,
        then the ``Report`` (whose ``node`` says where it ran)."""
        selection = Selection.of(**selection).to_dict()
        ray = _ray()
        avoid: set[int] = set()
        tries = 0
        while True:
            slot = self._acquire(avoid)
            job = f"{self._prefix}-{next(self._jobs)}"
            delivered = False
            finished = False
            try:
                gen = slot.handle.run.options(num_returns="streaming").remote(
                    job, url, processor, selection, stream)
                for ref in gen:
                    item = ray.get(ref)
                    if isinstance(item, Batch):
                        delivered = True
                        yield item
                    else:
                        finished = True
                        yield Report.from_dict(item)
                        return
                raise EngineError(f"the engine on {slot.node} ended the job without a report")
            except ray.exceptions.RayActorError as exc:
                self._lost(slot, exc)
                tries += 1
                if delivered or tries > len(self._slots):
                    yield Report.failed(url, f"node {slot.node} was lost mid-job"
                                       + (" after delivering results" if delivered else ""),
                                       node=slot.node)
                    return
                log.warning("node %s lost before job %s delivered anything: retrying", slot.node,
                            url)
                avoid.add(slot.index)
            except ray.exceptions.RayError as exc:
                yield Report.failed(url, f"on node {slot.node}: {_cause(exc)}", node=slot.node)
                return
            finally:
                self._release(slot)
                if not finished and not self._closed:
                    try:
                        slot.handle.cancel.remote(job)   # the consumer left early
                    except Exception:
                        pass

    def frames(self, url: str, **selection) -> Frames:
        """``Engine.frames`` on the least busy engine: the frames come back through Ray's
        object store (shared memory where the job ran on this node)."""
        selection = Selection.of(**selection).to_dict()
        ray = _ray()
        slot = self._acquire(set())
        try:
            array, numbers, report = ray.get(slot.handle.frames.remote(url, selection))
        except ray.exceptions.RayError as exc:
            report = Report.failed(url, f"on node {slot.node}: {_cause(exc)}",
                                   node=slot.node).to_dict()
            array, numbers = None, []
        finally:
            self._release(slot)
        report = Report.from_dict(report)
        raise_for(report)
        return Frames(array, numbers, report)

    def prewarm(self, origins) -> int:
        """Every engine opens pooled connections to these origins; returns how many."""
        ray = _ray()
        if isinstance(origins, str):
            origins = [origins]
        refs = [s.handle.prewarm.remote(tuple(origins)) for s in self._slots if s.up]
        return sum(ray.get(refs, timeout=120.0))

    def status(self) -> dict:
        """Every node: its engines (node, GPUs, jobs, restarts) with each engine's own
        status, and the nodes Ray knows."""
        ray = _ray()
        slots = list(self._slots)
        refs = {s.index: s.handle.status.remote() for s in slots if s.up}
        local = {}
        for index, ref in refs.items():
            try:
                local[index] = ray.get(ref, timeout=10.0)
            except ray.exceptions.RayError as exc:
                local[index] = {"error": first_line(exc)}
        engines = [{"node": s.node, "state": "up" if s.up else "starting",
                    "kind": s.kind, "gpus": s.info.get("gpus", []), "pid": s.info.get("pid"),
                    "jobs_in_flight": s.inflight, "jobs_done": s.done,
                    "restarts": s.restarts, "last_error": s.last_error,
                    "engine": local.get(s.index)} for s in slots]
        nodes = [{"node": node_name(n.get("NodeManagerAddress", "?"), n["NodeID"]),
                  "alive": bool(n.get("Alive")),
                  "gpus": int(n.get("Resources", {}).get("GPU", 0)),
                  "engine_units": int(n.get("Resources", {}).get("engine", 0))}
                 for n in ray.nodes()]
        return {"cluster": self.address, "jobs_per_engine": self.per_engine,
                "engines": engines, "nodes": nodes}

    def close(self) -> None:
        """Stop every engine (explicitly: Ray's kill skips exit handlers), then the actors."""
        if getattr(self, "_lock", None) is None:
            return
        ray = _ray()
        with self._lock:
            if self._closed and not self._slots:
                return
            self._closed = True
            slots, self._slots = self._slots, []
            self._lock.notify_all()
        if ray.is_initialized():
            refs = [s.handle.shutdown.remote() for s in slots]
            try:
                ray.wait(refs, num_returns=len(refs), timeout=CLOSE_TIMEOUT_S)
            except Exception:
                pass
            for s in slots:
                try:
                    ray.kill(s.handle, no_restart=True)
                except Exception:
                    pass
            if self._owns_ray:
                ray.shutdown()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
