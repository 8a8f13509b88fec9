"""Serve mode: this process becomes the supervisor and takes jobs on a Unix socket."""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys

from multiprocess.connection import Listener

from engine.config import Config, default_socket_path
from engine.errors import EngineError
from engine.selection import Selection

log = logging.getLogger("engine")


def _claim_socket(path: str) -> None:
    """Remove a socket left by a dead engine; refuse to steal a live one."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError as exc:
        raise EngineError(f"cannot use socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise EngineError(f"an engine is already serving on {path}")


def serve(args) -> int:
    from engine.supervisor import Supervisor

    path = args.socket or default_socket_path()
    _claim_socket(path)
    cluster = getattr(args, "cluster", None)
    cluster = Config.from_env().cluster if cluster is None else cluster
    if cluster:
        from engine.cluster.server import serve_cluster
        return serve_cluster(args, cluster, path)
    config = Config.from_env().with_(processor=args.processor, device=args.device,
                                     max_frames=Selection.of(max_frames=args.max_frames).max_frames)
    old = os.umask(0o177)   # the socket is born 0600: only this user may submit jobs
    try:
        listener = Listener(path, family="AF_UNIX")
    except OSError as exc:
        raise EngineError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    # The CLI gives SIGPIPE its default action (so `| head` ends quietly); a long-running
    # engine must not die of a broken pipe to a client or a worker: it is an error it handles.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    sup = Supervisor(config, listener)
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    sup.start()
    metrics = None
    if args.metrics_port:
        from engine.metrics import start_metrics
        try:
            metrics = start_metrics(args.metrics_port, sup)
        except OSError as exc:
            sup.shutdown()
            raise EngineError(f"cannot serve metrics on port {args.metrics_port}: "
                              f"{exc.strerror}") from None
    print(f"engine serving on {path} (pid {os.getpid()}); stop with Ctrl-C or SIGTERM",
          file=sys.stderr, flush=True)
    try:
        sup.run()
    except Exception as exc:   # the loop itself broke; shutdown has unlinked the segments
        log.exception("the supervisor loop failed")
        raise EngineError(f"the engine cannot go on: {type(exc).__name__}: {exc}") from None
    finally:
        if metrics is not None:
            metrics.shutdown()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return 0
