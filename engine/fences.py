"""Fences for untrusted URLs: which hosts and addresses a job may fetch from, and the
largest picture it may decode. Off by default; decisions only, no I/O (the fetcher
applies the first two on every request and connection, the pipeline the last one).

Each refusal is one line naming the setting that refused.
"""
from __future__ import annotations

import ipaddress

# Checked in this order: Python counts most of these as private too, so the more
# telling name is tried first.
_NON_GLOBAL = ("unspecified", "loopback", "link_local", "multicast", "reserved", "private")


def parse_hosts(raw) -> tuple[str, ...]:
    """ENGINE_ALLOW_HOSTS (a comma-separated string, or a list of hosts) as patterns:
    exact hosts, or ``*.suffix`` for every host under suffix (not suffix itself)."""
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    patterns = tuple(_host(str(p)) for p in items if str(p).strip())
    for p in patterns:
        name = p[2:] if p.startswith("*.") else p
        if not name or "*" in name or "/" in name:
            raise ValueError(f"ENGINE_ALLOW_HOSTS: {p!r} is neither a host nor *.suffix")
    return patterns


def _host(host: str) -> str:
    return host.strip().lower().rstrip(".").strip("[]")


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    host = _host(host)
    return any(host.endswith(p[1:]) if p.startswith("*.") else host == p for p in patterns)


def host_refusal(host: str, patterns: tuple[str, ...]) -> str | None:
    """Why a request to host is refused, or None (no patterns: every host is allowed)."""
    if not patterns or host_allowed(host, patterns):
        return None
    return f"host {_host(host)} is not in ENGINE_ALLOW_HOSTS"


def address_refusal(address: str | None) -> str | None:
    """Why ENGINE_DENY_PRIVATE=1 refuses a connection to address, or None."""
    try:
        ip = ipaddress.ip_address(_host(address or "").split("%")[0])
    except ValueError:
        return f"ENGINE_DENY_PRIVATE=1 refuses a connection whose address is unknown ({address})"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped      # ::ffff:127.0.0.1 is 127.0.0.1
    kind = next((k for k in _NON_GLOBAL if getattr(ip, f"is_{k}")), None)
    if kind is None and not ip.is_global:
        kind = "non-global"      # e.g. shared address space 100.64.0.0/10
    if kind is None:
        return None
    return f"ENGINE_DENY_PRIVATE=1 refuses {ip} (a {kind.replace('_', '-')} address)"


def pixels_refusal(width: int, height: int, max_pixels: int | None) -> str | None:
    """Why ENGINE_MAX_PIXELS refuses a width x height video, or None."""
    if max_pixels is None or width * height <= max_pixels:
        return None
    return (f"a {width}x{height} video has {width * height} pixels a frame, more than "
            f"ENGINE_MAX_PIXELS={max_pixels}")
