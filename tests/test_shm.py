"""Shared memory across real process boundaries: blocks, availability map, frame ring, sweep.

Why: the engine's processes share bytes only through ``shm``; a missed futex wake-up, a
cancel that does not reach a blocked reader, a ring that overwrites an unreleased slot or a
sweep that removes a live block would show up as hangs or corrupt frames far away from here.
Every cross-process part runs in spawned processes (or ``python -c`` subprocesses) that only
attach; every wait is bounded, and every block made here is unlinked.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import multiprocess
import numpy as np
import pytest

from engine.shm import (AvailabilityMap, Cancelled, FrameRing, SharedBlock, ShmError, ShmFullError,
                 sweep_stale)
from engine.shm.block import PREFIX, SHM_DIR, unlink_block
from engine.shm.ring import FREE, WRITING, WRITTEN, SlotRun

CTX = multiprocess.get_context("spawn")
ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
CHUNK = 64 * 1024
JOIN_S = 15.0  # every join / receive is bounded by this


# ----------------------------------------------------------------------------- helpers
def _pattern(seed: int, start: int, n: int) -> np.ndarray:
    """Bytes that depend on their absolute position and on ``seed`` (period 251, so no
    chunk or quarter looks like another)."""
    pos = np.arange(start, start + n, dtype=np.uint64)
    return ((pos * np.uint64(2 * seed + 3) + np.uint64(101 * seed + 7)) % np.uint64(251)).astype(np.uint8)


def _recv(conn, timeout: float = JOIN_S):
    """Receive one message from a pipe or fail the test (never hang)."""
    if not conn.poll(timeout):
        raise AssertionError(f"no message from the child within {timeout} s")
    return conn.recv()


def _state(tid: int) -> str:
    """Scheduler state of a thread (R, S, D, ...) from /proc."""
    stat = Path(f"/proc/{tid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def _wait_asleep_in_futex(tid: int, timeout: float = 5.0) -> None:
    """Until thread/process ``tid`` sleeps in the kernel (in a futex wait when /proc says)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _state(tid) == "S":
            try:
                wchan = Path(f"/proc/{tid}/wchan").read_text().strip()
            except OSError:
                wchan = ""
            if wchan in ("", "0") or "futex" in wchan:
                return
        time.sleep(0.0005)
    raise AssertionError(f"{tid} never went to sleep in a futex wait")


def _owned_by_me() -> list[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(f"{PREFIX}{os.getpid()}-t"))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _module_hygiene():
    """Nothing of ours stays in /dev/shm; stop multiprocess's resource tracker if we started it.

    Spawning starts that tracker (a ``python -c 'from multiprocess.resource_tracker ...'``
    child) which conftest's session check would count as an engine process left behind.
    Only stopped when this module started it, so a tracker serving a live engine is untouched.
    """
    from multiprocess import resource_tracker
    tracker = resource_tracker._resource_tracker
    was_running = tracker._fd is not None
    yield
    assert _owned_by_me() == []
    if not was_running:
        tracker._stop()


@pytest.fixture
def names():
    """Factory of unique ``engine-<this pid>-t...`` names; all unlinked after the test."""
    made: list[str] = []

    def new(suffix: str = "") -> str:
        name = f"{PREFIX}{os.getpid()}-t{uuid.uuid4().hex[:10]}{suffix}"
        made.append(name)
        return name

    yield new
    for name in made:
        unlink_block(name)


@pytest.fixture
def spawn():
    """Factory: start a spawned process running a module-level function; killed and joined after."""
    started = []

    def start(target, *args):
        p = CTX.Process(target=target, args=args, daemon=True)
        p.start()
        started.append(p)
        return p

    yield start
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(JOIN_S)


# ----------------------------------------------------------------------------- children
# Module level so that spawn can import them. Children only attach, never create or unlink.

def _quarter_writer(conn, block_name: str, map_name: str, index: int, lo: int, hi: int) -> None:
    """Write pattern ``index`` into [lo, hi) in irregular pieces, marking like the fetcher."""
    block, amap = SharedBlock.attach(block_name), AvailabilityMap.attach(map_name)
    rng = np.random.default_rng(index)
    conn.send("ready")
    assert conn.recv() == "go"
    pos = marked = lo
    while pos < hi:
        n = min(int(rng.integers(20_000, 400_000)), hi - pos)
        block.mm[pos:pos + n] = _pattern(index, pos, n).tobytes()
        pos += n
        amap.mark(marked, pos)  # the fetcher's rule: from the last chunk boundary to here
        marked = pos - pos % amap.chunk
        time.sleep(0.001)
    conn.send(("done", index))
    amap.close()
    block.close()


