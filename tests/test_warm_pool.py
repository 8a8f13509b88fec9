"""A job that ends with ranges still in flight (cancelled, a selection or max_frames met)
leaves the pool as warm as a full job does: the next job opens no connection."""
from __future__ import annotations

import pytest

from engine import Engine
from engine.demo.emulator import CdnEmulator, Profile
from tests.reference import assert_matches, reference


@pytest.fixture
def slow_link(cdn, sn44_clips):
    """nginx behind a link of 1 MB/s per connection: the ranges asked beside the first
    frame's take longer than that frame, so a job that ends after it has ranges in flight."""
    emu = CdnEmulator("127.0.0.1", cdn.port, Profile("slow", 0.005, 0, 1_000_000, None)).start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def warm_engine(slow_link):
    with Engine(processor="engine.processors:stats", device="cpu", fetchers=1, connections=3,
                job_timeout_s=90.0) as eng:
        yield eng


def _accepted(emu) -> int:
    return emu.stats()["connections_accepted"]


def test_a_cancelled_job_leaves_its_connections_pooled(warm_engine, slow_link, sn44_clips):
    url = slow_link.url("/sn44.mp4")
    for batch in warm_engine.stream(url):
        break                                   # cancels the job, ranges in flight
    opened = _accepted(slow_link)
    report = warm_engine.process(url, max_frames=5)
    assert report.fetch["connections_new"] == 0 and _accepted(slow_link) == opened
    assert_matches(report, reference(sn44_clips["sn44"], 5))


def test_a_job_done_early_leaves_its_connections_pooled(warm_engine, slow_link):
    url = slow_link.url("/sn44.mp4")
    first = warm_engine.process(url, max_frames=1)
    assert first.ok
    opened = _accepted(slow_link)
    after = warm_engine.process(url, every=100)
    assert after.ok and after.fetch["connections_new"] == 0 and _accepted(slow_link) == opened


def test_a_drained_connection_is_left_alone_once_the_next_job_uses_it(warm_engine, slow_link):
    """A range read to its end after its job ended goes back to the pool; the stalled-server
    fallback that would hang up on it must not reach that connection once the next job
    reuses it (a full download on this link outlasts the fallback's wait)."""
    url = slow_link.url("/sn44.mp4")
    assert warm_engine.process(url, max_frames=1).ok
    opened = _accepted(slow_link)
    after = warm_engine.process(url, processor="engine.processors:null")
    assert after.ok and after.fetch["retries"] == 0 and after.fetch["connections_new"] == 0
    assert _accepted(slow_link) == opened
