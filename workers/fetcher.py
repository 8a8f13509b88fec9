"""Fetcher process: persistent connection pools writing byte ranges into segments.

Connection set-up on a distant CDN costs far more than a 2 MB range, so each fetcher
keeps one ``httpx.Client`` per origin for its whole life, with ``ENGINE_CONNECTIONS``
keep-alive connections, opened ahead of time by prewarm and kept warm by cheap HEADs.
The supervisor hands out ranges (at most ``connections`` at once per origin); each
range is streamed straight from the socket into the shared segment, marking chunks
available as they complete so the decoder can start on a range before it finishes.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx

from engine.config import Config
from engine.errors import ErrorKind
from engine.messages import (EndJob, FetchHead, FetchRange, FetchStats, HeadInfo, PrewarmOrigins,
                             RangeDone, RangeFailed, ReadWhole, Reply, SegmentReady, Shutdown,
                             WholeBody)
from engine.plan import align_down
from engine.shm import AvailabilityMap, SharedBlock, ShmError
from engine.workers.base import Link, worker_setup
from engine.workers.pools import (KEEP_WARM_EVERY_S, Pools, RangeError, Tracer, body, codings,
                                  content_range, describe, hang_up)

log = logging.getLogger("engine.fetcher")

PREFIX_BYTES = 16 * 1024  # ftyp and the moov or mdat header are in the first bytes
GROW_BYTES = 4 << 20    # a body of unknown length reserves shared memory in these steps
# A range whose job ended is read to its end (its connection stays pooled) when it is at
# most this many ranges long, and for at most this long (a stalled server is hung up on).
DRAIN_RANGES = 2
DRAIN_S = 3.0


class Fetcher:
    def __init__(self, link: Link, config: Config):
        self.link = link
        self.config = config
        self.pools = Pools(config)
        self.pool = ThreadPoolExecutor(max_workers=config.connections * 4 + 2,
                                       thread_name_prefix="range")
        self._segments: dict[int, tuple[SharedBlock, AvailabilityMap]] = {}
        self._ended: set[int] = set()
        self._waiting_segment: dict[int, tuple[threading.Event, list]] = {}
        self._responses: dict[int, set] = {}    # job -> its responses still open
        self._whole_answers: dict[tuple[int, int], tuple[threading.Event, list]] = {}
        self._lock = threading.Lock()

    # -- dispatch ----------------------------------------------------------------
    def handle(self, msg) -> None:
        {FetchHead: self._on_head, FetchRange: self._on_range, SegmentReady: self._on_segment,
         EndJob: lambda m: self.end_job(m.job), ReadWhole: self._on_read_whole,
         PrewarmOrigins: lambda m: self.pool.submit(self.prewarm, m)}[type(msg)](msg)

    def _on_head(self, msg: FetchHead) -> None:
        self._segment_event(msg.job)
        self.pool.submit(self._run, self.fetch_head, msg)

    def _on_range(self, msg: FetchRange) -> None:
        self.pool.submit(self._run, self.fetch_range, msg)

    def _on_segment(self, msg: SegmentReady) -> None:
        event, box = self._segment_event(msg.job)
        box.append(msg)
        event.set()

    def prewarm(self, msg: PrewarmOrigins) -> None:
        opened = 0
        for origin in msg.origins:
            try:
                opened += self.pools.prewarm(origin if urlsplit(origin).path not in ("",)
                                             else origin + "/")
            except Exception as exc:   # a bad origin must not break the fetcher
                log.warning("prewarm of %s failed: %s", origin, exc)
        self.link.send(Reply(token=msg.token, payload={"opened": opened}))

    def _segment_event(self, job: int) -> tuple[threading.Event, list]:
        """Set when the supervisor has made (or refused) the job's segment."""
        with self._lock:
            entry = self._waiting_segment.get(job)
            if entry is None:
                entry = self._waiting_segment[job] = (threading.Event(), [])
                if job in self._ended:
                    entry[0].set()
            return entry

    def _await_segment(self, job: int):
        event, box = self._segment_event(job)
        if not event.wait(30.0) or not box or box[0].segment is None:
            raise RangeError("job ended", False)
        return self._segment(job, box[0].segment, box[0].amap)

    def _run(self, fn, msg) -> None:
        try:
            fn(msg)
        except RangeError as exc:
            self._failed(msg, str(exc), exc.kind, exc.retryable)
        except Exception as exc:  # a bug must fail the job, not kill the fetcher silently
            if msg.job in self._ended:
                return   # the job ended under a range still writing (segment unmapped)
            log.exception("fetch failed")
            self._failed(msg, f"internal error: {exc}", ErrorKind.FETCH, False)

    def _failed(self, msg, error: str, kind: ErrorKind, retryable: bool) -> None:
        offset = getattr(msg, "offset", 0)
        self.link.send(RangeFailed(job=msg.job, offset=offset, end=getattr(msg, "end", 0),
                                   written=offset, error=f"{msg.url}: {error}", kind=kind,
                                   retryable=retryable, attempt=msg.attempt,
                                   head=isinstance(msg, FetchHead)))

    def end_job(self, job: int) -> None:
        with self._lock:
            self._ended.add(job)
            seg = self._segments.pop(job, None)
            waiting = self._waiting_segment.pop(job, None)
            responses = self._responses.pop(job, ())
            answers = [e for (j, _), (e, _) in self._whole_answers.items() if j == job]
        if waiting:
            waiting[0].set()
        for event in answers:
            event.set()
        for response in responses:
            if self._drainable(response):
                # read to its end by its own thread (``_close``), unless the server stalls
                threading.Timer(DRAIN_S, self._hang_up, (response,)).start()
            else:
                self._hang_up(response)
        if seg:
            seg[0].close()
            seg[1].close()
        if len(self._ended) > 10000:
            self._ended = set(sorted(self._ended)[-1000:])

    def _segment(self, job: int, segment: str, amap: str):
        with self._lock:
            if job in self._ended:
                raise RangeError("job ended", False)
            seg = self._segments.get(job)
            if seg is None:
                try:
                    seg = (SharedBlock.attach(segment), AvailabilityMap.attach(amap))
                    self._segments[job] = seg
                except ShmError:
                    raise RangeError("job ended", False) from None
            return seg

    # -- requests ------------------------------------------------------------------
    def _open(self, job: int, url: str, headers: dict, stats: FetchStats):
        client, throwaway, http2 = self.pools.client(url)
        stats.started = time.monotonic()
        try:
            request = client.build_request("GET", url, headers=headers,
                                           extensions={"trace": Tracer(stats)})
            response = client.send(request, stream=True)
        except httpx.HTTPError as exc:
            if throwaway:
                client.close()
            message, retryable = describe(exc)
            raise RangeError(message, retryable) from None
        stats.first_byte = time.monotonic()
        stats.http_version = response.http_version
        if throwaway:
            response.extensions["engine_client"] = client
        response.extensions["engine_http2"] = http2
        response.extensions["engine_job"] = job
        with self._lock:
            ended = job in self._ended
            if not ended:
                self._responses.setdefault(job, set()).add(response)
        if ended:
            hang_up(response)
        return response

    def _drainable(self, response) -> bool:
        """A range whose job ended is read to its end, not hung up: a connection closed
        mid-body is lost to the pool, and the next job would pay a new one (on a distant
        CDN, costlier than the rest of a range)."""
        length = response.headers.get("content-length", "")
        return response.http_version == "HTTP/1.1" and response.status_code == 206 \
            and length.isdigit() and int(length) <= DRAIN_RANGES * self.config.range_bytes

    def _close(self, response) -> None:
        """Close a response; a small unread one (an error page, a 416), or a range whose
        job ended, is read first so its connection goes back to the pool instead of
        being dropped."""
        job = response.extensions["engine_job"]
        with self._lock:
            still_open = self._responses.get(job)
            if still_open is not None:
                still_open.discard(response)
                if not still_open:
                    del self._responses[job]
            ended = job in self._ended
        length = response.headers.get("content-length", "")
        try:
            if not response.is_stream_consumed and length.isdigit() and int(length) <= 65536 \
                    and response.status_code != 206:
                response.read()
            elif ended and self._drainable(response):
                for _ in response.stream:    # the rest of the body, unread so far
                    pass
        except (httpx.HTTPError, OSError, ValueError):
            pass           # hung up (a stalled server) or broken: the connection is dropped
        with self._lock:   # never while ``_hang_up`` looks: its socket may be reused next
            response.close()
        client = response.extensions.get("engine_client")
        if client is not None:
            client.close()

    def _hang_up(self, response) -> None:
        """Hang up on a response still being read; a closed one's connection is back in
        the pool (or carrying another request) and is left alone."""
        with self._lock:
            if not response.is_closed:
                hang_up(response)

    def fetch_head(self, msg: FetchHead) -> None:
        stats = FetchStats()
        progress = [0]
        response = self._open(msg.job, msg.url, {"Range": f"bytes=0-{msg.length - 1}"}, stats)
        try:
            size, ranged, expect = self._head_answer(response, msg.length)
            chunks = body(response, whole=response.status_code == 200)
            content_type = response.headers.get("content-type", "")
            # The first bytes go with HeadInfo, so the supervisor can locate the moov and
            # start the other ranges while the head still downloads; then the rest streams
            # into the segment, which the supervisor makes on HeadInfo.
            buffered = bytearray()
            for chunk in chunks:
                buffered += chunk
                if len(buffered) >= (PREFIX_BYTES if expect is None else min(expect, PREFIX_BYTES)):
                    break
            self.link.send(HeadInfo(job=msg.job, size=size, ranged=ranged, url=str(response.url),
                                    content_type=content_type, stats=stats,
                                    prefix=bytes(buffered[:PREFIX_BYTES])))
            block, amap = self._await_segment(msg.job)
            self._write(msg.job, block, amap, 0, expect, buffered, chunks, progress)
        except httpx.HTTPError as exc:
            message, retryable = describe(exc)
            raise RangeError(message, retryable) from None
        finally:
            self._close(response)
        try:
            if response.status_code == 206:
                # the rest of a shorter answer; all of a body whose total is unknown
                want = min(msg.length, size) if ranged else None
                self._ranges(msg.job, str(response.url), (block, amap), want, progress,
                             FetchStats(), 0)
            if amap.length is None:
                if progress[0] == 0:
                    raise RangeError("empty file (the server sent 0 bytes)", False)
                amap.end(progress[0])
        except httpx.HTTPError as exc:
            message, retryable = describe(exc)
            raise RangeError(message, retryable) from None
        stats.bytes = progress[0]
        self.link.send(RangeDone(job=msg.job, offset=0, end=progress[0], stats=stats, head=True))

    @staticmethod
    def _head_answer(response, length: int) -> tuple[int | None, bool, int | None]:
        """(the file's size, whether ranges may follow, where this answer's bytes end);
        None where the body's end tells."""
        status = response.status_code
        if status == 206:
            span = content_range(response.headers.get("content-range"))
            if span is None or span[0] != 0:
                raise RangeError("206 response without a usable Content-Range", False)
            # a total of '*' is learned at the body's end: its bytes are asked to the end
            return span[2], span[2] is not None, span[1]
        if status == 200:
            length = response.headers.get("content-length")
            # no length (chunked), or that of the encoded body: a segment that grows
            size = int(length) if length and length.isdigit() and not codings(response) \
                else None
            return size, False, size
        if status == 416:
            raise RangeError("empty file (416 Range Not Satisfiable)", False)
        raise RangeError(f"HTTP {status} {response.reason_phrase}".rstrip(), False)

    def fetch_range(self, msg: FetchRange) -> None:
        stats = FetchStats()
        progress = [msg.offset]
        end = msg.end
        try:
            seg = None if msg.segment is None else self._segment(msg.job, msg.segment, msg.amap)
            how = self._ranges(msg.job, msg.url, seg, end, progress, stats, msg.offset)
            if how == "dropped":
                return            # the whole file is read by another request
            end = progress[0] if how == "whole" else min(end, progress[0])
        except (httpx.HTTPError, RangeError) as exc:
            if isinstance(exc, RangeError):
                error, kind, retryable = str(exc), exc.kind, exc.retryable
            else:
                (error, retryable), kind = describe(exc), ErrorKind.FETCH
            self.link.send(RangeFailed(job=msg.job, offset=msg.offset, end=end,
                                       written=progress[0], error=f"{msg.url}: {error}",
                                       kind=kind, retryable=retryable, stats=stats,
                                       attempt=msg.attempt, speculative=msg.segment is None))
            return
        except ValueError:
            if msg.job in self._ended:
                return   # the job ended under us: its segment was unmapped mid-write
            raise
        stats.bytes = stats.bytes if how == "whole" else end - msg.offset
        self.link.send(RangeDone(job=msg.job, offset=msg.offset, end=end, stats=stats))

    def _ranges(self, job, url, seg, end, progress, stats, key) -> str:
        """Ask for [progress, end) until it is all in: an answer shorter than asked leaves
        the rest to ask again. ``end`` None: to the end of a body whose total is unknown
        (a later answer's total, or a 416, tells where it is). ``seg`` None: a range sent
        with the head, written once the supervisor has made the segment.

        Returns "ranges"; "whole" where a 200 brought the whole file, which was read
        (``progress``: where it stopped, ``stats.bytes``: what it wrote); "dropped" where
        another request reads it."""
        while end is None or progress[0] < end:
            pos = progress[0]
            response = self._open(job, url, {"Range": f"bytes={pos}-{'' if end is None else end - 1}"},
                                  stats)
            try:
                status = response.status_code
                if status == 416 and end is None:
                    break                      # nothing at ``pos``: the body ends there
                if status not in (200, 206):
                    raise RangeError(f"HTTP {status} for a byte range", False)
                if seg is None:
                    seg = self._await_segment(job)
                    end = min(end, seg[1].size)
                    if seg[1].length is None:   # the head itself streams the whole body
                        raise RangeError("the head request brings this body", False)
                if status == 200:
                    if not self._ask_whole(job, key):
                        return "dropped"
                    stats.bytes = self._write_whole(job, *seg, response, progress)
                    return "whole"
                total = self._part(job, seg, pos, end, response, progress, key)
                self.pools.record(url, response.extensions["engine_http2"], stats,
                                  progress[0] - pos)
                if end is None and total is not None:
                    end = total
            finally:
                self._close(response)
        return "ranges"

    def _part(self, job, seg, pos, end, response, progress, key) -> int | None:
        """Write one 206 answer for [pos, end); returns the total it gives (None: '*')."""
        block, amap = seg
        value = response.headers.get("content-range")
        span = content_range(value)
        if span is None or span[0] != pos:
            raise RangeError(f"206 response without a usable Content-Range ({value!r} for "
                             f"bytes {pos}-{'' if end is None else end - 1})", False)
        if span[2] is not None and amap.length is not None and span[2] != amap.size:
            raise RangeError(f"the file changed size during the download "
                             f"({amap.size} then {span[2]} bytes)", False)
        stop = span[1] if end is None else min(span[1], end)
        if stop > block.size:
            raise RangeError(f"the body is larger than {block.size} bytes (ENGINE_MAX_BYTES)",
                             False)
        # the chunk this answer starts in was begun by the answer before it, in this request
        self._write(job, block, amap, pos, stop, b"", body(response, False), progress,
                    marked=max(key, align_down(pos)))
        return span[2]

    def _ask_whole(self, job: int, offset: int) -> bool:
        """Whether to read a whole file answered to the request at ``offset``: the
        supervisor says (``ReadWhole``), as one body brings every byte of a job."""
        event, box = threading.Event(), []
        with self._lock:
            if job in self._ended:
                return False
            self._whole_answers[(job, offset)] = (event, box)
        self.link.send(WholeBody(job=job, offset=offset))
        event.wait(30.0)
        with self._lock:
            self._whole_answers.pop((job, offset), None)
        return bool(box) and box[0]

    def _on_read_whole(self, msg: ReadWhole) -> None:
        with self._lock:
            entry = self._whole_answers.get((msg.job, msg.offset))
        if entry is not None:
            entry[1].append(msg.read)
            entry[0].set()

    def _write_whole(self, job, block, amap, response, progress) -> int:
        """The whole file, answered to a range: write the chunks the segment lacks (a
        chunk another request is writing gets the same bytes), and stop reading once it
        has them all. Returns the bytes written; ``progress`` is where the body stopped,
        every chunk before it present."""
        step, size = amap.chunk, amap.length     # size None: the body's end tells
        chunks = body(response, whole=True)
        length = None if codings(response) else response.headers.get("content-length")
        if size is not None and length and length.isdigit() and int(length) != size:
            raise RangeError(f"the file changed size during the download ({size} then "
                             f"{length} bytes)", False)
        limit = block.size if size is None else size
        pos = written = reserved = 0
        progress[0] = 0
        buffered = bytearray()
        for data in itertools.chain(chunks, [None]):
            if job in self._ended:
                raise RangeError("job ended", False)
            buffered += data or b""
            while len(buffered) >= step or (data is None and buffered):
                n = min(step, len(buffered))
                if pos + n > limit:
                    raise RangeError(f"the file changed size during the download ({size} "
                                     "bytes, then more)" if size is not None else
                                     f"the body is larger than {limit} bytes (ENGINE_MAX_BYTES)",
                                     False)
                present = amap.present(pos, n)
                if not present:
                    if size is None and pos + n > reserved:
                        reserved, before = min(limit, pos + n + GROW_BYTES), reserved
                        self._grow(block, reserved, before)
                    block.mm[pos:pos + n] = buffered[:n]
                    amap.mark(pos, pos + n)
                    written += n
                del buffered[:n]
                pos += n
                progress[0] = pos
                # only where it meets bytes that are there can the rest be all there too
                if present and size is not None and amap.first_missing(pos) is None:
                    return written       # the job has every byte
        if size is None:
            amap.end(pos)
        elif pos != size:
            raise RangeError(f"the file changed size during the download ({size} then {pos} "
                             "bytes)", False)
        return written

    @staticmethod
    def _grow(block, end: int, start: int) -> None:
        try:
            block.grow(end, start)
        except ShmError as exc:
            raise RangeError(f"{exc}; a container needs a larger --shm-size", False) from None

    def _write(self, job, block, amap, offset, end, first: bytes, chunks, progress=None,
               marked=None) -> int:
        """Copy the body into the segment as it arrives; mark chunks as they complete
        (from ``marked``: a chunk begun by an earlier answer of the same request).

        ``end`` None: a body of unknown length (no Content-Length), written to its end.
        A segment of unknown length reserves its memory ahead of the bytes as they come,
        up to its size (ENGINE_MAX_BYTES); the caller says where the body ended."""
        mm, step = block.mm, amap.chunk
        limit = block.size if end is None else end
        pos, marked = offset, offset if marked is None else marked
        reserved = 0 if amap.length is None else limit   # a known length was reserved at creation
        try:
            for data in itertools.chain([first] if first else [], chunks):
                if job in self._ended:   # its segment is gone; ``_close`` reads the rest
                    raise RangeError("job ended", False)
                n = len(data)
                if pos + n > limit:
                    raise RangeError(f"server sent more bytes than announced ({end - offset})"
                                     if end is not None else f"the body (no Content-Length) "
                                     f"is larger than {limit} bytes (ENGINE_MAX_BYTES)", False)
                if pos + n > reserved:
                    reserved, before = min(limit, max(pos + n, reserved + GROW_BYTES)), reserved
                    self._grow(block, reserved, before)
                mm[pos:pos + n] = data
                pos += n
                if progress is not None:
                    progress[0] = pos
                if pos - marked >= step or pos == end:
                    amap.mark(marked, pos)
                    marked = pos - pos % step if pos != end else pos
        except httpx.RemoteProtocolError:    # the server closed before the body's end
            if end is None:
                raise                         # a chunked body cut off: the connection dropped
        if end is not None and pos != end:
            raise RangeError(f"server sent {pos - offset} of {end - offset} announced bytes",
                             True)
        return pos - offset


def main(conn, config: Config, index: int = 0) -> None:
    worker_setup(f"fetcher{index}", config.log_level)
    link = Link(conn, "fetcher")
    fetcher = Fetcher(link, config)
    link.start(connections=config.connections, http2=fetcher.pools.http2)

    def keep_warm():
        while True:
            time.sleep(min(KEEP_WARM_EVERY_S, config.keepalive_s / 3))
            try:
                fetcher.pools.keep_warm()
            except Exception:  # keeping warm is best effort
                log.exception("keep-warm failed")

    if config.pooling:
        threading.Thread(target=keep_warm, name="keep-warm", daemon=True).start()
    while True:
        msg = link.recv()
        if isinstance(msg, Shutdown):
            os._exit(0)
        fetcher.handle(msg)