def _latency_waiter(conn, map_name: str, trials: int) -> None:
    """Per trial: say ready, block in wait() for chunk i, report when it woke."""
    amap = AvailabilityMap.attach(map_name)
    conn.send(("pid", os.getpid()))
    for i in range(trials):
        off = i * amap.chunk
        conn.send(("ready", i, amap.present(off, amap.chunk)))
        ok = amap.wait(off, amap.chunk, timeout=10)
        woke = time.perf_counter_ns()
        conn.send(("woke", i, ok, woke))
    amap.close()


def _timeout_waiter(conn, map_name: str, timeout: float) -> None:
    amap = AvailabilityMap.attach(map_name)
    cpu0, t0 = time.process_time(), time.monotonic()
    ok = amap.wait(0, amap.size, timeout=timeout)
    conn.send((ok, time.monotonic() - t0, time.process_time() - cpu0))
    amap.close()


def _cancel_waiter(conn, map_name: str) -> None:
    """Block in wait(); report Cancelled (and that a later wait raises it at once)."""
    amap = AvailabilityMap.attach(map_name)
    conn.send(("waiting", os.getpid()))
    try:
        ok = amap.wait(0, amap.size, timeout=10)
        conn.send(("returned", ok, time.perf_counter_ns()))
        return
    except Cancelled:
        conn.send(("cancelled", time.perf_counter_ns()))
    t0 = time.monotonic()
    try:
        amap.wait(0, 1, timeout=5)
        conn.send(("again", "returned", time.monotonic() - t0))
    except Cancelled:
        conn.send(("again", "cancelled", time.monotonic() - t0))
    amap.close()


def _cancel_reserver(conn, ring_name: str) -> None:
    """Fill the ring, then block in reserve(); report Cancelled."""
    ring = FrameRing.attach(ring_name)
    taken = [ring.reserve(timeout=5) for _ in range(ring.slots)]
    conn.send(("full", taken, os.getpid()))
    try:
        slot = ring.reserve(timeout=10)
        conn.send(("returned", slot, time.perf_counter_ns()))
    except Cancelled:
        conn.send(("cancelled", time.perf_counter_ns()))
    ring.close()


def _slow_writer(conn, block_name: str, map_name: str, stop_at: int | None, delay: float) -> None:
    """Write chunk after chunk, marking each when complete. At chunk ``stop_at`` write half
    of it, say so, and hang there (the parent kills us mid-write)."""
    block, amap = SharedBlock.attach(block_name), AvailabilityMap.attach(map_name)
    half = amap.chunk // 2
    for k in range(amap.n_chunks):
        lo = k * amap.chunk
        data = _pattern(k, lo, amap.chunk).tobytes()
        block.mm[lo:lo + half] = data[:half]
        if k == stop_at:
            conn.send(("half", k))
            time.sleep(60)
        time.sleep(delay)
        block.mm[lo + half:lo + amap.chunk] = data[half:]
        amap.mark(lo, lo + amap.chunk)
        conn.send(("marked", k))
    conn.send(("finished",))


def _frame(seq: int, h: int, w: int) -> np.ndarray:
    """Frame ``seq``: a position pattern, with seq in the first pixel (little endian)."""
    f = _pattern(seq, 0, h * w * 3).reshape(h, w, 3)
    f[0, 0] = (seq & 0xFF, (seq >> 8) & 0xFF, (seq >> 16) & 0xFF)
    return f


def _ring_producer(conn, ring_name: str, total: int, batch: int) -> None:
    """The decoder's side: reserve, write, publish runs of ``batch`` slots, send descriptors."""
    ring = FrameRing.attach(ring_name)
    seq = 0
    while seq < total:
        slots, times = [], []
        for _ in range(batch):
            cur = seq + len(slots)
            if cur == ring.slots:  # the ring is full now: this reserve must block
                conn.send(("blocking", cur))
            t0 = time.perf_counter_ns()
            slot = ring.reserve(timeout=10)
            times.append((t0, time.perf_counter_ns()))
            if slot is None:
                conn.send(("timeout", seq))
                return
            if cur == 0:  # let the parent see WRITING before anything is published
                conn.send(("reserved", slot))
                assert conn.recv() == "go"
            ring.frames[slot] = _frame(cur, ring.height, ring.width)
            slots.append(slot)
        run = SlotRun(slots[0], len(slots))
        assert slots == list(range(run.first, run.stop)), "a batch must be contiguous"
        ring.publish(run)
        conn.send(("run", run.first, run.count, list(range(seq, seq + batch)), times))
        seq += batch
    conn.send(("done",))
    ring.close()


