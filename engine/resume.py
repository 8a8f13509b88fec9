"""Where a job goes on after a worker dies under it: decided without I/O.

A frame is *forwarded* once its batch has gone from the decoder to the GPU worker, and
*answered* once its results are back. Batches travel in frame order, so both are
prefixes of the job's frames, and a job goes on from a frame number: only the frames
after it are decoded again (``DecodeJob.selected`` and ``spans`` for a planned job,
``resume_after`` for a streamed one), and the processor still sees ascending frames.

* A decoder dies: the forwarded batches are still with the GPU worker; the job goes on
  after the last forwarded frame.
* The GPU worker dies: its unanswered batches are lost; the job goes on after the last
  answered frame. A per-video processor's state died with the worker: its video starts
  again from frame 0, unless results already reached the client (then the job fails).
* A role that dies twice under the same job (a poison input) fails it instead.
"""
from __future__ import annotations

from typing import Iterable, Sequence

MAX_LOSSES = 2          # deaths of one role under one job that end it
ROLES = {"decoder": "decoder process", "gpu": "GPU worker"}


def after_decoder_loss(forwarded: Sequence[int]) -> int:
    """The last frame the lost decoder handed on (-1: none)."""
    return max(forwarded) if forwarded else -1


def after_gpu_loss(answered: Iterable[int], per_video: bool, client_has_results: bool):
    """The last frame whose results survive the GPU worker's death (-1: none), or None
    when the job cannot go on: a per-video processor's results already reached the
    client, and the handler that made them is gone."""
    answered = list(answered)
    if not answered:
        return -1
    if per_video:
        return None if client_has_results else -1
    return max(answered)


def expected(selected: Sequence[int] | None, frame_limit: int | None) -> list[int]:
    """A planned job's frames: its selection, else its first ``frame_limit``."""
    return list(selected) if selected is not None else list(range(frame_limit or 0))


def expected_streamed(frames: Sequence[int] | None, everything: bool, after: int) -> list[int]:
    """A streamed job's frames up to ``after``, as far as known before it is decoded: the
    listed ones, or all of them; a pick by time (every, fps, count) is not known."""
    if frames is not None:
        return [n for n in frames if n <= after]
    return list(range(after + 1)) if everything else []


def rest(frames: Iterable[int], after: int) -> list[int]:
    """The frames still to decode."""
    return [n for n in frames if n > after]


def gaps(frames: Iterable[int], after: int, forwarded: Iterable[int]) -> list[int]:
    """Frames up to ``after`` that the earlier decoders could not output (missing)."""
    seen = set(forwarded)
    return sorted(n for n in frames if n <= after and n not in seen)


def gave_up(losses: dict, role: str, url: str, cause: str) -> str | None:
    """Count a death of ``role`` under a job; the job's error once it is one too many."""
    losses[role] = losses.get(role, 0) + 1
    if losses[role] < MAX_LOSSES:
        return None
    return (f"{url}: the {ROLES[role]} died {losses[role]} times on this job (last: {cause}): "
            "giving up on this input")
