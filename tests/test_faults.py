"""Fault injection through real processes and the real nginx CDN.

Every test starts its own engine (never the shared ``engine`` fixture: these tests
kill its processes), breaks one thing on purpose -- a signal to one worker, to the
supervisor, or a server that stalls -- and checks what the engine promises:

* fetcher dies mid-download: the job still completes, byte-exact, and the fetcher is
  restarted;
* decoder or GPU worker dies mid-job (before the first result, mid-stream, during the
  last batch): the job goes on with the restarted worker and is frame-exact; a
  per-video processor's video starts again from frame 0, or, once its results reached
  the client, the job fails with one line; a worker that dies twice on one job fails it
  with one line and the engine serves on;
* supervisor dies: its workers follow it, and the next engine start sweeps the shared
  memory it left behind;
* the process that owns the engine (a miner) dies: the supervisor stops cleanly, its
  workers exit and its segments are unlinked at once;
* a server stalls: the job ends with ``JobTimeout`` at its deadline and takes its
  segments with it;
* many jobs in a row leak neither memory, file descriptors nor segments;
* concurrent jobs of different sizes and layouts are all frame-exact.

Four engine bugs that these tests found are fixed; their tests stay as regression
tests: a supervisor killed under a still-referenced ``Engine`` was a zombie whose
segments no later start swept (``shm.sweep.alive``); a GPU worker death between a
job's GpuJob and its first batch left that job hanging until its deadline; a job
submitted while the GPU worker was restarting failed instead of waiting for it; a
``max_frames`` job needing more than the head hung until its deadline, then (after a
first fix) lost its last 1-2 frames.

After every test, ``own_engine`` checks that no process of that engine remains and no
segment named after its supervisor pid is left in /dev/shm.

Everything is bounded in time: jobs run in threads that are joined with a timeout,
and every wait polls against a deadline. Each fault also records what the engine did,
how long recovery took and what was lost; the table is printed at the end of the
module (run with ``-s`` to see it).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from engine import DecodeError, Engine, EngineClosed, JobTimeout, ProcessorError
from engine.shm.sweep import owned_blocks
from tests.conftest import NULL, STATS, gone, wait_for
from tests.reference import assert_matches, reference
from engine.demo.emulator import CdnEmulator, Profile

# One row per fault, printed by ``fault_table`` after the module's last test.
FAULTS: list[dict] = []


# ------------------------------------------------------------------ helpers

class Owned:
    """An engine of this test, and every process it was seen to have."""

    def __init__(self, **overrides):
        overrides.setdefault("processor", NULL)
        overrides.setdefault("job_timeout_s", 60.0)
        self.eng = Engine(device="cpu", **overrides)
        self.pid = self.eng.pid
        self.seen: dict[int, psutil.Process] = {}
        self.remember()

    def remember(self) -> list[psutil.Process]:
        """Note the supervisor and its descendants now (restarted workers included)."""
        try:
            sup = psutil.Process(self.pid)
            procs = [sup] + sup.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self.seen.setdefault(p.pid, p)
        return procs

    def close_and_check(self, check: bool = True) -> None:
        self.remember()
        self.eng.close()
        if not check:
            return
        procs = list(self.seen.values())
        wait_for(lambda: all(gone(p) for p in procs), 10,
                 f"engine {self.pid}'s processes to exit: "
                 f"{[p.pid for p in procs if not gone(p)]}")
        left = owned_blocks(self.pid)
        assert left == [], f"segments of engine {self.pid} left after close(): {left}"


@contextlib.contextmanager
def own_engine(**overrides):
    """An engine of this test. After it: no process of it and no segment of it remains."""
    owned = Owned(**overrides)
    try:
        yield owned
    except BaseException:
        owned.close_and_check(check=False)   # the test's own failure is the one to report
        raise
    owned.close_and_check()


class JobThread(threading.Thread):
    """One ``process`` call in a thread, so that the test can break things meanwhile."""

    def __init__(self, eng: Engine, url: str, **options):
        super().__init__(daemon=True, name=f"job {url}")
        self.eng, self.url, self.options = eng, url, options
        self.report = None
        self.error: BaseException | None = None
        self.started_at = self.ended_at = None
        self.start()

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            self.report = self.eng.process(self.url, **self.options)
        except BaseException as exc:   # noqa: BLE001 - handed to the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def outcome(self, timeout: float):
        self.join(timeout)
        assert not self.is_alive(), f"job {self.url} did not end within {timeout:g} s"
        return self.report, self.error


def role_info(eng: Engine, role: str) -> dict:
    return next(p for p in eng.status()["processes"] if p["role"] == role)


def wait_respawned(eng: Engine, role: str, old_pid: int, timeout: float = 30) -> dict:
    """The status once ``role`` runs under a pid other than ``old_pid``."""
    def check():
        info = role_info(eng, role)
        return info if info["pid"] not in (None, old_pid) else None
    return wait_for(check, timeout, f"{role} to be restarted", every=0.02)


def wait_all_ready(eng: Engine, timeout: float = 60) -> None:
    """Block until every worker has said Hello (a restarted worker is not ready until
    its Hello). Ask only after the restart is visible in ``status()``: before that, the
    supervisor may still count the dead worker as ready."""
    eng.wait_ready(timeout)


def job_in_flight(eng: Engine) -> dict | None:
    jobs = eng.status()["jobs_in_flight"]
    return jobs[0] if jobs else None


def idle_segments(pid: int, jobs: int) -> list[str]:
    """The segments of an engine with no job in flight after ``jobs`` jobs, checked: only
    idle frame rings may remain -- the supervisor keeps the rings of cleanly finished jobs
    for reuse (a reused ring keeps the name of the job that made it). No video segment,
    no availability map, no more rings than the jobs could have made."""
    left = owned_blocks(pid)
    others = [n for n in left if not n.endswith(".ring")]
    assert not others, f"segments of finished jobs remain: {others} (all: {left})"
    assert len(left) <= jobs, f"{len(left)} idle rings after {jobs} job(s): {left}"
    return left


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(fault: str, action: str, respawn_s=None, hello_s=None, recovered_s=None, lost=""):
    FAULTS.append({"fault": fault, "action": action, "respawn_s": respawn_s,
                   "hello_s": hello_s, "recovered_s": recovered_s, "lost": lost})


def _s(x) -> str:
    return "-" if x is None else f"{x:.2f}"


@pytest.fixture(scope="module", autouse=True)
def fault_table():
    yield
    if not FAULTS:
        return
    print("\n\nFault table (seconds from the fault: respawn = new pid in status, "
          "hello = every worker ready again, recovered = job done / next job ok)")
    print(f"{'fault':<40} {'respawn':>7} {'hello':>6} {'recov':>6}  action / lost")
    for row in FAULTS:
        print(f"{row['fault']:<40} {_s(row['respawn_s']):>7} {_s(row['hello_s']):>6} "
              f"{_s(row['recovered_s']):>6}  {row['action']}")
        if row["lost"]:
            print(f"{'':<64}lost: {row['lost']}")


# ------------------------------------------------------------------ 1. fetcher

def test_fetcher_sigkill_mid_download_job_completes_byte_exact(cdn, slow_cdn, sn44_clips):
    path = sn44_clips["sn44"]
    with own_engine(fetchers=2, connections=2, range_mb=1, report_sha256=True) as owned:
        eng = owned.eng
        victim = role_info(eng, "fetcher0")
        job = JobThread(eng, slow_cdn.url("/sn44.mp4"))
        # Mid-download: the head and a few ranges are in, most of the file is not.
        wait_for(lambda: (j := job_in_flight(eng)) and 2e6 <= j["bytes"], 30,
                 "the download to be under way")
        conns = [c for c in psutil.Process(victim["pid"]).net_connections("tcp")
                 if c.raddr and c.raddr.port == slow_cdn.port
                 and c.status == psutil.CONN_ESTABLISHED]
        assert conns, "fetcher0 holds no connection to the CDN: it would not lose anything"
        before = job_in_flight(eng)["bytes"]
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        info = wait_respawned(eng, "fetcher0", victim["pid"])
        respawn = time.monotonic() - killed_at
        owned.remember()
        wait_all_ready(eng)
        hello = time.monotonic() - killed_at
        # The restarted fetcher takes part in the rest of the download.
        wait_for(lambda: [c for c in psutil.Process(info["pid"]).net_connections("tcp")
                          if c.raddr and c.raddr.port == slow_cdn.port], 10,
                 "the restarted fetcher0 to fetch ranges of the job")

        report, error = job.outcome(120)
        assert error is None, f"the job failed after a fetcher died: {error!r}"
        assert report.ok and report.frames_processed == 750
        assert report.fetch["sha256"] == sha256_of(path), "bytes differ from the file"
        assert report.fetch["bytes"] == path.stat().st_size
        assert info["restarts"] >= 1 and info["pid"] != victim["pid"]
        assert "SIGKILL" in (info["last_restart_cause"] or "")
        other = role_info(eng, "fetcher1")
        assert other["pid"] is not None and other["restarts"] == 0
        again = eng.process(cdn.url("small.mp4"))
        assert again.ok and again.frames_processed == 50
        record("fetcher0 SIGKILL mid-download", "its in-flight ranges requeued first in "
               "line; fetcher0 restarted and fetched the rest with fetcher1; job completed "
               "byte-exact (sha256 ok)",
               respawn, hello, job.ended_at - killed_at,
               f"nothing ({len(conns)} open range request(s) refetched; job had "
               f"{before / 1e6:.1f} of {path.stat().st_size / 1e6:.1f} MB reported)")


# ------------------------------------------------------------------ 2. decoder and GPU worker
# A worker killed mid-job costs no job (engine.resume). The gated processor holds the
# batch of one frame until the test has killed a worker, so each kill lands at a known
# point of the job; small batches (ENGINE_BATCH=4, a ring of 8 frames) keep the decoder
# at work, blocked on the full ring, while it waits.

GATED = "tests.processors:gated"
POINTS = {"before the first result": 0, "mid-stream": 10, "during the last batch": 49}


class Gate:
    def __init__(self, path, frame: int):
        self.path, self.frame = path, frame

    def reached(self) -> bool:
        return self.path.with_suffix(".reached").exists()

    def open(self) -> None:
        self.path.with_suffix(".open").touch()


@pytest.fixture
def gate(tmp_path, monkeypatch):
    """``gate(frame)``: the gated processors hold the batch of ``frame`` until opened."""
    def make(frame: int) -> Gate:
        monkeypatch.setenv("ENGINE_TEST_GATE", str(tmp_path / "gate"))
        monkeypatch.setenv("ENGINE_TEST_GATE_FRAME", str(frame))
        return Gate(tmp_path / "gate", frame)
    return make


class StreamThread(JobThread):
    """``stream`` instead of ``process``: ``batches`` are what reached the client."""

    def run(self) -> None:
        self.batches = []
        self.started_at = time.monotonic()
        try:
            for item in self.eng.stream(self.url, **self.options):
                self.batches.append(item)
        except BaseException as exc:   # noqa: BLE001 - handed to the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()


def kill_at_gate(owned: Owned, role: str, gate: Gate, job: JobThread, sig=signal.SIGKILL):
    """Kill ``role`` once the processor holds the gated frame; open the gate once the
    worker is back. Returns the job's outcome and the worker's status; ``job.killed_at``
    is when it was killed."""
    eng = owned.eng
    victim = role_info(eng, role)
    wait_for(gate.reached, 60, f"the processor to reach frame {gate.frame}")
    job.killed_at = time.monotonic()
    os.kill(victim["pid"], sig)
    info = wait_respawned(eng, role, victim["pid"])
    owned.remember()
    gate.open()
    return (*job.outcome(90), info)


@pytest.mark.parametrize("role", ["decoder0", "gpu"])
@pytest.mark.parametrize("point", POINTS)
def test_a_worker_killed_mid_job_costs_no_job(cdn, small_clips, gate, role, point):
    g = gate(POINTS[point])
    with own_engine(processor=GATED, decoders=1, batch=4) as owned:
        job = JobThread(owned.eng, cdn.url("small.mp4"))
        report, error, info = kill_at_gate(owned, role, g, job)
        assert error is None, f"{role} killed {point}: {error!r}"
        assert_matches(report, reference(small_clips["small"]))
        assert report.ok and report.missing_frames == []
        assert info["restarts"] == 1 and "SIGKILL" in info["last_restart_cause"]
    record(f"{role} SIGKILL {point}", "job went on with the new worker, frame-exact",
           None, None, job.ended_at - job.killed_at, "nothing")


@pytest.mark.parametrize("role", ["decoder0", "gpu"])
def test_a_streamed_job_s_worker_killed_mid_stream_costs_no_job(small_clips, faulty_server,
                                                                gate, role):
    """No Range support: streamed, no sample table; the new decoder decodes from the
    start and hands on only the frames after those delivered."""
    server = faulty_server(small_clips["small"].read_bytes(), "chunked")
    g = gate(10)
    with own_engine(processor=GATED, decoders=1, batch=4) as owned:
        job = JobThread(owned.eng, server.url("small.mp4"))
        report, error, info = kill_at_gate(owned, role, g, job)
        assert error is None, f"{role} killed: {error!r}"
        assert report.plan == "streamed"
        assert_matches(report, reference(small_clips["small"]))
    record(f"{role} SIGKILL mid-stream (streamed)", "job went on, frame-exact", None, None,
           job.ended_at - job.killed_at, "nothing")


@pytest.mark.parametrize("role", ["decoder0", "gpu"])
def test_a_worker_killed_mid_sparse_job_costs_no_job(cdn, gate, tmp_path, role):
    """A selection over many GOPs, its spans decoded in lanes with unselected frames
    skipped: the new worker goes on after the frames delivered, and every selected frame
    is the plain decode's."""
    from engine.demo.clips import make_clip
    path = make_clip(tmp_path / "gops.mp4", frames=260, width=320, height=240)
    (cdn.root / "fault-gops.mp4").write_bytes(path.read_bytes())
    chosen = [2, 40, 60, 110, 151, 200, 230, 259]
    g = gate(110)
    # a ring of two slots: the decoder waits, mid-job, for the held batch to be answered
    with own_engine(processor=GATED, decoders=1, batch=2, ring_slots=2,
                    decode_lanes=3) as owned:
        job = JobThread(owned.eng, cdn.url("fault-gops.mp4"), frames=chosen)
        report, error, info = kill_at_gate(owned, role, g, job)
    assert error is None, f"{role} killed mid sparse job: {error!r}"
    assert [r["frame_number"] for r in report.results] == chosen
    ref = reference(path)
    assert all(r["result"] == ref[r["frame_number"]] for r in report.results)
    assert info["restarts"] == 1