_OWNER_SCRIPT = """
import os, sys, time
sys.path.insert(0, {root!r})
from engine.shm import AvailabilityMap, FrameRing, SharedBlock
base = f"engine-{{os.getpid()}}-1"
SharedBlock.create(base, 1 << 16)
AvailabilityMap.create(base + ".map", 1 << 20)
FrameRing.create(base + ".ring", 2, 16, 16)
print(os.getpid(), flush=True)
time.sleep(60)
"""


def _start_owner() -> tuple[subprocess.Popen, list[str]]:
    """A ``python -c`` process that creates three blocks named with its own pid, then idles."""
    proc = subprocess.Popen([sys.executable, "-c", _OWNER_SCRIPT.format(root=str(ROOT))],
                            stdout=subprocess.PIPE, cwd=ROOT)
    base = f"{PREFIX}{proc.pid}-1"
    return proc, [base, base + ".map", base + ".ring"]


def _read_line(proc: subprocess.Popen, timeout: float = JOIN_S) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"subprocess {proc.pid} printed nothing within {timeout} s"
    return proc.stdout.readline().decode().strip()


# ----------------------------------------------------------------------------- 1. writers
def test_concurrent_writers_of_disjoint_quarters(names, spawn):
    size, writers = 16 * MiB, 4
    quarter = size // writers
    assert quarter % CHUNK == 0
    block = SharedBlock.create(names(), size)
    amap = AvailabilityMap.create(names(".map"), size, CHUNK)
    pipes = []
    try:
        for i in range(writers):
            parent, child = CTX.Pipe()
            spawn(_quarter_writer, child, block.name, amap.name, i, i * quarter, (i + 1) * quarter)
            pipes.append(parent)
        for conn in pipes:
            assert _recv(conn) == "ready"
        assert amap.first_missing() == 0 and amap.bytes_present() == 0
        for conn in pipes:  # all four write at the same time
            conn.send("go")

        assert amap.wait(0, size, timeout=20), f"first missing: {amap.first_missing()}"
        assert amap.complete() and amap.first_missing() is None
        assert amap.bytes_present() == size
        assert sorted(_recv(conn) for conn in pipes) == [("done", i) for i in range(writers)]

        data = np.frombuffer(block.mm, np.uint8)
        for i in range(writers):
            lo = i * quarter
            expected = _pattern(i, lo, quarter)
            bad = np.flatnonzero(data[lo:lo + quarter] != expected)
            assert bad.size == 0, f"quarter {i}: {bad.size} wrong bytes, first at {lo + bad[0]}"
        del data
    finally:
        amap.close()
        block.close()


def test_mark_flags_only_completed_chunks(names):
    """The writer's contract (what the fetcher relies on): a chunk counts once a mark
    starting at or before its start reaches its end; the last chunk once the file end is
    reached; a mark starting inside a chunk never completes that chunk."""
    size = 3 * CHUNK + 100  # a short last chunk
    amap = AvailabilityMap.create(names(".map"), size, CHUNK)
    try:
        assert amap.n_chunks == 4
        amap.mark(0, CHUNK - 1)
        assert amap.first_missing() == 0 and amap.bytes_present() == 0
        assert amap.missing(0, size) == 4 * CHUNK and amap.missing(CHUNK, 2 * CHUNK) == CHUNK
        amap.mark(0, CHUNK + 10)
        assert amap.first_missing() == CHUNK and amap.bytes_present() == CHUNK
        amap.mark(CHUNK + 10, 2 * CHUNK)  # starts inside chunk 1: chunk 1 stays missing
        assert amap.first_missing() == CHUNK
        amap.mark(CHUNK, 2 * CHUNK)
        assert amap.first_missing() == 2 * CHUNK
        amap.mark(3 * CHUNK, size)  # the short last chunk, by reaching the end
        assert amap.first_missing() == 2 * CHUNK and amap.present(3 * CHUNK, 100)
        assert amap.bytes_present() == 2 * CHUNK + 100
        assert not amap.wait(0, size, timeout=0)
        assert amap.missing(0, size) == CHUNK and amap.missing(0, 2 * CHUNK) == 0
        amap.mark(2 * CHUNK, 3 * CHUNK)
        assert amap.complete() and amap.bytes_present() == size
        assert amap.missing(0, size) == 0
        assert amap.wait(0, size, timeout=0) and amap.wait(size - 1, 1000, timeout=0)
    finally:
        amap.close()


