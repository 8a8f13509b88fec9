"""The host and address fences (engine.fences) on a fetcher's HTTP client.

httpx runs a client's request hooks before every request it sends, each redirect hop
included, so the host fence sees every host a job reaches. The address fence looks at
the socket each new connection opened (httpcore's ``connect_tcp`` trace), before TLS
and before any byte of a request: what is checked is the address actually reached,
however the name resolved, so DNS rebinding gains nothing. A pooled connection was
checked when it was opened.
"""
from __future__ import annotations

import httpx

from engine import fences
from engine.config import Config


class Refused(httpx.TransportError):
    """A fence refused a request; the message names the setting."""


class Guard:
    """httpx request hook; ``of(config)`` is None when no fence is on."""

    def __init__(self, allow_hosts: tuple[str, ...], deny_private: bool):
        self.allow_hosts = allow_hosts
        self.deny_private = deny_private

    @classmethod
    def of(cls, config: Config) -> "Guard | None":
        if not config.allow_hosts and not config.deny_private:
            return None
        return cls(config.allow_hosts, config.deny_private)

    def __call__(self, request: httpx.Request) -> None:
        why = fences.host_refusal(request.url.host, self.allow_hosts)
        if why:
            raise Refused(why, request=request)
        trace = request.extensions.get("trace")
        # a redirect's request shares its first request's extensions: wrapped once
        if self.deny_private and not isinstance(trace, _CheckPeer):
            request.extensions["trace"] = _CheckPeer(trace)


class _CheckPeer:
    """httpcore trace hook: refuses a new connection to a fenced address, then passes
    every event on to the request's own trace hook."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, event: str, info: dict) -> None:
        if event == "connection.connect_tcp.complete":
            stream = info["return_value"]
            peer = stream.get_extra_info("server_addr")
            why = fences.address_refusal(peer[0] if peer else None)
            if why:
                stream.close()   # httpcore drops a connection that failed, but not its socket
                raise Refused(why)
        if self.inner is not None:
            self.inner(event, info)