def test_a_decoder_segfault_mid_stream_costs_no_job(cdn, small_clips, gate):
    g = gate(10)
    with own_engine(processor=GATED, decoders=1, batch=4) as owned:
        job = JobThread(owned.eng, cdn.url("small-moov-end.mp4"))
        report, error, info = kill_at_gate(owned, "decoder0", g, job, signal.SIGSEGV)
        assert error is None, repr(error)
        assert_matches(report, reference(small_clips["small-moov-end"]))
        assert "SIGSEGV" in info["last_restart_cause"]


def test_a_per_video_processor_s_video_starts_again_on_the_new_gpu_worker(cdn, gate):
    g = gate(10)
    with own_engine(processor="tests.processors:per_video_gated", batch=4) as owned:
        job = JobThread(owned.eng, cdn.url("small.mp4"))
        report, error, _ = kill_at_gate(owned, "gpu", g, job)
        assert error is None, repr(error)
        assert [r["frame_number"] for r in report.results] == list(range(50))
        # the new handler saw every frame from frame 0, once, in order
        assert sum(report.video_result["batches"], []) == list(range(50))
        assert {r["result"]["handler"] for r in report.results} == \
            {report.video_result["handler"]}
    record("gpu SIGKILL mid-job, per-video processor", "video started again from frame 0 "
           "on the new GPU worker", None, None, job.ended_at - job.killed_at, "nothing")