# ----------------------------------------------------------------------------- 2. wake-up
def _latency_trials(recv, mark, tid_of, trials: int) -> list[int]:
    """Shared parent loop: wait for the waiter to sleep, mark, collect wake-up latency (ns)."""
    lat = []
    for i in range(trials):
        kind, j, already = recv()
        assert (kind, j, already) == ("ready", i, False)
        _wait_asleep_in_futex(tid_of())
        t_mark = time.perf_counter_ns()
        mark(i)
        kind, j, ok, woke = recv()
        assert (kind, j, ok) == ("woke", i, True)
        assert woke > t_mark, f"trial {i}: wait() returned {t_mark - woke} ns before the mark"
        lat.append(woke - t_mark)
    return lat


def test_blocked_reader_wakes_on_mark_across_processes(names, spawn, capsys):
    trials = 50
    amap = AvailabilityMap.create(names(".map"), trials * CHUNK, CHUNK)
    try:
        # cross-process: a spawned child blocks in wait(); this process marks
        parent, child = CTX.Pipe()
        p = spawn(_latency_waiter, child, amap.name, trials)
        kind, pid = _recv(parent)
        assert kind == "pid" and pid == p.pid
        cross = _latency_trials(lambda: _recv(parent),
                                lambda i: amap.mark(i * CHUNK, (i + 1) * CHUNK),
                                lambda: pid, trials)
        p.join(JOIN_S)
        assert p.exitcode == 0

        # in-process, for comparison: a thread blocks in wait() on a second map
        tmap = AvailabilityMap.create(names(".tmap"), trials * CHUNK, CHUNK)
        try:
            a, b = CTX.Pipe()  # a pipe too, so both measurements carry the same overhead
            tid = []

            def waiter():
                tid.append(threading.get_native_id())
                for i in range(trials):
                    off = i * CHUNK
                    b.send(("ready", i, tmap.present(off, CHUNK)))
                    ok = tmap.wait(off, CHUNK, timeout=10)
                    b.send(("woke", i, ok, time.perf_counter_ns()))

            t = threading.Thread(target=waiter, daemon=True)
            t.start()
            try:
                local = _latency_trials(lambda: _recv(a),
                                        lambda i: tmap.mark(i * CHUNK, (i + 1) * CHUNK),
                                        lambda: tid[0], trials)
            finally:
                tmap.cancel()  # never leave the thread blocked
                t.join(JOIN_S)
        finally:
            tmap.close()
    finally:
        amap.close()

    cross_us, local_us = np.array(cross) / 1e3, np.array(local) / 1e3
    with capsys.disabled():
        print(f"\nfutex wake-up latency over {trials} trials (mark -> wait() returned):"
              f"\n  cross-process: median {np.median(cross_us):.1f} us, p99 {np.percentile(cross_us, 99):.1f} us,"
              f" max {cross_us.max():.1f} us"
              f"\n  in-process thread: median {np.median(local_us):.1f} us,"
              f" p99 {np.percentile(local_us, 99):.1f} us, max {local_us.max():.1f} us")
    assert np.median(cross_us) < 500_000 and np.median(local_us) < 500_000  # sanity only


def test_mark_from_another_process_wakes_every_waiter_and_only_when_complete(names, spawn):
    """A partial mark must not wake a waiter into returning; the completing mark wakes all."""
    amap = AvailabilityMap.create(names(".map"), 4 * CHUNK, CHUNK)
    try:
        pipes = []
        for _ in range(2):
            parent, child = CTX.Pipe()
            spawn(_cancel_waiter, child, amap.name)  # waits for the whole map, timeout 10 s
            pipes.append(parent)
        pids = [_recv(c)[1] for c in pipes]
        for pid in pids:
            _wait_asleep_in_futex(pid)
        amap.mark(0, 3 * CHUNK)  # bumps the word: both wake, re-check, sleep again
        for c in pipes:
            assert not c.poll(0.3), "wait() returned before the range was complete"
        for pid in pids:
            _wait_asleep_in_futex(pid)
        t_mark = time.perf_counter_ns()
        amap.mark(3 * CHUNK, 4 * CHUNK)
        for c in pipes:
            kind, ok, woke = _recv(c, 5)
            assert (kind, ok) == ("returned", True) and woke > t_mark
    finally:
        amap.close()


