"""Remove blocks left behind by engines that died (kill -9, power cut of a process).

Every block name carries its owner's pid; a block whose owner is gone is garbage.
"""
from __future__ import annotations

import os
import re

from engine.shm.block import PREFIX, SHM_DIR, unlink_block

_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-")


def alive(pid: int) -> bool:
    """Running, and not a zombie (a killed engine whose parent has not reaped it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def owned_blocks(pid: int) -> list[str]:
    prefix = f"{PREFIX}{pid}-"
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def sweep_stale() -> list[str]:
    """Unlink every ``engine-<pid>-*`` block whose pid is not running; return their names."""
    swept = []
    for name in os.listdir(SHM_DIR):
        m = _NAME.match(name)
        if m and not alive(int(m.group(1))):
            unlink_block(name)
            swept.append(name)
    return swept
