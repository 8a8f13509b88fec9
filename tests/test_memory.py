"""Admission to shared memory: what fits, what waits, what can never fit. The memory
is given what /dev/shm has free, so these decisions need no /dev/shm of that size."""
from __future__ import annotations

from engine.config import Config
from engine.memory import ADMITTED, WAIT, Memory

MB = 1 << 20


def memory(free_mb: float, **config) -> Memory:
    """A memory with ``free_mb`` free in /dev/shm; ``m.free_mb`` changes it."""
    cfg = Config.from_env({}).with_(ring_mb=16, **config)
    m = Memory(cfg, free=lambda: int(m.free_mb * MB))
    m.free_mb = free_mb
    return m


def test_an_admitted_video_holds_its_ring_room_until_the_moov():
    m = memory(100)
    assert m.admit(1, 10 * MB) == ADMITTED
    assert m.reserved == {1: 16 * MB} and m.busy
    assert m.room() == 84 * MB


def test_a_video_that_fits_only_once_others_are_done_waits():
    m = memory(100)
    assert m.admit(1, 50 * MB) == ADMITTED
    m.free_mb -= 50             # its segment is made
    assert m.admit(2, 50 * MB) == WAIT
    assert not m.back(50 * MB)
    m.reserved.clear()          # the first job ended
    m.free_mb += 50
    assert m.back(50 * MB)


def test_the_videos_of_all_jobs_are_bounded_by_max_bytes():
    m = memory(1000, max_bytes=60 * MB)
    assert m.admit(1, 50 * MB) == ADMITTED
    m.held[1] = _Held(50 * MB)
    assert m.admit(2, 20 * MB) == WAIT


def test_alone_a_video_starts_with_a_small_ring_where_a_full_one_does_not_fit():
    m = memory(60)
    assert m.admit(1, 50 * MB) == ADMITTED
    assert m.reserved[1] == 10 * MB


def test_alone_and_too_big_is_one_clear_refusal():
    why = memory(10).admit(1, 20 * MB)
    assert why not in (ADMITTED, WAIT)
    assert "do not fit in the 10 MB of shared memory free" in why and "--shm-size" in why


class _Held:
    """A job holding a video segment of ``size`` bytes."""

    def __init__(self, size: int):
        self.size = size

    def video_bytes(self) -> int:
        return self.size

    def shm_bytes(self) -> int:
        return self.size


def test_frames_kept_for_a_client_count_as_memory_in_use():
    """An Engine.frames block waiting for its client to copy it out holds /dev/shm: a
    job that does not fit beside it waits instead of being refused as if alone."""
    m = memory(100)
    m.outputs["engine-1-1.out"] = (object(), 60 * MB)
    m.free_mb -= 60
    assert m.in_use == 60 * MB and m.busy
    assert m.admit(1, 30 * MB) == WAIT
    m.release_output(None, "engine-1-1.out")
    m.free_mb += 60
    assert not m.busy and m.admit(1, 30 * MB) == ADMITTED
