"""A named, fully reserved block of shared memory: a file in /dev/shm, mapped.

Why not ``multiprocessing.shared_memory``: on Python 3.11 every process that attaches
registers the block with its resource tracker, which then unlinks live blocks when that
process exits. Here only the creator may unlink, and lifetimes are explicit.

Why ``posix_fallocate``: tmpfs allocates pages lazily, so a full /dev/shm would surface
as SIGBUS on a later write. Reserving every page at creation turns that into ENOSPC,
which becomes a clear ``ShmFullError``.
"""
from __future__ import annotations

import errno
import itertools
import mmap
import os

SHM_DIR = "/dev/shm"
PREFIX = "engine-"

_counter = itertools.count(1)


class ShmError(Exception):
    """Shared memory could not be created or opened."""


class ShmFullError(ShmError):
    """/dev/shm has no room for the block."""


def segment_name(owner_pid: int | None = None, n: int | None = None, suffix: str = "") -> str:
    """``engine-<owner pid>-<n><suffix>``: the owner pid lets a later start sweep orphans."""
    pid = os.getpid() if owner_pid is None else owner_pid
    return f"{PREFIX}{pid}-{next(_counter) if n is None else n}{suffix}"


class SharedBlock:
    """One mapping of a block. ``create`` makes it (and owns it); ``attach`` opens it."""

    def __init__(self, name: str, mm: mmap.mmap, owner: bool):
        self.name = name
        self.mm = mm
        self.owner = owner

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @property
    def size(self) -> int:
        return len(self.mm)

    @classmethod
    def create(cls, name: str, size: int, reserve: int | None = None) -> "SharedBlock":
        """A new block of ``size`` bytes, all reserved in /dev/shm (``posix_fallocate``)
        unless ``reserve`` says how much: the rest is reserved by its writer as it grows
        (``grow``), so a body of unknown length takes only the memory it fills."""
        if size <= 0:
            raise ShmError(f"cannot create an empty shared block {name!r}")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:
            raise ShmError(f"shared block {name} already exists") from None
        except OSError as exc:   # EMFILE, ENOSPC on the inode table, a read-only /dev/shm
            raise ShmError(f"cannot create shared block {name}: {exc.strerror}") from None
        try:
            try:
                os.ftruncate(fd, size)
                os.posix_fallocate(fd, 0, size if reserve is None else min(reserve, size))
            except OSError as exc:
                os.unlink(path)
                if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                    raise ShmFullError(
                        f"/dev/shm has no room for {size / 1e6:.1f} MB ({name})") from None
                raise ShmError(f"cannot reserve {size} bytes for {name}: {exc.strerror}") from None
            try:
                mm = mmap.mmap(fd, size)
            except OSError as exc:
                os.unlink(path)
                raise ShmError(f"cannot map {name}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return cls(name, mm, owner=True)

    @classmethod
    def attach(cls, name: str) -> "SharedBlock":
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        except FileNotFoundError:
            raise ShmError(f"shared block {name} does not exist (its job has ended)") from None
        except OSError as exc:
            raise ShmError(f"cannot open shared block {name}: {exc.strerror}") from None
        try:
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return cls(name, mm, owner=False)

    def grow(self, end: int, start: int = 0) -> None:
        """Reserve the block's bytes ``[start, end)`` before writing them (``start``: what
        an earlier call reserved): /dev/shm full is then a ``ShmFullError`` here, not a
        SIGBUS at the write."""
        end = min(end, self.size)
        if end <= start:
            return
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise ShmError(f"cannot open shared block {self.name}: {exc.strerror}") from None
        try:
            os.posix_fallocate(fd, start, end - start)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise ShmFullError(f"/dev/shm has no room for {end / 1e6:.1f} MB "
                                   f"({self.name})") from None
            raise ShmError(f"cannot reserve {end} bytes for {self.name}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def close(self) -> None:
        """Unmap; a view still exported (a numpy array in use) keeps the mapping alive
        until it is garbage collected, which is harmless once the name is unlinked."""
        try:
            self.mm.close()
        except BufferError:
            pass

    def unlink(self) -> None:
        unlink_block(self.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        if self.owner:
            self.unlink()


def unlink_block(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def free_bytes() -> int:
    """What /dev/shm has free now."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize
