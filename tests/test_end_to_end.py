"""The whole pipeline through the real nginx: URL in, one result per frame out."""
from __future__ import annotations

import hashlib
import threading

import pytest

from engine import DecodeError, Engine, FetchError, ProcessorError
from tests.reference import assert_matches, reference


@pytest.mark.parametrize("name", ["small", "small-moov-end"])
def test_stats_match_reference_for_every_frame(engine, cdn, small_clips, name):
    report = engine.process(cdn.url(f"{name}.mp4"))
    assert report.ok and report.error is None
    assert report.video["frames"] == 50 and report.frames_processed == 50
    assert report.video["moov"] == ("end" if name.endswith("moov-end") else "front")
    assert (report.video["width"], report.video["height"], report.video["codec"]) == (320, 240, "h264")
    assert_matches(report, reference(small_clips[name]))
    t = report.timings_s
    assert 0 <= t["first_byte"] <= t["moov_ready"] <= t["first_frame"] <= t["first_result"] \
        <= t["total"]
    assert t["first_frame"] <= t["decode_done"] <= t["total"]


def test_null_processor_returns_one_empty_result_per_frame(engine, cdn):
    report = engine.process(cdn.url("small.mp4"), processor="engine.processors:null")
    assert [r["result"] for r in report.results] == [{}] * report.video["frames"]
    assert report.frames_processed == 50


def test_big_clip_both_layouts_frame_exact(engine, cdn, sn44_clips):
    for name, path in sn44_clips.items():
        report = engine.process(cdn.url(f"{name}.mp4"))
        assert report.video["frames"] == 750 and report.video["bytes"] == path.stat().st_size
        assert_matches(report, reference(path))


def test_second_job_reuses_pooled_connections(engine, cdn):
    engine.process(cdn.url("small.mp4"))
    second = engine.process(cdn.url("small-moov-end.mp4"))
    assert second.fetch["connections_new"] == 0
    assert second.fetch["connections_reused"] >= 1


def test_max_frames_fetches_only_what_the_first_frames_need(engine, cdn, sn44_clips):
    size = sn44_clips["sn44"].stat().st_size
    report = engine.process(cdn.url("sn44.mp4"), max_frames=10)
    assert report.frames_processed == 10
    assert report.fetch["bytes"] < size / 4
    assert_matches(report, reference(sn44_clips["sn44"], 10))
    end = engine.process(cdn.url("sn44-moov-end.mp4"), max_frames=10)
    assert end.frames_processed == 10 and end.fetch["bytes"] < size / 4
    assert_matches(end, reference(sn44_clips["sn44-moov-end"], 10))


def test_stream_yields_batches_in_frame_order(engine, cdn, small_clips):
    seen, fetched = [], []
    size = small_clips["small"].stat().st_size
    for batch in engine.stream(cdn.url("small.mp4")):
        assert len(batch.frame_numbers) == len(batch.results)
        assert (batch.frames_total, batch.bytes_total) == (50, size)   # progress
        fetched.append(batch.bytes_done)
        seen += batch.frame_numbers
    assert seen == list(range(50))
    assert fetched == sorted(fetched) and 0 < fetched[-1] <= size
    assert engine.last_report.frames_processed == 50


def test_two_jobs_at_once(engine, cdn, small_clips):
    reports = {}

    def run(name):
        reports[name] = engine.process(cdn.url(f"{name}.mp4"))

    threads = [threading.Thread(target=run, args=(n,)) for n in small_clips]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for name, path in small_clips.items():
        assert_matches(reports[name], reference(path))


def test_raising_processor_fails_one_job_and_the_next_succeeds(engine, cdn):
    with pytest.raises(ProcessorError, match="tests.processors:failing.*exploded on frame 5") as err:
        engine.process(cdn.url("small.mp4"), processor="tests.processors:failing")
    assert "\n" not in str(err.value)
    assert engine.process(cdn.url("small.mp4")).frames_processed == 50


def test_slow_processor_applies_backpressure_without_dropping(cdn):
    with Engine(processor="tests.processors:slow", device="cpu", fetchers=1, decoders=1,
                ring_slots=4, batch=2) as eng:
        report = eng.process(cdn.url("small.mp4"))
    assert [r["frame_number"] for r in report.results] == list(range(50))
    # The decoder could not run ahead of the consumer by more than the ring.
    assert report.timings_s["decode_done"] > 0.8 * (report.timings_s["total"] - 0.5)


def test_http2_and_http1_give_the_same_bytes(cdn, small_clips):
    want = hashlib.sha256(small_clips["small-moov-end"].read_bytes()).hexdigest()
    for http2, url, version in (("1", cdn.url("small-moov-end.mp4"), "HTTP/2"),
                                ("0", cdn.url_h1("small-moov-end.mp4"), "HTTP/1.1")):
        with Engine(processor="engine.processors:null", device="cpu", http2=http2, fetchers=1,
                    decoders=1, report_sha256=True, head_kb=64, range_mb=0.0625) as eng:
            report = eng.process(url)
        assert report.fetch["http_version"] == version
        assert report.fetch["sha256"] == want
        assert report.fetch["ranges"] >= 2


def test_bytes_exact_for_both_layouts_in_many_ranges(cdn, sn44_clips):
    with Engine(processor="engine.processors:null", device="cpu", report_sha256=True,
                range_mb=0.25, max_frames=None) as eng:
        for name, path in sn44_clips.items():
            report = eng.process(cdn.url(f"{name}.mp4"))
            assert report.fetch["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert report.fetch["ranges"] > 40


def test_redirect_is_followed_and_norange_server_falls_back(engine, cdn, small_clips):
    assert engine.process(cdn.url("redirect/small.mp4")).frames_processed == 50
    report = engine.process(cdn.url("norange/small.mp4"))
    assert_matches(report, reference(small_clips["small"]))
    assert report.fetch["ranges"] == 1


@pytest.mark.parametrize("path, kind, text", [
    ("missing.mp4", FetchError, "HTTP 404"),
    ("status/500", FetchError, "HTTP 500"),
    ("page.html", DecodeError, "text/html"),
    ("html", DecodeError, "text/html"),
    ("loop", FetchError, "too many redirects"),
])
def test_bad_urls_fail_cleanly(engine, cdn, path, kind, text):
    url = cdn.url(path)
    with pytest.raises(kind, match=text) as err:
        engine.process(url)
    message = str(err.value)
    assert url in message and "\n" not in message
    assert err.value.report.ok is False


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.mp4", "not a url"])
def test_non_http_schemes_are_refused(engine, url):
    with pytest.raises(FetchError, match="only http and https"):
        engine.process(url)


def test_oversize_file_is_refused(cdn):
    with Engine(processor="engine.processors:null", device="cpu", max_bytes=50_000,
                fetchers=1, decoders=1) as eng:
        with pytest.raises(FetchError, match="ENGINE_MAX_BYTES"):
            eng.process(cdn.url("small.mp4"))


def test_dropped_connection_is_retried(engine, faulty_server, small_clips):
    data = small_clips["small-moov-end"].read_bytes()
    server = faulty_server(data, mode="drop-once")
    with Engine(processor="engine.processors:stats", device="cpu", head_kb=64,
                range_mb=0.0625, fetchers=1, decoders=1) as eng:
        report = eng.process(server.url("clip.mp4"))
    assert report.fetch["retries"] >= 1
    assert_matches(report, reference(small_clips["small-moov-end"]))


@pytest.mark.parametrize("mode, text", [("short", r"server sent \d+ of \d+ announced bytes"),
                                        ("long", "more bytes")])
def test_lying_servers_fail_cleanly(engine, faulty_server, small_clips, mode, text):
    server = faulty_server(small_clips["small"].read_bytes(), mode=mode)
    with pytest.raises(FetchError, match=text):
        engine.process(server.url("clip.mp4"))


def test_idle_pooled_connections_are_kept_warm(cdn):
    """With a 3 s idle expiry, connections survive 7 s of idleness only because the
    fetchers touch them every second (keep-warm): the next job opens none."""
    import time
    with Engine(processor="engine.processors:null", device="cpu", keepalive_s=3.0, fetchers=1,
                decoders=1) as eng:
        first = eng.process(cdn.url("small.mp4"))
        assert first.fetch["connections_new"] >= 1
        time.sleep(7)
        second = eng.process(cdn.url("small.mp4"))
        assert second.fetch["connections_new"] == 0 and second.fetch["connections_reused"] >= 1


def test_prewarm_opens_connections_before_the_first_job(cdn):
    with Engine(processor="engine.processors:null", device="cpu", fetchers=2, connections=2,
                decoders=1) as eng:
        assert eng.prewarm([cdn.url("")]) == 4
        report = eng.process(cdn.url("small.mp4"))
        assert report.fetch["connections_new"] == 0


def test_tls_is_verified(cdn, monkeypatch):
    """Without the test CA the engine refuses the server's self-signed certificate."""
    from engine import FetchError
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    with Engine(processor="engine.processors:null", device="cpu", fetchers=1, decoders=1) as eng:
        with pytest.raises(FetchError, match="TLS failed"):
            eng.process(cdn.url("small.mp4"))


def test_connection_refused_is_a_clean_error(engine):
    from engine.demo.nginx import free_port
    url = f"https://127.0.0.1:{free_port()}/x.mp4"
    with pytest.raises(FetchError, match="cannot connect") as err:
        engine.process(url)
    assert url in str(err.value)


def test_http2_auto_measures_and_then_sticks_to_one_protocol(cdn, sn44_clips):
    """auto: a server without HTTP/2 is seen as such at once; one with it gets both
    protocols timed, then every request of a later job uses the one that measured faster."""
    with Engine(processor="engine.processors:null", device="cpu", http2="auto", fetchers=1,
                decoders=1, range_mb=0.25) as eng:
        report = eng.process(cdn.url_h1("sn44.mp4"), max_frames=200)
        assert set(report.fetch["requests_by_version"]) == {"HTTP/1.1"}
        versions = []
        for _ in range(4):
            versions.append(eng.process(cdn.url("sn44.mp4")).fetch["requests_by_version"])
    assert "HTTP/2" in versions[0] and "HTTP/1.1" in versions[0]     # measuring both
    assert len(versions[-1]) == 1, versions                            # decided


def test_idle_pooled_rings_give_way_to_a_new_job(cdn, sn44_clips):
    """A finished job's frame ring is kept for reuse, but never at the cost of admitting a
    job: with room for one video and no more, jobs still run one after another."""
    size = sn44_clips["sn44"].stat().st_size
    with Engine(processor="engine.processors:null", device="cpu", fetchers=1, decoders=1,
                max_bytes=size + 2 * 2**20) as eng:
        for _ in range(2):
            assert eng.process(cdn.url("sn44.mp4"), max_frames=5).frames_processed == 5


def test_a_ring_smaller_than_a_batch_does_not_deadlock(cdn, small_clips):
    with Engine(processor="engine.processors:stats", device="cpu", fetchers=1, decoders=1,
                ring_slots=4, batch=16, job_timeout_s=30) as eng:
        assert_matches(eng.process(cdn.url("small.mp4")), reference(small_clips["small"]))


def test_rgb_conversion_threads_change_no_pixel(cdn, small_clips):
    """ENGINE_SWS_THREADS changes speed only: with PyAV's own default (0: one swscale
    thread per CPU) the results are the reference's too (the default, 1, is every other
    test)."""
    with Engine(processor="engine.processors:stats", device="cpu", fetchers=1, decoders=1,
                sws_threads=0) as eng:
        assert eng.workers["decoder0"]["sws_threads"] == 0   # the setting reached it
        assert_matches(eng.process(cdn.url("small.mp4")), reference(small_clips["small"]))


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device (the GPU path: pinned staging, "
                                        "copy stream, two batches deep)")
def test_cuda_path_gives_the_cpu_results(cdn, sn44_clips, small_clips):
    with Engine(processor="engine.processors:stats", device="cuda") as eng:
        report = eng.process(cdn.url("sn44.mp4"))
    assert_matches(report, reference(sn44_clips["sn44"]))
    # A ring of 4 slots and batches of 2: slots are refilled by the decoder while their
    # frames are still on their way through pinned staging to the device.
    with Engine(processor="engine.processors:stats", device="cuda", fetchers=1, decoders=1,
                ring_slots=4, batch=2) as eng:
        report = eng.process(cdn.url("small-moov-end.mp4"))
    assert_matches(report, reference(small_clips["small-moov-end"]))
