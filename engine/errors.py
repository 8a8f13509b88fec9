"""The errors a user of the engine sees. Every message is one line naming the cause.

Errors cross processes as an ``ErrorKind`` (a string in the JSON report); this module is
the one place that maps a kind to its exception class.
"""
from __future__ import annotations

import enum


class EngineError(Exception):
    """Base of every error the engine reports for a job or for itself."""


class FetchError(EngineError):
    """The video could not be downloaded (HTTP status, network, TLS, size, scheme)."""


class DecodeError(EngineError):
    """The bytes are not a decodable video (not MP4, no video track, corrupt, crash)."""


class ProcessorError(EngineError):
    """The processor failed to load or raised on a batch."""


class JobTimeout(EngineError):
    """The job passed its deadline (ENGINE_JOB_TIMEOUT_S)."""


class SelectionError(EngineError, ValueError):
    """The frame selection is malformed, or names a frame the video does not have."""


class EngineClosed(EngineError):
    """The engine is not running (closed, or its supervisor died)."""


class EngineBusy(EngineError):
    """The engine (or cluster) takes no more work now: too many clients or jobs."""


class ErrorKind(str, enum.Enum):
    """What went wrong, as it travels between processes and appears in a report."""
    ENGINE = "EngineError"
    FETCH = "FetchError"
    DECODE = "DecodeError"
    PROCESSOR = "ProcessorError"
    TIMEOUT = "JobTimeout"
    CLOSED = "EngineClosed"
    BUSY = "EngineBusy"
    SELECTION = "SelectionError"

    def __str__(self) -> str:
        return self.value

    @property
    def exception(self) -> type[EngineError]:
        return _CLASSES[self]


_CLASSES = {ErrorKind.ENGINE: EngineError, ErrorKind.FETCH: FetchError,
            ErrorKind.DECODE: DecodeError, ErrorKind.PROCESSOR: ProcessorError,
            ErrorKind.TIMEOUT: JobTimeout, ErrorKind.CLOSED: EngineClosed,
            ErrorKind.BUSY: EngineBusy, ErrorKind.SELECTION: SelectionError}


def error_from(kind: ErrorKind | str | None, message: str) -> EngineError:
    """The exception for an error that arrived from another process or a report."""
    try:
        return ErrorKind(kind or ErrorKind.ENGINE).exception(message)
    except ValueError:   # a kind this version does not know (a newer node of a cluster)
        return EngineError(message)


_KINDS = {cls: kind for kind, cls in _CLASSES.items()}


def kind_of(exc: BaseException) -> ErrorKind:
    """The kind an error travels as: that of its nearest class with one, so a subclass
    (a cluster's ``ClusterBusy``) arrives as what it is (``EngineBusy``)."""
    return next((_KINDS[c] for c in type(exc).__mro__ if c in _KINDS), ErrorKind.ENGINE)


def first_line(exc: BaseException) -> str:
    """An exception as one line: its message's first, else its class's name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
