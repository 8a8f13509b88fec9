"""The local engine's messages served over a cluster's dispatcher, so a client does not
change: serve mode's socket (``python -m engine run --cluster``) and the child process
behind ``Engine(cluster=...)`` (``python -m engine.cluster``) both run ``serve_connection``.
Errors travel with their kind (``engine.errors.kind_of``), as from a local engine.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading

import numpy as np

from engine.cluster.dispatch import ClusterEngine
from engine.errors import EngineError, first_line, kind_of
from engine.messages import (CancelJob, JobDone, Prewarm, ReleaseFrames, Reply, ResultBatch,
                             StatusQuery, Submit)
from engine.report import Batch, Report
from engine.selection import Selection
from engine.shm import SharedBlock
from engine.shm.block import segment_name


def format_status(st: dict) -> str:
    """``python -m engine status`` for a cluster: one row per engine, then the nodes."""
    lines = [f"cluster {st['cluster']}: {len(st['engines'])} engines, "
             f"{st['jobs_per_engine']} jobs each at most",
             f"{'node':<26}{'state':<10}{'gpus':<8}{'pid':>8}{'jobs':>6}{'done':>6}"
             f"{'restarts':>9}{'segments':>9}"]
    for e in st["engines"]:
        shm = ((e.get("engine") or {}).get("shared_memory") or {}).get("segments", "-")
        lines.append(f"{e['node']:<26}{e['state']:<10}{','.join(e['gpus']) or '-':<8}"
                     f"{e['pid'] or '-':>8}{e['jobs_in_flight']:>6}{e['jobs_done']:>6}"
                     f"{e['restarts']:>9}{shm:>9}")
    lines.append("nodes: " + ", ".join(
        f"{n['node']} ({'alive' if n['alive'] else 'dead'}, {n['gpus']} GPU"
        + (f", {n['engine_units']} engine" if n["engine_units"] else "") + ")"
        for n in st["nodes"]))
    return "\n".join(lines)


def _failed(msg: Submit, exc: EngineError) -> JobDone:
    report = getattr(exc, "report", None) or Report.failed(
        msg.url, first_line(exc), kind_of(exc), node="-")
    return JobDone(token=msg.token, report=report.to_dict())


def _run_job(cluster: ClusterEngine, msg: Submit, send, cancelled: threading.Event) -> None:
    try:
        for item in cluster.submit(msg.url, processor=msg.processor, stream=msg.stream,
                                   **msg.selection.to_dict()):
            if cancelled.is_set():
                return
            send(ResultBatch(token=msg.token, batch=item) if isinstance(item, Batch)
                 else JobDone(token=msg.token, report=item.to_dict()))
    except Exception as exc:   # noqa: BLE001 -- the client waits for an answer: always one
        send(_failed(msg, exc))


def _send_frames(cluster: ClusterEngine, msg: Submit, send, outputs: dict) -> None:
    """``frames`` as a local engine answers it: the frames in a shared block the client
    copies, then releases (``ReleaseFrames``)."""
    try:
        got = cluster.frames(msg.url, **msg.selection.to_dict())
        block = SharedBlock.create(segment_name(suffix=".out"), max(got.array.nbytes, 1))
    except Exception as exc:   # noqa: BLE001 -- a full /dev/shm included: always an answer
        send(_failed(msg, exc))
        return
    np.frombuffer(block.mm, np.uint8, count=got.array.nbytes)[:] = got.array.reshape(-1)
    outputs[block.name] = block
    got.report.video_result = {"output": block.name, "shape": list(got.array.shape),
                               "frame_numbers": got.frame_numbers}
    send(JobDone(token=msg.token, report=got.report.to_dict()))


def _answer(cluster: ClusterEngine, msg, send) -> None:
    try:
        payload = (cluster.status() if isinstance(msg, StatusQuery)
                   else {"opened": cluster.prewarm(list(msg.origins))})
        send(Reply(token=msg.token, payload=payload))
    except EngineError as exc:
        send(Reply(token=msg.token, payload={}, error=first_line(exc), kind=kind_of(exc)))


def serve_connection(cluster: ClusterEngine, conn) -> None:
    """One client's messages until it hangs up; its jobs are cancelled then."""
    lock = threading.Lock()
    cancels: dict[int, threading.Event] = {}
    outputs: dict[str, SharedBlock] = {}

    def send(m):
        with lock:
            try:
                conn.send(m)
            except (OSError, EOFError):
                pass
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if isinstance(msg, Submit):
            cancels[msg.token] = threading.Event()
            job = ((_send_frames, (cluster, msg, send, outputs)) if msg.return_frames
                   else (_run_job, (cluster, msg, send, cancels[msg.token])))
            threading.Thread(target=job[0], args=job[1], daemon=True).start()
        elif isinstance(msg, CancelJob):
            cancels.get(msg.token, threading.Event()).set()
        elif isinstance(msg, ReleaseFrames) and msg.output in outputs:
            outputs.pop(msg.output).unlink()
        elif isinstance(msg, (StatusQuery, Prewarm)):
            threading.Thread(target=_answer, args=(cluster, msg, send), daemon=True).start()
    for event in cancels.values():
        event.set()
    for block in outputs.values():
        block.unlink()


def _hang_up(conn) -> None:
    """Wake a ``recv`` blocked on ``conn``: its loop ends as when the client leaves."""
    try:
        socket.socket(fileno=os.dup(conn.fileno())).shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def serve_cluster(args, address: str, path: str) -> int:
    """Serve mode over a cluster: the local engine's socket and messages, so a miner that
    uses ``Engine.connect(socket)`` changes nothing; each job goes to the cluster."""
    from multiprocess.connection import Listener

    cluster = ClusterEngine(address, processor=args.processor, device=args.device,
                            max_frames=Selection.of(max_frames=args.max_frames).max_frames)
    old = os.umask(0o177)   # 0600, as the local engine's socket: only this user submits
    try:
        listener = Listener(path, family="AF_UNIX")
    except OSError as exc:
        cluster.close()
        raise EngineError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    stop = threading.Event()
    conns: list = []

    def accept():
        while not stop.is_set():
            try:
                conn = listener.accept()
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=serve_connection, args=(cluster, conn), daemon=True).start()

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=accept, name="cluster-accept", daemon=True).start()
    print(f"engine serving on {path} over the Ray cluster at {address} (pid {os.getpid()}); "
          "stop with Ctrl-C or SIGTERM", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        listener.close()
        for conn in conns:
            _hang_up(conn)
        cluster.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return 0


def main(conn, config) -> None:
    """The child behind ``Engine(cluster=...)``: its one client is the socket pair."""
    import logging

    from engine.workers.base import die_with_parent
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=config.log_level, format="%(asctime)s cluster %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: _hang_up(conn))
    # its owner gone, the cluster's actors are stopped as on close, not left running
    die_with_parent(signal.SIGTERM, on_orphan=lambda: _hang_up(conn))
    try:
        cluster = ClusterEngine(config.cluster, config=config)
    except EngineError as exc:
        conn.send(Reply(token=0, payload={}, error=first_line(exc), kind=kind_of(exc)))
        return
    try:
        serve_connection(cluster, conn)
    finally:
        cluster.close()