def test_a_per_video_processor_whose_results_reached_the_client_fails_with_one_line(cdn, gate):
    g = gate(10)
    with own_engine(processor="tests.processors:per_video_gated", batch=4) as owned:
        job = StreamThread(owned.eng, cdn.url("small.mp4"))
        _, error, _ = kill_at_gate(owned, "gpu", g, job)
        assert isinstance(error, ProcessorError), repr(error)
        message = str(error)
        assert "\n" not in message and "GPU worker crashed (killed by signal SIGKILL) after " \
            "results of this video reached the client" in message, message
        assert job.batches and job.batches[0].frame_numbers[0] == 0
        again = owned.eng.process(cdn.url("small.mp4"))
        assert again.ok and again.frames_processed == 50
    record("gpu SIGKILL, per-video processor, results streamed", f"job failed: "
           f"'{message.split(': ', 1)[1]}'", None, None, None, "that job (its state is lost)")


def test_a_gpu_worker_that_dies_twice_on_a_job_fails_it_and_serves_on(cdn, small_clips):
    with own_engine(processor=STATS) as owned:
        job = JobThread(owned.eng, cdn.url("small.mp4"), processor="tests.processors:dies_on_frame_5")
        _, error = job.outcome(90)
        owned.remember()
        assert isinstance(error, ProcessorError), repr(error)
        message = str(error)
        assert "\n" not in message and "the GPU worker died 2 times on this job (last: " \
            "killed by signal SIGKILL)" in message, message
        again = owned.eng.process(cdn.url("small.mp4"))
        owned.remember()
        assert_matches(again, reference(small_clips["small"]))
        assert role_info(owned.eng, "gpu")["restarts"] == 2
    record("gpu dies on a frame (poison input)", f"job failed after the 2nd death: "
           f"'{message.split(': ', 1)[1]}'; next job ok", None, None, None, "that job")


