"""Shared memory: the only place where bytes are shared between processes.

Everything here is a named file in /dev/shm (``engine-<supervisor pid>-<n>...``),
so any process can open it by name and decord can open the video as a plain file.
"""
from shm.availability import AvailabilityMap
from shm.block import SharedBlock, ShmError, ShmFullError, segment_name
from shm.futex import Cancelled
from shm.ring import FrameRing
from shm.sweep import sweep_stale

__all__ = ["AvailabilityMap", "Cancelled", "FrameRing", "SharedBlock", "ShmError",
           "ShmFullError", "segment_name", "sweep_stale"]
