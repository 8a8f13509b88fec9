"""What each worker holds right now: the one place that says it.

A fetcher holds heads and byte ranges, a decoder holds one job, the GPU worker holds the
jobs it has batches or a handler of. When a worker dies, what the ledger says it held is
what gets requeued or failed; when a job ends, its entries go. The range plan says which
bytes are in flight; the ledger says who has them.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Holdings:
    """One worker's share of the jobs in flight."""
    ranges: dict[tuple[int, int], int] = field(default_factory=dict)  # (job, offset) -> end
    heads: set[int] = field(default_factory=set)       # jobs whose head it fetches
    decoding: int | None = None                        # the job a decoder decodes
    jobs: set[int] = field(default_factory=set)        # GPU worker: jobs it serves

    @property
    def load(self) -> int:
        """Requests in flight on a fetcher's connections."""
        return len(self.ranges) + len(self.heads)

    @property
    def idle(self) -> bool:
        return not (self.ranges or self.heads or self.jobs) and self.decoding is None


class Ledger:
    def __init__(self) -> None:
        self._by_worker: dict[str, Holdings] = {}

    def of(self, worker: str) -> Holdings:
        return self._by_worker.setdefault(worker, Holdings())

    # ------------------------------------------------------------------ fetchers
    def hold_range(self, worker: str, job: int, offset: int, end: int) -> None:
        self.of(worker).ranges[(job, offset)] = end

    def release_range(self, worker: str, job: int, offset: int) -> None:
        self.of(worker).ranges.pop((job, offset), None)

    def ranges_of(self, job: int) -> list[tuple[int, int, str]]:
        """``(offset, end, worker)`` of every range of ``job`` in flight, by offset."""
        return sorted((offset, end, name) for name, h in self._by_worker.items()
                      for (j, offset), end in h.ranges.items() if j == job)

    def fetchers_of(self, job: int) -> set[str]:
        """The workers holding a head or a range of ``job``."""
        return {name for name, h in self._by_worker.items()
                if job in h.heads or any(j == job for j, _ in h.ranges)}

    def serving(self, job: int) -> bool:
        """A GPU worker holds ``job``: if its process is gone, its death is yet to be
        handled (``drop_worker``), and that handling takes the job on."""
        return any(job in h.jobs for h in self._by_worker.values())

    # ------------------------------------------------------------------ whole jobs
    def drop_job(self, job: int) -> None:
        for h in self._by_worker.values():
            h.ranges = {k: v for k, v in h.ranges.items() if k[0] != job}
            h.heads.discard(job)
            h.jobs.discard(job)
            if h.decoding == job:
                h.decoding = None

    def drop_worker(self, worker: str) -> Holdings:
        """Forget a dead worker; returns what it held."""
        return self._by_worker.pop(worker, Holdings())
