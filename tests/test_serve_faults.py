"""Serve mode under faults: every process of the engine's tree killed, stopped or stuck.

A real ``python -m engine run`` serving on a socket (the CLI's process is the supervisor,
as a user starts it), real nginx, real processes. What is checked:

* no process in the tree is one the supervisor does not start and watch (no
  ``multiprocess`` resource tracker), and SIGPIPE is ignored, not at its default action;
* SIGKILL to each child in turn, mid-job: the job completes frame-exact (it resumes on
  the restarted worker), the supervisor stays up, the next job succeeds, nothing is left
  behind;
* a stall: a decoder under SIGSTOP (no heartbeat) or frozen in C code is killed and
  replaced within the configured timeout and its job resumes exact; a processor in an
  endless loop (heartbeats, no progress) stalls every GPU worker it meets, so its job
  fails naming the stage after the second; the next job does not wait for them.

Figures (time to detect and recover) are printed; run with ``-s``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from engine import Engine, EngineError
from tests.conftest import NULL, Job, served, wait_for
from tests.reference import assert_matches, reference


def roles(client) -> dict[str, dict]:
    return {p["role"]: p for p in client.status()["processes"]}


def sigignored(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as fh:
        mask = next(int(line.split()[1], 16) for line in fh if line.startswith("SigIgn:"))
    return bool(mask & (1 << (sig - 1)))


def test_every_child_is_supervised_and_sigpipe_is_handled(tmp_path, cdn, small_clips):
    """The failure of the issue: SIGKILL every child of the supervisor, then a fetcher
    (a restart after a dead helper made the supervisor die of SIGPIPE)."""
    with served(tmp_path) as s:
        assert sigignored(s.proc.pid, signal.SIGPIPE), "SIGPIPE at its default action"
        with s.client() as c:
            known = {p["pid"] for p in c.status()["processes"]}
        kids = s.children()
        strangers = [" ".join(p.cmdline()) for p in kids if p.pid not in known]
        assert not strangers, f"processes the supervisor does not watch: {strangers}"
        victims = [(p.pid, None) for p in kids] + [(None, "fetcher0")]   # then a fetcher again
        for pid, role in victims:
            with s.client() as c:
                if role is None:
                    role = next(r for r, p in roles(c).items() if p["pid"] == pid)
                victim = psutil.Process(roles(c)[role]["pid"])
                victim.kill()
                wait_for(lambda: roles(c)[role]["pid"] not in (None, victim.pid), 30,
                         f"{role} to be restarted")
                s.remember()
        with s.client() as c:
            report = c.process(cdn.url("small.mp4"))
            assert report.ok and report.frames_processed == 50
            assert all(p["restarts"] >= 1 for r, p in roles(c).items() if r != "supervisor")
        assert s.proc.poll() is None


@pytest.mark.parametrize("role", ["fetcher0", "decoder0", "gpu"])
def test_kill_any_child_mid_job_serve_mode_keeps_serving(tmp_path, cdn, slow_cdn, small_clips,
                                                         sn44_clips, role):
    with served(tmp_path, processor="engine.processors:stats", ENGINE_DECODERS=1) as s:
        job = Job(s.path, slow_cdn.url("/sn44.mp4"))
        with s.client() as c:
            wait_for(lambda: (j := c.status()["jobs_in_flight"]) and j[0]["frames_done"] > 0,
                     60, "the job to have results")
            pid = roles(c)[role]["pid"]
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            report, error = job.outcome(120)
            ended = time.monotonic() - killed
            assert error is None, error     # the job resumes on the restarted worker
            assert_matches(report, reference(sn44_clips["sn44"]))
            wait_for(lambda: roles(c)[role]["pid"] not in (None, pid), 30, "the restart")
            s.remember()
            again = c.process(cdn.url("small.mp4"), processor="engine.processors:stats")
            assert_matches(again, reference(small_clips["small"]))
        print(f"\n{role} SIGKILL mid-job (serve mode): job completed exact {ended:.2f} s "
              "after the kill; next job ok")


def test_sigstopped_decoder_is_killed_and_replaced(tmp_path, cdn, slow_cdn, small_clips,
                                                   sn44_clips):
    """No heartbeat: the decoder is killed and replaced; its job resumes on the new one."""
    with served(tmp_path, processor="engine.processors:stats", ENGINE_DECODERS=1,
                ENGINE_HEARTBEAT_TIMEOUT_S=2) as s:
        job = Job(s.path, slow_cdn.url("/sn44.mp4"))
        with s.client() as c:
            wait_for(lambda: (j := c.status()["jobs_in_flight"]) and j[0]["frames_done"] > 0,
                     60, "the job to have results")
            pid = roles(c)["decoder0"]["pid"]
            stopped = time.monotonic()
            os.kill(pid, signal.SIGSTOP)
            report, error = job.outcome(90)
            done = time.monotonic() - stopped
            assert error is None, error
            assert_matches(report, reference(sn44_clips["sn44"]))
            info = wait_for(lambda: (d := roles(c)["decoder0"])["pid"] not in (None, pid) and d,
                            30, "the decoder to be replaced")
            assert "heartbeat" in info["last_restart_cause"]
            s.remember()
            again = c.process(cdn.url("small.mp4"))
            assert again.ok and again.frames_processed == 50
        print(f"\nSIGSTOP decoder: replaced (ENGINE_HEARTBEAT_TIMEOUT_S=2), its job resumed "
              f"and completed exact {done:.2f} s after the stop")


def test_processor_in_an_endless_loop_is_killed_and_replaced(tmp_path, cdn, small_clips):
    with served(tmp_path, ENGINE_STALL_TIMEOUT_S=3) as s:
        with s.client() as c:
            started = time.monotonic()
            with pytest.raises(EngineError) as info:
                c.process(cdn.url("small.mp4"), processor="tests.processors:spin")
            detected = time.monotonic() - started
            message = str(info.value)
            # each new worker stalls on it again: the second loss gives the input up
            assert "GPU worker" in message and "2 times" in message and "stalled" in message, \
                message
            s.remember()
            # the next job does not wait for the stuck worker: a new one takes it
            again = c.process(cdn.url("small.mp4"))
            assert again.ok and again.frames_processed == 50
            gpu = roles(c)["gpu"]
            assert gpu["restarts"] == 2 and "stalled" in gpu["last_restart_cause"]
        print(f"\nprocessor endless loop: job failed {detected:.2f} s after submit "
              f"(ENGINE_STALL_TIMEOUT_S=3): {message}")


# Freezes one thread (the decoder's main thread) and nothing else: a ptrace group-stop
# applies to the seized thread only, so the worker's heartbeat thread runs on when the
# frozen thread had released the GIL (inside FFmpeg), as a decoder stuck in FFmpeg would.
FREEZE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
tid = int(sys.argv[1])
if libc.ptrace(0x4206, tid, None, None) or libc.ptrace(0x4207, tid, None, None):
    sys.exit(f"ptrace: errno {ctypes.get_errno()}")
print("frozen", flush=True)
while True:                      # stay attached (detaching would thaw it) until it dies
    _, status = os.waitpid(tid, 0x40000000)
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        break
"""


