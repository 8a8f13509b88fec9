"""The decoder's PyAV loop: frames in presentation order, numbered as a plain sequential
decode numbers them, from every packet or from a sparse job's GOP spans only; and those
spans decoded by several threads at once ("lanes"), merged back in span order.

Lanes are threads, not processes: FFmpeg releases the GIL while it decodes and converts,
so threads of one decoder use the cores as separate processes would, while the job keeps
one producer for its frame ring and one place to go on from after a crash
(``engine.resume``). Each lane demuxes the file itself (cheap: unfetched gaps read as
zeros) and decodes every ``lanes``-th span.
"""
from __future__ import annotations

import bisect
import queue
import threading
from typing import Callable, Iterator

END = object()    # after a span's last frame (``marks``)
# Decoders that read ``skip_frame`` for each packet as it goes in (frame threads too) and
# skip only pictures no other refers to. libdav1d (AV1) reads it when it outputs a frame,
# and then drops wanted ones (tests/test_inputs.py, sparse selections).
SKIPS_PER_PACKET = frozenset({"h264", "hevc"})
DONE = object()   # a lane has nothing more
SLICE_S = 0.1     # how long a lane's waits last before they look at ``stop`` again


class Stopped(Exception):
    """A lane's read gave up: the job's decode ended before the lane did."""


class Numbers:
    """A frame's number is its pts rank among the packets demuxed so far (a frame lost to a
    corrupt packet leaves its gap); decoders output in presentation order, so where
    timestamps are missing or do not increase, output order counts."""

    def __init__(self):
        self.seen: list[int] = []
        self.preroll = 0          # packets an edit list hides (negative pts)
        self.last = -1
        self.decoded = 0          # frames out of the decoder, wanted or not

    def packet(self, packet) -> None:
        if packet.pts is not None:
            if packet.pts < 0:
                self.preroll += 1
            bisect.insort(self.seen, packet.pts)

    def of(self, frame) -> int | None:
        """The frame's number; None for a frame the edit list hides."""
        self.decoded += 1
        number = (bisect.bisect_left(self.seen, frame.pts) - self.preroll
                  if frame.pts is not None else self.last + 1)
        if number < 0:
            return None
        self.last = max(number, self.last + 1)
        return self.last


def drain(stream) -> list:
    """The frames the decoder still holds back for reordering; then ready for a new span."""
    ctx = stream.codec_context
    try:
        frames = list(ctx.decode(None))
    except Exception:      # noqa: BLE001 -- a broken tail loses only its own frames
        frames = []
    ctx.flush_buffers()
    return frames


def frames_of(container, stream, numbers: Numbers, spans=None, keep=None,
              tick: Callable[[], None] = lambda: None, marks: bool = False) -> Iterator:
    """``(number, frame)`` as the decoder outputs them. ``spans``: only the packets of these
    decode-index spans ``[first, last]`` are decoded, each drained at its end (with
    ``marks``, ``(None, END)`` follows each). ``keep``: the decode indices of the wanted
    frames; where the codec allows (``SKIPS_PER_PACKET``), the spans' other
    non-reference frames are skipped, as no frame depends on them."""
    import av

    ctx = stream.codec_context
    if ctx.name not in SKIPS_PER_PACKET:
        keep = None
    spans = list(spans) if spans is not None else None
    index = -1                    # the packet's place in decode order (its sample)
    for packet in container.demux(stream):
        tick()
        if packet.size:
            index += 1
        numbers.packet(packet)
        if spans is not None and index < spans[0][0]:
            continue              # a GOP without a selected frame: never decoded
        if keep is not None:
            ctx.skip_frame = "DEFAULT" if index in keep else "NONREF"
        span_end = spans is not None and index >= spans[0][1]
        try:
            frames = list(packet.decode())
        except av.error.InvalidDataError:
            frames = []           # a corrupt packet: its frame is listed as missing
        if span_end:
            frames += drain(stream)
            spans.pop(0)
        for frame in frames:
            number = numbers.of(frame)
            if number is not None:
                yield number, frame
        if span_end and marks:
            yield None, END
        if spans is not None and not spans:
            return


class Lanes:
    """A sparse job's spans decoded by ``count`` threads at once; ``merged()`` gives the
    wanted frames in span order, as one decoder would. ``open_stream(stop)`` opens a lane's
    own container and stream; ``convert(number, frame)`` turns a wanted frame into what
    the caller takes (None: not wanted). Each lane runs at most ``depth`` frames ahead of
    the merge."""

    def __init__(self, open_stream, spans, keep, count: int, convert, depth: int,
                 tick: Callable[[], None]):
        self.stop = threading.Event()
        self.spans, self.count, self.tick = list(spans), count, tick
        self.queues = [queue.Queue(max(1, depth)) for _ in range(count)]
        self.numbers = [Numbers() for _ in range(count)]
        self.threads = [threading.Thread(
            target=self._lane, args=(k, open_stream, keep, convert), name=f"lane{k}",
            daemon=True) for k in range(count)]
        for t in self.threads:
            t.start()

    @property
    def decoded(self) -> int:
        return sum(n.decoded for n in self.numbers)

    def _lane(self, k: int, open_stream, keep, convert) -> None:
        try:
            container, stream = open_stream(self.stop)
            with container:
                for number, frame in frames_of(container, stream, self.numbers[k],
                                               self.spans[k::self.count], keep, self.tick,
                                               marks=True):
                    if frame is END:
                        self._put(k, END)
                        continue
                    image = convert(number, frame)
                    if image is not None:
                        self._put(k, (number, image))
                    if self.stop.is_set():
                        return
        except BaseException as exc:     # noqa: BLE001 -- the merge raises it in order
            self._put(k, exc)
        self._put(k, DONE)

    def _put(self, k: int, item) -> None:
        # Waiting here or in ``_get`` is no sign of life: the lanes' packets and reads
        # are, so a lane stuck in the codec still shows as a stall.
        while not self.stop.is_set():
            try:
                self.queues[k].put(item, timeout=SLICE_S)
                return
            except queue.Full:
                pass

    def merged(self, on_wait: Callable[[], None]) -> Iterator:
        """The wanted ``(number, image)`` in span order; ``on_wait`` runs before the merge
        blocks on a lane. A lane's error is raised where its span comes; a lane that ended
        early (the file did) ends the merge there, as it would end one decoder."""
        for i in range(len(self.spans)):
            q = self.queues[i % self.count]
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    on_wait()
                    item = q.get()
                if item is END:
                    break
                if item is DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

    def close(self) -> None:
        """Stop the lanes and wait for them (they hold readers over the job's memory)."""
        self.stop.set()
        for q in self.queues:
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
        for t in self.threads:
            t.join()
