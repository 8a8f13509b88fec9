"""engine: a video URL in, decoded frames through a GPU model out, everything overlapped."""
from engine.api import Batch, Engine, EngineClient, Report, VideoResult
from engine.errors import (DecodeError, EngineClosed, EngineError, FetchError, JobTimeout,
                           ProcessorError)

__all__ = ["Batch", "DecodeError", "Engine", "EngineClient", "EngineClosed", "EngineError",
           "FetchError", "JobTimeout", "ProcessorError", "Report", "VideoResult"]