def test_decoder_main_thread_frozen_is_killed_and_replaced(tmp_path, cdn, slow_cdn, small_clips,
                                                           sn44_clips):
    with served(tmp_path, processor="engine.processors:stats", ENGINE_DECODERS=1,
                ENGINE_HEARTBEAT_TIMEOUT_S=3, ENGINE_STALL_TIMEOUT_S=3) as s:
        job = Job(s.path, slow_cdn.url("/sn44.mp4"))
        with s.client() as c:
            wait_for(lambda: (j := c.status()["jobs_in_flight"]) and j[0]["frames_done"] > 0,
                     60, "the job to have results")
            pid = roles(c)["decoder0"]["pid"]
            freezer = subprocess.Popen([sys.executable, "-c", FREEZE, str(pid)],
                                       stdout=subprocess.PIPE, text=True)
            line = freezer.stdout.readline().strip()
            if line != "frozen":
                freezer.wait(5)
                pytest.skip(f"cannot ptrace here: {line or freezer.returncode}")
            frozen = time.monotonic()
            report, error = job.outcome(90)
            done = time.monotonic() - frozen
            freezer.wait(10)
            assert error is None, error      # resumed on the new decoder
            assert_matches(report, reference(sn44_clips["sn44"]))
            info = wait_for(lambda: (d := roles(c)["decoder0"])["pid"] not in (None, pid) and d,
                            30, "the decoder to be replaced")
            cause = info["last_restart_cause"]
            assert "heartbeat" in cause or "stalled" in cause, cause
            s.remember()
            again = c.process(cdn.url("small.mp4"))
            assert again.ok and again.frames_processed == 50
        print(f"\ndecoder main thread frozen: replaced ({cause}), its job resumed and "
              f"completed exact {done:.2f} s after the freeze")


def test_a_bug_in_the_loop_fails_only_that_job_and_the_engine_goes_on(cdn, small_clips):
    """A malformed Submit (a URL that is not a string) raises inside the supervisor's
    loop: logged with its traceback, that job fails with one line, the engine serves on."""
    with Engine(processor=NULL, device="cpu", fetchers=1, decoders=1) as eng:
        report = eng.report(12345)
        assert not report.ok and "internal error" in report.error and "\n" not in report.error
        assert eng.process(cdn.url("small.mp4")).frames_processed == 50
        sup = psutil.Process(eng.pid)
        assert sup.is_running() and sup.status() != psutil.STATUS_ZOMBIE
