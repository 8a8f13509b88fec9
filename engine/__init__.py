"""engine: a video URL in, decoded frames through a GPU model out, everything overlapped.

The names below load on first use: a worker process imports ``engine.workers...`` and
with it this package, and must not pay for the client API it never uses.
"""
from engine.errors import (DecodeError, EngineBusy, EngineClosed, EngineError, FetchError,
                           JobTimeout, ProcessorError, SelectionError)

_API = ("Engine", "EngineClient")
_REPORT = ("Batch", "Frames", "Report", "VideoResult")
_AIO = ("AsyncEngine", "AsyncEngineClient")

__all__ = ["AsyncEngine", "AsyncEngineClient", "Batch", "DecodeError", "Engine", "EngineBusy",
           "EngineClient", "EngineClosed", "EngineError", "FetchError", "Frames", "JobTimeout",
           "ProcessorError", "Report", "SelectionError", "VideoResult"]


def __getattr__(name):
    if name in _API:
        from engine import api
        return getattr(api, name)
    if name in _REPORT:
        from engine import report
        return getattr(report, name)
    if name in _AIO:
        from engine import aio
        return getattr(aio, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
