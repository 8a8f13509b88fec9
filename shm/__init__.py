"""Shared memory: the only place where bytes are shared between processes.

Everything here is a named file in /dev/shm (``engine-<supervisor pid>-<n>...``),
so any process can open it by name and decord can open the video as a plain file.
"""
from engine.shm.availability import AvailabilityMap
from engine.shm.block import SharedBlock, ShmError, ShmFullError, segment_name
from engine.shm.futex import Cancelled
from engine.shm.ring import FrameRing
from engine.shm.sweep import sweep_stale

__all__ = ["AvailabilityMap", "Cancelled", "FrameRing", "SharedBlock", "ShmError",
           "ShmFullError", "segment_name", "sweep_stale"]
