"""A 32-bit word in shared memory that processes can sleep on (Linux futex).

Why a futex: readers of a segment must wake within a millisecond of a write made by
another process, without polling and without a broker process in between. The
multiprocessing primitives cannot be handed to a process after it started; a futex
lives in the shared bytes themselves, so any process that maps the segment can use it.

Writers bump the word atomically with FUTEX_WAKE_OP (add 1 and wake every sleeper in
one system call), so a reader that sampled the word before checking its condition
can never miss a wake-up: if anything changed since, FUTEX_WAIT returns at once.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import time

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine())
if _SYS_FUTEX is None:  # pragma: no cover - only on exotic machines
    raise ImportError(f"futex syscall number unknown for {platform.machine()}")

_FUTEX_WAIT = 0
_FUTEX_WAKE_OP = 5
_FUTEX_OP_ADD = 1
_FUTEX_OP_CMP_GE = 5
# *uaddr2 += 1, then wake everyone on uaddr1 (== uaddr2); the comparison always holds.
_ADD_ONE_WAKE_ALL = (_FUTEX_OP_ADD << 28) | (_FUTEX_OP_CMP_GE << 24) | (1 << 12) | 0
_WAKE_ALL = 0x7FFFFFFF

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class Cancelled(Exception):
    """The shared object was cancelled (job cancelled, failed, or timed out)."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class FutexWord:
    """The word at ``offset`` of a writable buffer (an mmap)."""

    def __init__(self, buffer, offset: int = 0):
        self._word = ctypes.c_uint32.from_buffer(buffer, offset)
        self._addr = ctypes.c_void_p(ctypes.addressof(self._word))

    @property
    def value(self) -> int:
        return self._word.value

    def bump(self) -> None:
        """Atomically add one and wake every process sleeping on the word."""
        res = _syscall(_SYS_FUTEX, self._addr, _FUTEX_WAKE_OP, _WAKE_ALL,
                       ctypes.c_void_p(_WAKE_ALL), self._addr, _ADD_ONE_WAKE_ALL)
        if res < 0:  # pragma: no cover - only with a broken address
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def wait(self, seen: int, timeout: float | None) -> None:
        """Sleep while the word still equals ``seen`` (at most ``timeout`` seconds).

        Returns on a bump, a timeout, or a signal; callers re-check their condition.
        The GIL is released while sleeping (ctypes drops it for foreign calls).
        """
        ts = None
        if timeout is not None:
            timeout = max(timeout, 0.0)
            ts = ctypes.byref(_Timespec(int(timeout), int((timeout % 1) * 1e9)))
        res = _syscall(_SYS_FUTEX, self._addr, _FUTEX_WAIT, ctypes.c_uint32(seen), ts, None, 0)
        if res < 0:
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
                raise OSError(err, os.strerror(err))

    def release(self) -> None:
        """Drop the buffer export so the mmap can be closed."""
        self._word = None


def wait_until(word: FutexWord, ready, cancelled, timeout: float | None) -> bool:
    """Block until ``ready()`` is true; False on timeout; raise Cancelled if ``cancelled()``.

    The classic futex loop: sample the word, test, sleep only if nothing changed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        seen = word.value
        if cancelled():
            raise Cancelled()
        if ready():
            return True
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        word.wait(seen, remaining)
