"""The errors a user of the engine sees. Every message is one line naming the cause."""


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


class EngineClosed(EngineError):
    """The engine is not running (closed, or its supervisor died)."""


KINDS = {cls.__name__: cls for cls in (EngineError, FetchError, DecodeError, ProcessorError,
                                      JobTimeout, EngineClosed)}


def error_from(kind: str, message: str) -> EngineError:
    return KINDS.get(kind, EngineError)(message)
