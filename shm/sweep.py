"""Remove blocks left behind by engines that died (kill -9, power cut of a process).

Every block name carries its owner's pid; a block whose owner is gone is garbage.
"""
from __future__ import annotations

import os
import re

from shm.block import PREFIX, SHM_DIR, unlink_block

_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
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
        if m and not _alive(int(m.group(1))):
            unlink_block(name)
            swept.append(name)
    return swept