def test_a_decoder_that_dies_twice_on_a_job_fails_it_and_serves_on(cdn, small_clips, gate):
    g = gate(0)
    with own_engine(processor=GATED, decoders=1, batch=4) as owned:
        eng = owned.eng
        job = JobThread(eng, cdn.url("small.mp4"))
        wait_for(g.reached, 60, "the processor to reach frame 0")
        for _ in range(2):
            victim = role_info(eng, "decoder0")
            os.kill(victim["pid"], signal.SIGKILL)
            wait_respawned(eng, "decoder0", victim["pid"])
            owned.remember()
            wait_all_ready(eng)     # its Hello hands it the job again
        g.open()
        _, error = job.outcome(60)
        assert isinstance(error, DecodeError), repr(error)
        assert "the decoder process died 2 times on this job" in str(error), str(error)
        again = eng.process(cdn.url("small.mp4"))
        assert_matches(again, reference(small_clips["small"]))


def test_job_submitted_while_the_gpu_worker_is_down_waits_for_it(cdn, small_clips):
    """A GPU worker that dies within 2 s of its start is restarted after a back-off
    (0.5 s); a job submitted in that window waits for the new worker.

    This was a bug, seen as a rare failure of the test above: the job's decode was
    dispatched while no GPU worker was alive, and its first batch failed it with "the GPU
    worker is not running"."""
    with own_engine(fetchers=1, connections=2) as owned:
        eng = owned.eng
        first = role_info(eng, "gpu")["pid"]
        os.kill(first, signal.SIGKILL)
        second = wait_respawned(eng, "gpu", first)["pid"]
        owned.remember()
        os.kill(second, signal.SIGKILL)     # a quick death: the next start is delayed
        wait_for(lambda: role_info(eng, "gpu")["pid"] is None, 10,
                 "the GPU worker to be down (restart back-off)", every=0.005)
        killed_at = time.monotonic()
        job = JobThread(eng, cdn.url("small.mp4"))
        info = wait_respawned(eng, "gpu", second)
        owned.remember()
        report, error = job.outcome(60)
        assert error is None, f"a job submitted while the GPU worker was down failed: {error!r}"
        assert report.frames_processed == 50
        assert info["restarts"] == 2
        record("gpu down (restart back-off) at submit", "the job waited for the new GPU "
               "worker", None, None, job.ended_at - killed_at, "nothing")


