"""engine.resume: where a job goes on after a worker's death, decided without I/O."""
from __future__ import annotations

from engine import resume

URL = "https://cdn.test/clip.mp4"


def test_resume_decisions():
    assert resume.after_decoder_loss([]) == -1
    assert resume.after_decoder_loss([0, 1, 2, 4]) == 4
    assert resume.after_gpu_loss([], per_video=True, client_has_results=True) == -1
    assert resume.after_gpu_loss([0, 1, 2], per_video=False, client_has_results=True) == 2
    assert resume.after_gpu_loss([0, 1, 2], per_video=True, client_has_results=False) == -1
    assert resume.after_gpu_loss([0, 1, 2], per_video=True, client_has_results=True) is None
    assert resume.expected(None, 4) == [0, 1, 2, 3]
    assert resume.expected([3, 9], None) == [3, 9]
    assert resume.expected_streamed((2, 8), True, 5) == [2]
    assert resume.expected_streamed(None, True, 2) == [0, 1, 2]
    assert resume.expected_streamed(None, False, 2) == []
    assert resume.rest([3, 9, 12], 9) == [12]
    assert resume.gaps([0, 1, 2, 3, 4], 3, [0, 2]) == [1, 3]
    losses: dict = {}
    assert resume.gave_up(losses, "gpu", URL, "x") is None
    assert resume.gave_up(losses, "decoder", URL, "x") is None
    assert "GPU worker died 2 times" in resume.gave_up(losses, "gpu", URL, "x")