# ----------------------------------------------------------------------------- 3. timeouts
def test_wait_times_out_when_nothing_is_written(names, spawn):
    timeout = 0.3
    amap = AvailabilityMap.create(names(".map"), 8 * CHUNK, CHUNK)
    try:
        t0 = time.monotonic()
        assert amap.wait(0, CHUNK, timeout=timeout) is False
        took = time.monotonic() - t0
        assert timeout <= took < timeout + 1, took

        amap.mark(0, 4 * CHUNK)  # half of it: still a timeout for the whole
        t0 = time.monotonic()
        assert amap.wait(0, amap.size, timeout=timeout) is False
        assert timeout <= time.monotonic() - t0 < timeout + 1
        assert amap.wait(0, 4 * CHUNK, timeout=timeout) is True  # the present half: at once

        # in another process, and asleep rather than polling (almost no CPU time)
        parent, child = CTX.Pipe()
        p = spawn(_timeout_waiter, child, amap.name, 0.5)
        ok, took, cpu = _recv(parent)
        p.join(JOIN_S)
        assert ok is False and 0.5 <= took < 1.5, took
        assert cpu < 0.1, f"the waiter burned {cpu:.3f} s of CPU while waiting {took:.3f} s"
    finally:
        amap.close()


def test_reserve_times_out_on_a_full_ring(names):
    ring = FrameRing.create(names(".ring"), 2, 8, 8)
    try:
        assert [ring.reserve(timeout=1), ring.reserve(timeout=1)] == [0, 1]
        t0 = time.monotonic()
        assert ring.reserve(timeout=0.2) is None
        assert 0.2 <= time.monotonic() - t0 < 1.2
        assert list(ring.states()) == [WRITING, WRITING]
        ring.release(SlotRun(0, 1))     # the cursor stayed: the slot freed first is next
        assert ring.reserve(timeout=1) == 0
    finally:
        ring.close()


# ----------------------------------------------------------------------------- 4. cancel
def test_cancel_wakes_blocked_waiters_in_other_processes(names, spawn):
    amap = AvailabilityMap.create(names(".map"), 4 * CHUNK, CHUNK)
    try:
        pipes = []
        for _ in range(2):
            parent, child = CTX.Pipe()
            spawn(_cancel_waiter, child, amap.name)
            pipes.append(parent)
        for c in pipes:
            kind, pid = _recv(c)
            assert kind == "waiting"
            _wait_asleep_in_futex(pid)
        t_cancel = time.perf_counter_ns()
        amap.cancel()
        for c in pipes:
            kind, woke = _recv(c, 5)
            assert kind == "cancelled" and woke > t_cancel
            kind, how, took = _recv(c, 5)
            assert (kind, how) == ("again", "cancelled") and took < 0.5  # later waits: at once
        assert amap.cancelled
        amap.mark(0, amap.size)
        with pytest.raises(Cancelled):  # cancelled wins even over data that is present
            amap.wait(0, CHUNK, timeout=1)
    finally:
        amap.close()


def test_cancel_wakes_a_producer_blocked_in_reserve(names, spawn):
    ring = FrameRing.create(names(".ring"), 3, 8, 8)
    try:
        parent, child = CTX.Pipe()
        p = spawn(_cancel_reserver, child, ring.name)
        kind, taken, pid = _recv(parent)
        assert kind == "full" and taken == [0, 1, 2]
        _wait_asleep_in_futex(pid)
        assert not parent.poll(0.1)
        t_cancel = time.perf_counter_ns()
        ring.cancel()
        kind, woke = _recv(parent, 5)
        assert kind == "cancelled" and woke > t_cancel
        p.join(JOIN_S)
        assert p.exitcode == 0
        with pytest.raises(Cancelled):
            ring.reserve(timeout=1)
    finally:
        ring.close()