def test_gpu_worker_sigkill_before_first_batch_does_not_hang_the_job(cdn, sn44_clips):
    """The GPU worker dies after the job was announced to it (GpuJob, ring attached) but
    before its first batch: no result is lost, so the job completes on the restarted
    worker -- and must not wait for its deadline.

    This was a bug: the supervisor, on the GPU worker's death, failed only the jobs in w.jobs (jobs
    that had sent a BatchReady); this one was neither failed nor re-announced, the new
    GPU worker dropped its batches (no ring) without a reply, and it hung until
    JobTimeout."""
    # 100 kB/s in all and a 64 kB head: the decoder is dispatched once the head (with the
    # moov) is in, then waits ~2 s for the 278 kB that the first frame needs.
    trickle = Profile("trickle", 0.02, 0, None, 1e5)
    deadline = 20.0
    with CdnEmulator("127.0.0.1", cdn.port, trickle) as emu, \
            own_engine(fetchers=1, connections=2, head_kb=64, job_timeout_s=deadline) as owned:
        eng = owned.eng
        victim = role_info(eng, "gpu")
        job = JobThread(eng, emu.url("/sn44.mp4"))
        # The ring exists once the moov is parsed, right before the decode is dispatched.
        wait_for(lambda: any(n.endswith(".ring") for n in owned_blocks(owned.pid)), 15,
                 "the job's frame ring", every=0.01)
        time.sleep(0.1)    # the GpuJob and DecodeJob leave in the same supervisor step
        j = job_in_flight(eng)
        assert j and j["frames_done"] == 0, f"missed the window: {j}"
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        wait_respawned(eng, "gpu", victim["pid"])
        owned.remember()
        emu.set_total_rate(1e12)   # lift the throttle: the rest of the file comes at once
        report, error = job.outcome(deadline + 10)
        ended = job.ended_at - killed_at
        record("gpu SIGKILL before a job's 1st batch", f"job ended after {ended:.2f} s with "
               f"{type(error).__name__ if error else 'success'}"
               f"{' (BUG: hung until its deadline)' if isinstance(error, JobTimeout) else ''}",
               None, None, ended,
               "nothing had reached the GPU worker")
        assert error is None, (
            f"{ended:.1f} s after the GPU worker died the job ended with {error!r}")
        assert report.frames_processed == 750
        assert ended < 15, f"the job took {ended:.1f} s after the GPU worker died"


