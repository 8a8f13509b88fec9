"""The asyncio API: ``AsyncEngine`` and ``AsyncEngine.connect`` on a real engine, real
nginx, real clips.

What is checked:

* several jobs at once from one event loop (``gather``), each report exactly the
  reference decode; ``stream`` in frame order; errors as the blocking API's exceptions;
  an unknown option is a TypeError naming it, before anything is sent;
* a task cancelled before its first result (bytes still arriving over a slow link),
  mid-stream while batches arrive, and by ``asyncio.wait_for`` expiring: after each,
  the engine has no job in flight and none of its shared memory, and the next job on
  the same engine has every frame;
* ``AsyncEngine.connect`` against ``python -m engine run --socket PATH``;
* after each engine: none of its processes and none of its segments remain.
"""
from __future__ import annotations

import asyncio
import contextlib

import psutil
import pytest

from engine import AsyncEngine, EngineClosed, FetchError
from engine.demo.emulator import CdnEmulator, Profile
from engine.shm.sweep import owned_blocks
from tests.reference import assert_matches, reference
from tests.conftest import STATS, gone, run, served, wait_for

WAIT = "engine.processors:wait"


@contextlib.asynccontextmanager
async def owned_engine(**kw):
    """An AsyncEngine of this test; after it, none of its processes or segments remain."""
    eng = await AsyncEngine(device="cpu", fetchers=2, connections=2, **kw)
    tree = [psutil.Process(eng.pid)]
    try:
        tree += tree[0].children(recursive=True)
        yield eng
    finally:
        await eng.close()
    wait_for(lambda: all(gone(p) for p in tree), 10, "the engine's processes to exit")
    assert owned_blocks(tree[0].pid) == [], "segments left after the engine closed"


async def holds_nothing(eng, pid: int, pooled: set[str]) -> None:
    """No job in flight and no segment but the idle rings kept for the next job (the
    status query goes out after the cancel, on the same connection: it sees its effect)."""
    status = await eng.status()
    assert status["jobs_in_flight"] == []
    assert set(owned_blocks(pid)) <= pooled, "a cancelled job's segments remain"


async def clean_job(eng, pid: int, cdn, small_clips) -> set[str]:
    """A whole job with every frame; returns the segments the idle engine keeps."""
    report = await eng.process(cdn.url("small.mp4"), processor=STATS)
    assert_matches(report, reference(small_clips["small"]))
    return set(owned_blocks(pid))


# --------------------------------------------------------------------- owned engine
def test_many_jobs_from_one_loop(cdn, small_clips):
    async def scenario():
        async with owned_engine(processor=STATS) as eng:
            names = ["small", "small-moov-end"] * 3
            reports = await asyncio.gather(*(eng.process(cdn.url(f"{n}.mp4")) for n in names))
            for name, report in zip(names, reports):
                assert report.ok and report.plan == "planned"
                assert_matches(report, reference(small_clips[name]))

            order = [n async for b in eng.stream(cdn.url("small.mp4")) for n in b.frame_numbers]
            assert order == list(range(len(reference(small_clips["small"]))))
            assert eng.last_report.frames_processed == len(order)

            with pytest.raises(FetchError, match="404"):
                await eng.process(cdn.url("missing.mp4"))
            with pytest.raises(TypeError, match="'evry'"):
                await eng.process(cdn.url("small.mp4"), evry=2)
            assert (await eng.status())["jobs_in_flight"] == []
            limited = await eng.process(cdn.url("small.mp4"), max_frames=7)
            assert_matches(limited, reference(small_clips["small"], 7))

            both = await asyncio.gather(eng.frames(cdn.url("small.mp4"), count=4),
                                        eng.frames(cdn.url("small-moov-end.mp4"), fps=5.0))
            assert [b.frame_numbers for b in both] == [[0, 16, 32, 49], [0, 5, 10, 15, 20,
                                                                         25, 30, 35, 40, 45]]
            assert both[0].array.shape == (4, 240, 320, 3)
    run(scenario())