# ----------------------------------------------------------------------------- 5. SIGKILL
def test_writer_killed_mid_write_leaves_exactly_its_marked_chunks(names, spawn):
    n_chunks, stop_at = 32, 9
    size = n_chunks * CHUNK
    block = SharedBlock.create(names(), size)
    amap = AvailabilityMap.create(names(".map"), size, CHUNK)
    try:
        parent, child = CTX.Pipe()
        p = spawn(_slow_writer, child, block.name, amap.name, stop_at, 0.005)
        marked = []
        while True:
            msg = _recv(parent)
            if msg[0] == "half":
                assert msg[1] == stop_at
                break
            marked.append(msg[1])
        os.kill(p.pid, signal.SIGKILL)  # half of chunk stop_at written, not marked
        p.join(JOIN_S)
        assert p.exitcode == -signal.SIGKILL
        assert marked == list(range(stop_at))

        assert amap.first_missing() == stop_at * CHUNK
        assert amap.present(0, stop_at * CHUNK)
        assert not amap.present(stop_at * CHUNK, 1)
        assert amap.bytes_present() == stop_at * CHUNK and not amap.complete()
        t0 = time.monotonic()  # a reader of the missing part times out, it does not hang
        assert amap.wait(0, size, timeout=0.3) is False
        assert time.monotonic() - t0 < 1.3

        data = np.frombuffer(block.mm, np.uint8).copy()  # the whole block reads (no SIGBUS)
        for k in range(stop_at):
            assert np.array_equal(data[k * CHUNK:(k + 1) * CHUNK], _pattern(k, k * CHUNK, CHUNK)), k
        lo, half = stop_at * CHUNK, CHUNK // 2
        assert np.array_equal(data[lo:lo + half], _pattern(stop_at, lo, CHUNK)[:half])
        assert not data[lo + half:].any()

        # a retry (here: this process) completes the segment; the futex still works
        for k in range(stop_at, n_chunks):
            block.mm[k * CHUNK:(k + 1) * CHUNK] = _pattern(k, k * CHUNK, CHUNK).tobytes()
        amap.mark(stop_at * CHUNK, size)
        assert amap.wait(0, size, timeout=1) and amap.complete()
    finally:
        amap.close()
        block.close()
        paths = [block.path, amap.block.path]
        block.unlink()
        amap.unlink()
    assert not any(os.path.exists(x) for x in paths)


def test_writer_killed_at_a_random_moment_leaves_a_consistent_prefix(names, spawn):
    """Free-running writer killed whenever: present chunks are a prefix, each one complete
    and correct, and they are the reported ones (plus at most the one marked but not yet
    reported when the kill landed)."""
    n_chunks = 64
    size = n_chunks * CHUNK
    block = SharedBlock.create(names(), size)
    amap = AvailabilityMap.create(names(".map"), size, CHUNK)
    try:
        parent, child = CTX.Pipe()
        p = spawn(_slow_writer, child, block.name, amap.name, None, 0.002)
        reported = []
        while len(reported) < 10:
            reported.append(_recv(parent)[1])
        time.sleep(np.random.default_rng().uniform(0, 0.004))
        os.kill(p.pid, signal.SIGKILL)
        p.join(JOIN_S)
        assert p.exitcode == -signal.SIGKILL
        try:
            while parent.poll(0.2):
                msg = parent.recv()
                if msg[0] == "marked":
                    reported.append(msg[1])
        except EOFError:
            pass
        assert reported == list(range(len(reported)))

        missing = amap.first_missing()
        assert missing is not None
        n_present = missing // CHUNK
        assert amap.bytes_present() == n_present * CHUNK  # a prefix: nothing after the hole
        assert len(reported) <= n_present <= len(reported) + 1
        data = np.frombuffer(block.mm, np.uint8)
        for k in range(n_present):
            assert np.array_equal(data[k * CHUNK:(k + 1) * CHUNK], _pattern(k, k * CHUNK, CHUNK)), k
        del data
    finally:
        amap.close()
        block.close()