@pytest.mark.parametrize("name", ["sn44", "sn44-moov-end"])
def test_max_frames_needing_more_than_the_head_is_frame_exact(cdn, sn44_clips, name):
    """Found while building the test above (a max_frames job hung without any fault):
    22, 30 and 100 frames need 542 kB, 703 kB and 2 MB, more than the 512 kB head, and
    none of these ends on a 64 kB chunk boundary.

    This was a bug, twice: RangePlan.extend planned a prefix ending mid-chunk, a chunk
    AvailabilityMap.mark never flags, so the job hung until JobTimeout; once extend()
    rounded up to a chunk, DecodeJob.readable_end (then plan.planned_until) fell inside
    the next sample, the demuxer handed PyAV a truncated packet and, with frame
    threading, the last 1-2 frames never came out (ok=True, missing_frames=[N-2, N-1])."""
    problems = []
    with own_engine(processor=STATS, job_timeout_s=10) as owned:
        for frames in (22, 30, 100):
            report = owned.eng.report(cdn.url(f"{name}.mp4"), max_frames=frames)
            numbers = [r["frame_number"] for r in report.results]
            if not report.ok or numbers != list(range(frames)):
                problems.append(f"max_frames={frames}: ok={report.ok} {report.error_kind} "
                                f"{report.frames_processed} frames, missing "
                                f"{report.missing_frames}, {report.fetch['bytes']} bytes")
                continue
            assert_matches(report, reference(sn44_clips[name], frames))
    assert not problems, problems


# ------------------------------------------------------------------ 4. supervisor

@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_supervisor_sigkill_children_exit_and_next_start_sweeps(cdn, slow_cdn, reaped):
    """``zombie`` was a bug: shm.sweep.alive() took a zombie for a live process
    (os.kill(pid, 0) succeeds on one), so while the owner of a killed supervisor had not
    reaped it, no later engine start swept its segments."""
    with own_engine(fetchers=2, connections=2) as owned:
        eng, dead = owned.eng, owned.pid
        job = JobThread(eng, slow_cdn.url("/sn44.mp4"))
        # In flight with every kind of segment: video, availability map and frame ring.
        wait_for(lambda: (j := job_in_flight(eng)) and j["frames_done"] >= 10, 30,
                 "the job to be decoding")
        segs = owned_blocks(dead)
        assert {n.rsplit(".", 1)[-1] for n in segs} >= {"map", "ring"}, segs
        children = owned.remember()[1:]
        assert len(children) >= 5, children    # 2 fetchers, 2 decoders, gpu (+ tracker)
        killed_at = time.monotonic()
        os.kill(dead, signal.SIGKILL)
        wait_for(lambda: all(gone(p) for p in children), 2.0,
                 "every child of the killed supervisor to exit", every=0.01)
        children_s = time.monotonic() - killed_at
        report, error = job.outcome(10)
        assert isinstance(error, EngineClosed), f"expected EngineClosed, got {error!r}"
        left = owned_blocks(dead)
        assert left, "expected the killed supervisor's segments to still be there"
        if reaped:
            # What a parent that notices the death does: wait() for it (not close(),
            # which would unlink the dead engine's segments itself).
            os.waitpid(dead, 0)
        # else, as after an OOM kill of a supervisor whose Engine is still referenced:
        # it stays a zombie child of this process while the new engine starts.
        try:
            state = psutil.Process(dead).status()
        except psutil.NoSuchProcess:
            state = "reaped"
        started = time.monotonic()
        with own_engine() as fresh:
            up = time.monotonic() - started
            remaining = owned_blocks(dead)
            if remaining:
                record("supervisor SIGKILL, zombie not reaped", f"children exited in "
                       f"{children_s:.2f} s; new engine up in {up:.1f} s swept "
                       f"{len(left) - len(remaining)} of the {len(left)} segment(s) of the "
                       f"dead supervisor ({state})", None, None, None,
                       "every job in flight; BUG: segments stay until close() or exit")
            assert remaining == [], (
                f"the new engine (pid {fresh.pid}) did not sweep the segments of dead "
                f"supervisor {dead} (state: {state}): {remaining}")
            again = fresh.eng.process(cdn.url("small.mp4"))
            assert again.frames_processed == 50
        record(f"supervisor SIGKILL mid-job ({'reaped' if reaped else 'zombie'})",
               f"children exited in {children_s:.2f} s; client got EngineClosed; "
               f"{len(left)} segment(s) left ({', '.join(left)}), swept by the next start "
               f"({up:.1f} s to start)", None, None, up,
               "every job in flight; the engine must be recreated")


