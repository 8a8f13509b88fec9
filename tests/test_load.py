"""Starved resources and load, on a real engine in serve mode.

* /dev/shm small (a private tmpfs in a private mount namespace: ``unshare -m``, as root):
  the frame ring shrinks to fit, with one warning naming ``--shm-size``, frames exact;
  too small for the video: one clear error; filled by someone else while a job runs:
  that job is untouched, a new job waits for memory instead of failing;
* too many open files (the supervisor's RLIMIT_NOFILE lowered under it): the job that
  cannot get a segment fails with one line, the next one succeeds;
* a job over ENGINE_MAX_BYTES, and one that does not fit yet, arriving while another
  runs: the first fails at once, the second waits for memory, the running one is exact;
* 32 clients at once, good and bad URLs, some disconnecting mid-stream: every good job
  exact, every bad one a one-line error, the engine serves on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest

from engine import Engine, EngineError
from tests.conftest import STATS, Job, in_small_shm, needs_root, served, wait_for
from tests.reference import assert_matches, reference


def run_engine(prefix, urls, tmp_path, **env):
    out = tmp_path / "report.json"
    full = dict(os.environ, ENGINE_DEVICE="cpu", ENGINE_LOG_LEVEL="WARNING",
                **{k: str(v) for k, v in env.items()})
    proc = subprocess.run(prefix + [sys.executable, "-m", "engine", "run", *urls, "--processor",
                                    STATS, "--json", str(out), "--quiet"],
                          env=full, capture_output=True, text=True, timeout=120)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


@needs_root
def test_small_dev_shm_shrinks_the_ring_frames_exact(tmp_path, cdn, sn44_clips):
    proc, report = run_engine(in_small_shm("40m"), [cdn.url("sn44.mp4")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "--shm-size" in line]
    assert len(warnings) == 1, proc.stderr
    from engine.api import Report
    assert_matches(Report.from_dict(report), reference(sn44_clips["sn44"]))
    print(f"\n40 MB /dev/shm, 1280x720 job: exact; {warnings[0]}")


@needs_root
def test_dev_shm_too_small_for_the_video_is_one_clear_error(tmp_path, cdn, sn44_clips):
    proc, report = run_engine(in_small_shm("12m"), [cdn.url("sn44.mp4")], tmp_path)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "shared memory" in errors[0] and "--shm-size" in errors[0], \
        proc.stderr
    assert "Traceback" not in proc.stderr
    print(f"\n12 MB /dev/shm: {errors[0]}")


@needs_root
def test_a_body_without_length_that_outgrows_dev_shm_is_one_clear_error(tmp_path, faulty_server,
                                                                         sn44_clips):
    """No Content-Length: the segment reserves /dev/shm as the body grows. In a 12 MB tmpfs
    the growing body and the frame ring cannot both fit; whichever runs out, the job ends
    in one line naming --shm-size (never a SIGBUS)."""
    server = faulty_server(sn44_clips["sn44"].read_bytes(), mode="chunked")
    proc, report = run_engine(in_small_shm("12m"), [server.url("sn44.mp4")], tmp_path)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no room" in errors[0] and "--shm-size" in errors[0], \
        proc.stderr
    assert "Traceback" not in proc.stderr and report["ok"] is False
    print(f"\n12 MB /dev/shm, 14 MB body without Content-Length: {errors[0]}")


@needs_root
def test_dev_shm_filled_mid_job_nothing_lost_new_job_waits(tmp_path, cdn, slow_cdn, sn44_clips,
                                                          small_clips):
    with served(tmp_path, processor=STATS, prefix=in_small_shm("256m")) as s:
        shm = f"/proc/{s.proc.pid}/root/dev/shm"
        first = Job(s.path, slow_cdn.url("/sn44.mp4"))
        with s.client() as c:
            wait_for(lambda: c.status()["jobs_in_flight"] and c.status()["jobs_in_flight"][0]
                     ["frames_done"] > 0, 60, "the first job to have results")
            free = os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize
            filler = os.path.join(shm, "filler")
            with open(filler, "wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, free - (2 << 20))
            second = Job(s.path, cdn.url("small.mp4"), processor=STATS)
            wait_for(lambda: len(c.status()["jobs_in_flight"]) == 2, 10, "the second job")
            time.sleep(1.0)    # it must be waiting, not failed
            assert second.is_alive(), second.outcome(0)
            os.unlink(filler)
            report, error = first.outcome(120)
            assert error is None, error
            assert_matches(report, reference(sn44_clips["sn44"]))
            report2, error2 = second.outcome(60)
            assert error2 is None, error2
            assert_matches(report2, reference(small_clips["small"]))
            leftover = [n for n in os.listdir(shm) if not n.endswith(".ring")]
            assert leftover == [], leftover
        print("\n/dev/shm filled mid-job: running job exact, new job waited and then ran exact")


def test_too_many_open_files_fails_that_job_next_succeeds(tmp_path, cdn):
    with served(tmp_path) as s:
        sup = psutil.Process(s.proc.pid)
        with s.client() as c:
            assert c.process(cdn.url("small.mp4")).ok
            soft, hard = sup.rlimit(psutil.RLIMIT_NOFILE)
            sup.rlimit(psutil.RLIMIT_NOFILE, (sup.num_fds() + 1, hard))
            try:
                with pytest.raises(EngineError) as info:
                    c.process(cdn.url("small-moov-end.mp4"))
            finally:
                sup.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
            message = str(info.value)
            assert "\n" not in message and "open files" in message.lower(), message
            assert c.process(cdn.url("small-moov-end.mp4")).ok
        print(f"\nEMFILE in the supervisor: {message}")


def test_oversize_and_not_yet_fitting_jobs_while_another_runs(tmp_path, cdn, slow_cdn, sn44_clips):
    size = sn44_clips["sn44"].stat().st_size
    big = cdn.root / "big.bin"
    if not big.exists():
        big.write_bytes(os.urandom(size + (4 << 20)))
    with served(tmp_path, processor=STATS, ENGINE_MAX_BYTES=size + (2 << 20),
                ENGINE_JOB_TIMEOUT_S=120) as s:
        first = Job(s.path, slow_cdn.url("/sn44.mp4"))
        with s.client() as c:
            wait_for(lambda: c.status()["jobs_in_flight"], 30, "the first job")
            with pytest.raises(EngineError) as info:
                c.process(cdn.url("big.bin"))
            assert "ENGINE_MAX_BYTES" in str(info.value)
            second = Job(s.path, cdn.url("sn44-moov-end.mp4"), processor=STATS)
            report, error = first.outcome(120)
            assert error is None, error
            assert_matches(report, reference(sn44_clips["sn44"]))
            report2, error2 = second.outcome(120)
            assert error2 is None, error2
            assert_matches(report2, reference(sn44_clips["sn44-moov-end"]))
            assert report2.timings_s["total"] > 0
    print(f"\nover ENGINE_MAX_BYTES while a job ran: {info.value}; a second job that did not "
          "fit yet waited and ran exact")


CLIENTS = 32


def test_32_clients_at_once_good_bad_and_disconnecting(tmp_path, cdn, small_clips):
    good = ["small.mp4", "small-moov-end.mp4"]
    bad = {"missing.mp4": "404", "page.html": "not a video"}
    refs = {name: reference(small_clips[name[:-4]]) for name in good}
    outcomes: list = [None] * CLIENTS

    def client(i: int, path: str) -> None:
        kind = ("good", "bad", "drop")[i % 3]
        try:
            with Engine.connect(path) as c:
                if kind == "good":
                    name = good[i % 2]
                    outcomes[i] = (kind, name, c.process(cdn.url(name), processor=STATS), None)
                elif kind == "bad":
                    name = list(bad)[i % 2]
                    try:
                        c.process(cdn.url(name))
                        outcomes[i] = (kind, name, None, None)
                    except EngineError as exc:
                        outcomes[i] = (kind, name, None, exc)
                else:   # disconnect after the first batch of a streamed job
                    for _batch in c.stream(cdn.url("small.mp4")):
                        break
                    outcomes[i] = (kind, "small.mp4", None, None)
        except BaseException as exc:   # noqa: BLE001 - reported below
            outcomes[i] = (kind, "?", None, exc)

    with served(tmp_path, processor=STATS, ENGINE_JOB_TIMEOUT_S=90) as s:
        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(i, s.path), daemon=True)
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert not any(t.is_alive() for t in threads), "a client waited for ever"
        took = time.monotonic() - started
        counts = {"good": 0, "bad": 0, "drop": 0}
        for kind, name, report, error in outcomes:
            counts[kind] += 1
            if kind == "good":
                assert error is None, (name, error)
                assert_matches(report, refs[name])
            elif kind == "bad":
                assert error is not None and "\n" not in str(error), (name, error)
                assert bad[name] in str(error), (name, error)
            else:
                assert error is None, (name, error)
        with s.client() as c:
            wait_for(lambda: not c.status()["jobs_in_flight"], 30, "no job in flight")
            assert c.process(cdn.url("small.mp4")).ok
            assert all(p["restarts"] == 0 for p in c.status()["processes"])
    print(f"\n{CLIENTS} clients at once ({counts}): all good jobs exact, bad ones one-line "
          f"errors, in {took:.1f} s")