# ----------------------------------------------------------------------------- 6. ring
def test_ring_backpressure_zero_copy_and_no_drops(names, spawn):
    slots, h, w, total, batch = 4, 24, 32, 50, 2
    ring = FrameRing.create(names(".ring"), slots, h, w)
    try:
        assert list(ring.states()) == [FREE] * slots
        parent, child = CTX.Pipe()
        p = spawn(_ring_producer, child, ring.name, total, batch)

        # FREE -> WRITING, seen from here while the producer holds slot 0
        assert _recv(parent) == ("reserved", 0)
        assert list(ring.states()) == [WRITING, FREE, FREE, FREE]
        parent.send("go")

        # two runs fill the ring: WRITTEN; the 5th reserve blocks (backpressure)
        runs = [_recv(parent), _recv(parent)]
        assert [(m[0], m[1], m[2], m[3]) for m in runs] == [("run", 0, 2, [0, 1]), ("run", 2, 2, [2, 3])]
        assert _recv(parent) == ("blocking", slots)
        _wait_asleep_in_futex(p.pid)
        assert not parent.poll(0.3), "the producer reserved a slot of a full ring"
        assert list(ring.states()) == [WRITTEN] * slots

        seen = []

        def consume(first: int, count: int, seqs: list[int]) -> None:
            view = ring.view(SlotRun(first, count))
            assert view.shape == (count, h, w, 3)
            assert np.shares_memory(view, ring.frames)  # zero copy: a view of the mapping
            assert view.ctypes.data == ring.frames.ctypes.data + first * ring.frame_bytes
            assert list(ring.states()[first:first + count]) == [WRITTEN] * count
            for frame, seq in zip(view, seqs):
                got = int(frame[0, 0, 0]) | int(frame[0, 0, 1]) << 8 | int(frame[0, 0, 2]) << 16
                assert got == seq, f"slot holds frame {got}, descriptor says {seq}"
                assert np.array_equal(frame, _frame(seq, h, w)), f"frame {seq} corrupted"
                seen.append(seq)
            t = time.perf_counter_ns()
            ring.release(SlotRun(first, count))
            return t

        t_release = consume(0, 2, [0, 1])
        msg = _recv(parent)  # the blocked reserve returned only after the release
        assert msg[:4] == ("run", 0, 2, [4, 5])
        (t_asked, t_got) = msg[4][0]
        assert t_asked < t_release < t_got
        pending = [runs[1], msg]

        # the rest with a slow consumer: the producer keeps blocking, nothing is dropped
        while True:
            while pending:
                _, first, count, seqs, _ = pending.pop(0)
                time.sleep(0.005)
                consume(first, count, seqs)
            msg = _recv(parent)
            if msg == ("done",):
                break
            assert msg[0] == "run", msg
            pending.append(msg)
        p.join(JOIN_S)
        assert p.exitcode == 0
        assert seen == list(range(total))
        assert list(ring.states()) == [FREE] * slots  # -> FREE once consumed
    finally:
        ring.close()


def test_slot_states_in_one_process():
    """FREE -> WRITING -> WRITTEN -> FREE, step by step (deterministic complement)."""
    ring = FrameRing.create(f"{PREFIX}{os.getpid()}-t{uuid.uuid4().hex[:10]}.ring", 2, 4, 4)
    try:
        assert list(ring.states()) == [FREE, FREE]
        assert ring.reserve(timeout=1) == 0
        assert list(ring.states()) == [WRITING, FREE]
        ring.publish(SlotRun(0, 1))
        assert list(ring.states()) == [WRITTEN, FREE]
        ring.release(SlotRun(0, 1))
        assert list(ring.states()) == [FREE, FREE]
        assert ring.reserve(timeout=1) == 1 and ring.reserve(timeout=1) == 0  # wraps in order
    finally:
        ring.close()
        ring.unlink()


# ----------------------------------------------------------------------------- 7. sweep
def test_sweep_removes_blocks_of_a_killed_owner_only(names):
    mine = SharedBlock.create(names(), 4096)  # owned by this (live) process
    dead, dead_names = _start_owner()
    live, live_names = _start_owner()
    try:
        assert int(_read_line(dead)) == dead.pid
        assert int(_read_line(live)) == live.pid
        for n in dead_names + live_names:
            assert os.path.exists(os.path.join(SHM_DIR, n)), n
        stale_before = set(sweep_stale())  # leftovers of other dead processes, if any
        assert not stale_before & set(dead_names + live_names + [mine.name])

        dead.kill()
        dead.wait(JOIN_S)  # reaped: a zombie still counts as alive for kill(pid, 0)
        swept = sweep_stale()
        # exactly the dead owner's three; anything else swept belongs to some other dead pid
        # (other engines may share this /dev/shm), never to the live owner or to us
        assert sorted(n for n in swept if n.startswith(f"{PREFIX}{dead.pid}-")) == sorted(dead_names)
        assert not set(swept) & set(live_names + [mine.name])
        assert not any(os.path.exists(os.path.join(SHM_DIR, n)) for n in dead_names)
        assert all(os.path.exists(os.path.join(SHM_DIR, n)) for n in live_names)
        assert os.path.exists(mine.path)
        mine.mm[:4] = b"live"  # still mapped and usable
        assert bytes(SharedBlock.attach(mine.name).mm[:4]) == b"live"
        assert not set(sweep_stale()) & set(live_names + [mine.name])
    finally:
        for proc in (dead, live):
            if proc.poll() is None:
                proc.kill()
            proc.wait(JOIN_S)
            proc.stdout.close()
        for n in dead_names + live_names:
            unlink_block(n)
        mine.close()