def test_owner_sigkill_engine_stops_and_unlinks_its_segments(slow_cdn, tmp_path):
    """The miner that owns an ``Engine`` is killed with SIGKILL mid-job: its supervisor
    stops as on SIGTERM, so its workers exit and its segments are unlinked at once (a
    supervisor that died with its owner would leave them for the next start's sweep)."""
    owner_code = (
        "import sys, threading, time\n"
        "from engine import Engine\n"
        "eng = Engine(processor='engine.processors:null', device='cpu', fetchers=1)\n"
        "print(eng.pid, flush=True)\n"
        f"threading.Thread(target=eng.process, args=({slow_cdn.url('/sn44.mp4')!r},),"
        " daemon=True).start()\n"
        "time.sleep(60)\n")
    owner = subprocess.Popen([sys.executable, "-c", owner_code], stdout=subprocess.PIPE,
                             text=True, cwd=tmp_path)
    try:
        sup = int(owner.stdout.readline())
        wait_for(lambda: any(n.endswith(".ring") for n in owned_blocks(sup)), 30,
                 "the owner's job to be decoding")
        procs = [psutil.Process(sup)] + psutil.Process(sup).children(recursive=True)
        killed_at = time.monotonic()
        owner.kill()
        owner.wait(5)
        wait_for(lambda: all(gone(p) for p in procs), 10,
                 "the engine of the killed owner to exit", every=0.01)
        exited = time.monotonic() - killed_at
        assert owned_blocks(sup) == [], f"segments left: {owned_blocks(sup)}"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(5)
    record("owner (miner) SIGKILL mid-job", f"supervisor and {len(procs) - 1} workers exited "
           f"in {exited:.2f} s, every segment unlinked", None, None, exited,
           "the owner's job")


# ------------------------------------------------------------------ 5. stalled server

def test_server_stall_ends_in_job_timeout_engine_stays_usable(cdn, small_clips, faulty_server):
    server = faulty_server(small_clips["small"].read_bytes(), "stall")
    with own_engine(job_timeout_s=3) as owned:
        eng = owned.eng
        started = time.monotonic()
        job = JobThread(eng, server.url("small.mp4"))
        wait_for(lambda: owned_blocks(owned.pid), 5, "the stalled job's segment")
        seen = owned_blocks(owned.pid)
        report, error = job.outcome(15)
        elapsed = time.monotonic() - started
        assert isinstance(error, JobTimeout), f"expected JobTimeout, got {error!r}"
        assert "deadline of 3 s" in str(error)
        assert 2.5 <= elapsed <= 6, f"JobTimeout after {elapsed:.2f} s for a 3 s deadline"
        assert server.requests >= 1
        left = owned_blocks(owned.pid)
        assert left == [], f"segments of the timed-out job remain: {left} (had {seen})"
        # The fetcher threads reading the stalled responses hang up once the job has ended
        # (at once, or after a short drain for a range that may still complete), instead
        # of holding their threads until the read timeout (which would come well after).
        from engine.workers.fetcher import DRAIN_S
        from engine.workers.pools import READ_TIMEOUT_S
        assert DRAIN_S + 3 < READ_TIMEOUT_S - 3
        wait_for(lambda: server.stalled and server.hung_up == server.stalled, DRAIN_S + 3,
                 "the engine to hang up every stalled response")
        hung_up = time.monotonic() - started - elapsed
        t = time.monotonic()
        following = eng.process(cdn.url("small.mp4"))
        assert following.ok and following.frames_processed == 50
        next_ok = time.monotonic() - t
        idle_segments(owned.pid, jobs=1)    # the timed-out job left none (above)
        record("server stalls mid-body (3 s deadline)", f"JobTimeout after {elapsed:.2f} s; "
               f"segments {seen} unlinked at once; its {server.stalled} stalled responses "
               f"hung up {hung_up:.2f} s later; next job on cdn ok in {next_ok:.2f} s",
               None, None, elapsed, "that job")


