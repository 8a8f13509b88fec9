"""What runs inside each Ray actor of a cluster: an ordinary local engine."""
from __future__ import annotations

import os

from engine.api import Engine
from engine.config import Config
from engine.errors import EngineError
from engine.report import Report


def node_name(ip: str, node_id: str) -> str:
    """Names a node in reports and errors: its address, and the start of Ray's id (several
    nodes may share an address, as in a simulated cluster)."""
    return f"{ip}/{node_id[:8]}"


class EngineActor:
    """Runs inside a Ray actor: an ordinary local engine (its supervisor started with
    subprocess + exec, never a fork of the Ray worker), pinned to the actor's GPU through
    the CUDA_VISIBLE_DEVICES Ray set, which the supervisor inherits."""

    def __init__(self, config: Config):
        import ray
        ctx = ray.get_runtime_context()
        self.node = node_name(ray.util.get_node_ip_address(), ctx.get_node_id())
        self.gpus = [str(g) for g in ray.get_gpu_ids()]
        self.restarted = bool(ctx.was_current_actor_reconstructed)
        self._cancelled: set[str] = set()
        # cluster="": this engine is the local one, whatever ENGINE_CLUSTER says here
        self.engine = Engine(config=config, cluster="")

    def info(self) -> dict:
        return {"node": self.node, "gpus": self.gpus, "pid": self.engine.pid,
                "actor_pid": os.getpid(), "restarted": self.restarted,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def prewarm(self, origins) -> int:
        return self.engine.prewarm(list(origins))

    def frames(self, url: str, selection: dict):
        """``Engine.frames`` here; the array goes back through Ray's object store."""
        try:
            got = self.engine.frames(url, **selection)
        except EngineError as exc:
            report = getattr(exc, "report", None)
            if report is None:
                raise
            return None, [], {**report.to_dict(), "node": self.node}
        return got.array, got.frame_numbers, {**got.report.to_dict(), "node": self.node}

    def status(self) -> dict:
        return self.engine.status()

    def run(self, job: str, url: str, processor, selection: dict, stream: bool):
        """The job's batches (as dicts) then its report; a cancelled job stops at the next
        batch (leaving the loop closes the local job's generator, which cancels it)."""
        try:
            for item in self.engine.submit(url, processor=processor, stream=stream,
                                           **selection):
                if isinstance(item, Report):
                    report = item.to_dict()
                    report["node"] = self.node
                    yield report
                    return
                if job in self._cancelled:
                    return
                yield item
        finally:
            self._cancelled.discard(job)

    def cancel(self, job: str) -> None:
        self._cancelled.add(job)

    def shutdown(self) -> None:
        """Ray's kill skips exit handlers: the engine is stopped here, before it."""
        self.engine.close()