# ----------------------------------------------------------------------------- 8, 9. errors
def test_block_larger_than_free_space_raises_shm_full(names):
    st = os.statvfs(SHM_DIR)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    size = max(free, total) + 64 * MiB  # above free space (and the mount: fails up front)
    name = names()
    with pytest.raises(ShmFullError) as info:
        SharedBlock.create(name, size)
    assert isinstance(info.value, ShmError)
    message = str(info.value)
    assert "/dev/shm" in message and "no room" in message and name in message
    assert f"{size / 1e6:.1f} MB" in message
    assert not os.path.exists(os.path.join(SHM_DIR, name))  # nothing left behind

    ring = names(".ring")  # the same through the ring (its size is computed)
    with pytest.raises(ShmFullError):
        FrameRing.create(ring, 4032, 4096, 4096)
    assert not os.path.exists(os.path.join(SHM_DIR, ring))


def test_a_growing_block_reserves_only_what_its_writer_asks(names):
    """A body of unknown length: the block is as large as it may become, /dev/shm gives
    only what ``grow`` reserved, and a grow past the free space is a ShmFullError (not a
    SIGBUS at the write), leaving what was reserved."""
    st = os.statvfs(SHM_DIR)
    size = max(st.f_bavail, st.f_blocks) * st.f_frsize + 64 * MiB
    block = SharedBlock.create(names(), size, reserve=MiB)
    try:
        def reserved():
            return os.stat(block.path).st_blocks * 512
        assert block.size == size and reserved() == MiB
        block.grow(2 * MiB)
        block.mm[2 * MiB - 1] = 7
        assert reserved() == 2 * MiB
        with pytest.raises(ShmFullError, match="no room"):
            block.grow(size)
        assert reserved() == 2 * MiB
    finally:
        block.close()


def test_a_body_of_unknown_length_ends_where_its_writer_says(names):
    amap = AvailabilityMap.create(names(".map"), 8 * CHUNK, CHUNK, length_known=False)
    try:
        assert amap.length is None
        amap.mark(0, 2 * CHUNK)
        assert not amap.wait(2 * CHUNK, CHUNK, timeout=0.05)     # more may come
        woke = []
        waiter = threading.Thread(target=lambda: woke.append(amap.wait(2 * CHUNK, 4 * CHUNK, 10)))
        waiter.start()
        time.sleep(0.1)
        amap.end(2 * CHUNK + 100)      # the last 100 bytes: a chunk only the end completes
        waiter.join(5)
        assert woke == [True]          # woken: the body ended before what it waited for
        assert amap.length == 2 * CHUNK + 100 and amap.present(0, 2 * CHUNK + 100)
        assert not amap.present(2 * CHUNK + 100, CHUNK)
    finally:
        amap.close()


def test_attach_of_a_missing_name_raises_shm_error(names):
    name = names()
    for attach in (SharedBlock.attach, AvailabilityMap.attach, FrameRing.attach):
        with pytest.raises(ShmError, match="does not exist"):
            attach(name)
    assert not os.path.exists(os.path.join(SHM_DIR, name))


def test_create_over_an_existing_name_raises_shm_error(names):
    """A leftover of an earlier engine that had our pid (pid reuse: sweep_stale keeps it,
    the pid is alive) collides with ``engine-<pid>-<job id>``; that must be a ShmError."""
    name = names()
    block = SharedBlock.create(name, 4096)
    try:
        with pytest.raises(ShmError, match="already exists"):
            SharedBlock.create(name, 4096)
    finally:
        block.close()


def test_create_and_attach_without_free_file_descriptors_raise_shm_error(names):
    """EMFILE is a ShmError with the cause, not a bare OSError (the supervisor turns a
    ShmError into one job's error); nothing is left behind."""
    name, existing = names(), names()
    block = SharedBlock.create(existing, 4096)
    try:
        code = textwrap.dedent(f"""
            import os, resource
            from engine.shm import SharedBlock, ShmError
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) - 1,) * 2)
            for call in (lambda: SharedBlock.create({name!r}, 4096),
                         lambda: SharedBlock.attach({existing!r})):
                try:
                    call()
                except ShmError as exc:
                    print(exc)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=JOIN_S * 10, cwd=os.getcwd())
        lines = out.stdout.splitlines()
        assert len(lines) == 2 and all("Too many open files" in line for line in lines), \
            (out.stdout, out.stderr)
        assert not os.path.exists(os.path.join(SHM_DIR, name))
    finally:
        block.close()
        block.unlink()