@pytest.fixture
def trickle(cdn):
    """nginx behind a very slow link: past its first burst, the small clip's next bytes
    take half a minute to come (a job is surely still fetching when it is cancelled)."""
    emu = CdnEmulator("127.0.0.1", cdn.port, Profile("trickle", 0.01, 0, 500, None)).start()
    try:
        yield emu
    finally:
        emu.stop()


def test_cancelled_tasks_cancel_their_jobs(cdn, small_clips, trickle, monkeypatch):
    # Each batch of the slow processor is held long enough that no job ends on its own
    # before the test cancels it; its frames are few per batch, so batches keep coming.
    monkeypatch.setenv("ENGINE_WAIT_MS_PER_FRAME", "1000")

    async def in_flight(eng):
        return (await eng.status())["jobs_in_flight"]

    async def scenario():
        async with owned_engine(processor=WAIT, batch=2) as eng:
            pid = eng.pid
            pooled = await clean_job(eng, pid, cdn, small_clips)

            # 1. before the first result: the bytes are still on their way
            task = asyncio.create_task(eng.process(trickle.url("small.mp4")))
            while not await in_flight(eng):
                await asyncio.sleep(0.05)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await holds_nothing(eng, pid, pooled)
            pooled = await clean_job(eng, pid, cdn, small_clips)

            # 2. mid-stream, while batches arrive
            got: list[int] = []
            first = asyncio.Event()

            async def consume():
                async for batch in eng.stream(cdn.url("small.mp4")):
                    got.extend(batch.frame_numbers)
                    first.set()

            task = asyncio.create_task(consume())
            await first.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert got and got == list(range(len(got))) and len(got) < 50
            await holds_nothing(eng, pid, pooled)
            pooled = await clean_job(eng, pid, cdn, small_clips)

            # 3. asyncio.wait_for expiring
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(eng.process(cdn.url("small.mp4")), 1.0)
            await holds_nothing(eng, pid, pooled)
            await clean_job(eng, pid, cdn, small_clips)
    run(scenario())


# --------------------------------------------------------------------- serve mode
def test_connect_to_a_serving_engine(tmp_path, cdn, small_clips):
    async def scenario(path, pid):
        async with AsyncEngine.connect(path) as client:
            names = ["small", "small-moov-end"]
            reports = await asyncio.gather(*(client.process(cdn.url(f"{n}.mp4"), processor=STATS)
                                             for n in names))
            for name, report in zip(names, reports):
                assert_matches(report, reference(small_clips[name]))
            pooled = set(owned_blocks(pid))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.process(cdn.url("small.mp4"), processor=WAIT), 0.5)
            await holds_nothing(client, pid, pooled)
            report = await client.process(cdn.url("small.mp4"), processor=STATS)
            assert_matches(report, reference(small_clips["small"]))

    with served(tmp_path, processor=STATS, ENGINE_WAIT_MS_PER_FRAME=1000,
                ENGINE_BATCH=2) as serving:
        run(scenario(serving.path, serving.proc.pid))


def test_connect_without_an_engine_says_so(tmp_path):
    async def scenario():
        with pytest.raises(EngineClosed, match="no engine is listening"):
            await AsyncEngine.connect(str(tmp_path / "none.sock"))
    run(scenario())


def test_options_become_the_submit_message_or_a_type_error_naming_them():
    from engine.api import submit_message
    msg = submit_message(3, "https://x/v.mp4", True, processor=STATS, max_frames=5)
    assert (msg.token, msg.url, msg.stream, msg.processor, msg.selection.max_frames) == \
        (3, "https://x/v.mp4", True, STATS, 5)
    with pytest.raises(TypeError, match="unknown job option 'evry'"):
        submit_message(4, "https://x/v.mp4", evry=2)


def test_cluster_empty_string_means_this_machine_even_with_engine_cluster_set(monkeypatch):
    from engine.aio import AsyncEngine
    monkeypatch.setenv("ENGINE_CLUSTER", "10.0.0.1:6379")
    assert AsyncEngine(cluster="").config.cluster == ""
