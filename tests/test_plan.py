"""engine.plan: the byte ranges a job asks for, in which order, and what a retry asks again."""
from __future__ import annotations

from engine.plan import RangePlan


def test_range_plan_with_one_body_cuts_no_more_ranges():
    plan = RangePlan(size=8 << 20, range_bytes=2 << 20)
    plan.extend(4 << 20)
    a = plan.next(slots=4)
    b = plan.next(slots=4)
    assert plan.take_whole(b.offset) and not plan.take_whole(a.offset)
    assert plan.inflight[b.offset].end == 8 << 20 and not plan.pending
    plan.extend(8 << 20)
    plan.urgent(7 << 20, 8 << 20)
    assert not plan.pending and plan.regions() == [(0, 8 << 20)]
    plan.requeue(a.offset)           # its fetcher died: the body brings its bytes
    assert not plan.pending and a.offset not in plan.inflight
    rest = plan.retry(b.offset, 3 << 20, backoff=0.0)
    assert (rest.offset, rest.end) == (3 << 20, 8 << 20) and plan.whole == rest.offset
    piece = plan.next(slots=4)       # uncut
    assert (piece.offset, piece.end) == (3 << 20, 8 << 20) and plan.take_whole(piece.offset)
    plan.done(piece.offset)
    assert plan.finished and plan.whole is None
    assert not plan.take_whole(1 << 20)      # a late one, once the body is in: dropped


def test_range_plan_orders_urgent_first_then_ascending_and_ramps():
    plan = RangePlan(size=8 << 20, range_bytes=2 << 20)
    plan.extend(6 << 20)
    plan.urgent(7 << 20, 8 << 20)
    first = plan.next(slots=8)
    assert (first.offset, first.end) == (7 << 20, 8 << 20)
    second = plan.next(slots=8)
    assert second.offset == 0 and second.end == 128 * 1024          # the ramp's first step
    third = plan.next(slots=8)
    assert third.offset == second.end and third.end - third.offset == 128 * 1024
    plan.done(first.offset)
    assert plan.regions() == [(0, 6 << 20), (7 << 20, 8 << 20)]


def test_range_plan_retry_resumes_on_a_chunk_boundary_and_requeue_goes_first():
    plan = RangePlan(size=4 << 20, range_bytes=2 << 20)
    plan.extend(4 << 20)
    a = plan.next(slots=1)
    b = plan.next(slots=1)
    rest = plan.retry(a.offset, a.offset + 100_000, backoff=10.0)
    assert rest.offset == a.offset + 65536 and rest.attempt == 1
    assert plan.next(slots=1).offset > b.offset     # in back-off: skipped for now
    plan.requeue(b.offset)
    assert plan.pending[0].offset == b.offset
    assert not plan.finished


def test_range_plan_extend_never_plans_a_region_twice():
    plan = RangePlan(size=10 << 20, range_bytes=2 << 20)
    plan.urgent(8 << 20, 9 << 20)
    plan.extend(10 << 20)
    pieces = []
    while (p := plan.next(slots=1)) is not None:
        pieces.append((p.offset, p.end))
    covered = sorted(pieces)
    assert covered[0][0] == 0 and covered[-1][1] == 10 << 20
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))     # no gap, no overlap


def test_one_body_whose_fetcher_died_is_asked_again_and_read():
    plan = RangePlan(size=8 << 20, range_bytes=2 << 20)
    plan.extend(4 << 20)
    first = plan.next(slots=4)
    second = plan.next(slots=4)
    plan.done(first.offset)
    assert plan.take_whole(second.offset)
    plan.requeue(second.offset)      # the fetcher reading the body died
    again = plan.next(slots=4)
    assert (again.offset, again.end) == (0, 8 << 20)
    assert plan.take_whole(again.offset)        # its answer is the body to read
    plan.done(again.offset)
    assert plan.finished


def test_spans_added_once_one_body_brings_every_byte_are_not_asked():
    plan = RangePlan(size=8 << 20, range_bytes=2 << 20)
    plan.extend(1 << 20)
    head = plan.next(slots=4)
    assert plan.take_whole(head.offset)
    plan.add(3 << 20, 4 << 20)       # a sparse selection's spans, planned after the moov
    plan.add(6 << 20, 7 << 20)
    assert not plan.pending
    assert (3 << 20, 4 << 20) in plan.regions()  # still what the decoder may read
