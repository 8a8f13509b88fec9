"""engine.job: the phase table a job moves by."""
from __future__ import annotations

import pytest

from engine.job import TERMINAL, TRANSITIONS, BadTransition, Job, Phase


def test_every_phase_but_the_ends_can_fail_and_the_ends_are_final():
    for phase, nxt in TRANSITIONS.items():
        if phase in TERMINAL:
            assert nxt == frozenset()
        else:
            assert Phase.FAILED in nxt
    assert set(TRANSITIONS) == set(Phase)


def test_a_move_the_table_does_not_allow_is_refused():
    job = Job(1, 1, None, "https://cdn.test/clip.mp4", "p", None, None, False)
    assert job.phase is Phase.HEAD
    with pytest.raises(BadTransition, match="HEAD -> DECODING"):
        job.to(Phase.DECODING)
    job.to(Phase.FAILED)
    assert job.finished
    with pytest.raises(BadTransition):
        job.to(Phase.DONE)