# ------------------------------------------------------------------ 6. 200 jobs

JOBS = 200


def test_many_jobs_memory_fds_and_segments_stay_flat(cdn):
    with own_engine(fetchers=2, connections=2, decoders=2) as owned:
        eng = owned.eng
        url = cdn.url("small.mp4")
        snapshots = {}
        times = []
        for n in range(1, JOBS + 1):
            t = time.monotonic()
            report = eng.process(url)
            times.append(time.monotonic() - t)
            assert report.frames_processed == 50, n
            left = idle_segments(owned.pid, jobs=n)
            if n == 1:
                pooled = left
            assert left == pooled, f"job {n}: idle segments changed: {pooled} -> {left}"
            if n in (1, JOBS):
                snapshots[n] = {p["role"]: p for p in eng.status()["processes"]}
                snapshots[n]["shm"] = eng.status()["shared_memory"]
        first, last = snapshots[1], snapshots[JOBS]
        shm1, shm200 = first.pop("shm"), last.pop("shm")
        print(f"\n/dev/shm of the engine after job 1: {shm1}, after job {JOBS}: {shm200} "
              f"(idle pooled ring(s) {pooled}; none of the video/map segments)")
        assert shm1 == shm200
        print(f"\n{JOBS} jobs of small.mp4 (null processor): {sum(times):.1f} s, "
              f"{1000 * sum(times[1:]) / (JOBS - 1):.0f} ms/job after the first "
              f"({1000 * times[0]:.0f} ms)")
        print(f"{'process':<11} {'rss@1':>7} {'rss@200':>8} {'d MB':>6} {'fds@1':>6} "
              f"{'fds@200':>8} {'d fds':>6}")
        problems = []
        for role, a in first.items():
            b = last[role]
            assert a["pid"] == b["pid"], f"{role} was restarted during the run"
            d_rss, d_fds = b["rss_mb"] - a["rss_mb"], b["open_files"] - a["open_files"]
            print(f"{role:<11} {a['rss_mb']:>7.1f} {b['rss_mb']:>8.1f} {d_rss:>+6.1f} "
                  f"{a['open_files']:>6} {b['open_files']:>8} {d_fds:>+6}")
            if d_rss >= 30:
                problems.append(f"{role} RSS grew {d_rss:+.1f} MB")
            if d_fds >= 10:
                problems.append(f"{role} fds grew {d_fds:+d}")
        assert not problems, problems


# ------------------------------------------------------------------ 7. concurrency

def test_four_concurrent_jobs_mixed_sizes_and_layouts_all_exact(cdn, small_clips, sn44_clips):
    names = ["small", "small-moov-end", "sn44", "sn44"]   # sn44 twice: the same URL at once
    paths = {**small_clips, **sn44_clips}
    with own_engine(processor=STATS, job_timeout_s=120) as owned:
        jobs = [JobThread(owned.eng, cdn.url(f"{name}.mp4")) for name in names]
        outcomes = [job.outcome(180) for job in jobs]
        for name, (report, error) in zip(names, outcomes):
            assert error is None, f"{name}: {error!r}"
            assert report.video["bytes"] == paths[name].stat().st_size
            assert_matches(report, reference(paths[name]))
        left = idle_segments(owned.pid, jobs=len(jobs))
        print(f"\nidle rings after 4 concurrent jobs: {left} "
              f"({owned.eng.status()['shared_memory']['bytes'] / 1e6:.0f} MB of /dev/shm)")
