"""The engine on a Ray cluster simulated on this machine: a head without GPUs and two nodes
with one (simulated) GPU each, real engines inside the actors, the real nginx CDN.

One cluster for the whole module (three raylets are heavy on two cores); the tests run in
file order, and the node-loss tests leave the cluster as they found it: two GPU nodes.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import psutil
import pytest

# Token authentication on, as a deployment has it, and every address on the loopback (Ray
# otherwise swaps 127.0.0.1 for the machine's outside address): Ray reads these at import.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from engine import Engine, EngineBusy, EngineClosed, EngineError
from engine.cluster import ClusterBusy, ClusterEngine, node_name
from engine.cluster.dispatch import NAMESPACE
from engine.cluster.server import format_status
from engine.errors import error_from, kind_of
from engine.shm.sweep import owned_blocks
from tests.conftest import wait_for
from tests.reference import assert_matches, reference

ROOT = str(Path(__file__).resolve().parent.parent)
WAIT = "tests.processors:wait"      # 20 ms per frame without CPU: a GPU model's stand-in
NODE = dict(num_cpus=1, num_gpus=1)


@pytest.fixture(scope="module")
def cluster(cdn):
    """Head + two one-GPU nodes, token authentication on. The raylets take this process's
    environment: the CDN's certificate, and this checkout on PYTHONPATH (on a real
    cluster every node has the engine installed)."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "ENGINE_WAIT_MS_PER_FRAME": "20", "RAY_DEDUP_LOGS": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.gpu_nodes = [c.add_node(**NODE) for _ in range(2)]
    try:
        yield c
    finally:
        c.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def eng(cluster, cdn):
    """The dispatcher itself, in this process (``Engine(cluster=...)`` runs one in a child)."""
    engine = ClusterEngine(cluster.address, processor=WAIT, device="cpu", fetchers=1,
                           connections=2, decoders=1, job_timeout_s=60.0,
                           prewarm=(cdn.url("/"),))
    engine.seen_pids = set()
    yield engine
    engine.close()


def _names(c: Cluster) -> dict[str, object]:
    return {node_name("127.0.0.1", n.node_id): n for n in c.gpu_nodes}


def _engines(eng, seen=True) -> list[dict]:
    st = eng.status()
    if seen:
        eng.seen_pids |= {e["pid"] for e in st["engines"] if e["pid"]}
    return st["engines"]


def _up_on_all_nodes(eng, c: Cluster):
    engines = _engines(eng)
    up = {e["node"] for e in engines if e["state"] == "up"}
    return up == set(_names(c)) and len(engines) == 2


@pytest.mark.parametrize("address, text", [
    ("refused", "cannot join the Ray cluster at 127.0.0.1:"),
    ("no-port", "expected HOST:PORT"),
])
def test_unreachable_or_malformed_cluster_address_is_one_line(address, text, cdn):
    from engine.demo.nginx import free_port
    address = f"127.0.0.1:{free_port()}" if address == "refused" else "127.0.0.1"
    done = subprocess.run([sys.executable, "-m", "engine", "run", cdn.url("small.mp4"),
                           "--cluster", address], cwd=ROOT, env=_cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert text in done.stderr and "Traceback" not in done.stderr


def test_an_unreachable_cluster_raises_its_kind_through_the_child():
    from engine.demo.nginx import free_port
    with pytest.raises(EngineClosed, match="cannot join the Ray cluster"):
        Engine(cluster=f"127.0.0.1:{free_port()}")


def test_a_cluster_engine_on_every_gpu(eng, cluster):
    wait_for(lambda: _up_on_all_nodes(eng, cluster), 90, "an engine up on each GPU node", every=0.2)
    engines = _engines(eng)
    assert sorted(e["node"] for e in engines) == sorted(_names(cluster))
    assert all(e["gpus"] == ["0"] for e in engines)     # Ray's GPU, seen by the engine
    assert all(e["engine"]["processes"] for e in engines)  # each engine's own status
    assert all(e["engine"]["connections"] for e in engines)  # each prewarmed itself
    table = format_status(eng.status())
    for name in _names(cluster):
        assert name in table


def test_jobs_spread_evenly_and_frames_are_exact(eng, cluster, cdn, small_clips):
    url = cdn.url("small.mp4")
    with ThreadPoolExecutor(4) as pool:
        reports = list(pool.map(lambda _: eng.report(url), range(4)))
    for r in reports:
        assert r.ok, r.error
        assert [x["frame_number"] for x in r.results] == list(range(50))
    assert sorted(Counter(r.node for r in reports).values()) == [2, 2]
    assert set(r.node for r in reports) == set(_names(cluster))
    exact = eng.process(url, processor="engine.processors:stats")
    assert_matches(exact, reference(small_clips["small"]))


def test_selection_and_frames_on_the_cluster(eng, cluster, cdn, small_clips):
    url = cdn.url("small.mp4")
    report = eng.process(url, every=7)
    assert [x["frame_number"] for x in report.results] == list(range(0, 50, 7))
    assert report.selection["every"] == 7 and report.frames_selected == 8
    got = eng.frames(url, count=3)
    assert got.frame_numbers == [0, 24, 49] and got.report.node in _names(cluster)
    with av.open(str(small_clips["small"])) as c:
        plain = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert np.array_equal(got.array, np.stack([plain[i] for i in (0, 24, 49)]))


def test_stream_yields_batches_before_the_download_ends(eng, cluster, cdn, sn44_clips):
    size = sn44_clips["sn44"].stat().st_size
    batches = list(eng.stream(cdn.url("slow/sn44.mp4"), processor="engine.processors:null"))
    assert batches[0].bytes_done < batches[0].bytes_total == size
    assert [n for b in batches for n in b.frame_numbers] == list(range(750))
    assert eng.last_report.node in _names(cluster)


def test_every_engine_full_then_cluster_busy(eng, cdn):
    url = cdn.url("sn44.mp4")
    eng.busy_wait_s = 0.5
    try:
        with ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(eng.report, url, max_frames=150) for _ in range(4)]
            wait_for(lambda: sum(e["jobs_in_flight"] for e in _engines(eng)) == 4, 90,
                     "four jobs in flight", every=0.2)
            with pytest.raises(ClusterBusy, match="cluster busy") as busy:
                eng.process(url, max_frames=10)
            # what a served cluster sends: the kind, which the client raises as EngineBusy
            assert type(error_from(kind_of(busy.value), "busy")) is EngineBusy
            assert all(j.result().ok for j in jobs)
    finally:
        eng.busy_wait_s = eng.config.job_timeout_s


def _running_on(eng) -> str:
    busy = [e["node"] for e in _engines(eng) if e["jobs_in_flight"]]
    return busy[0] if len(busy) == 1 else ""


def test_node_lost_before_any_result_retries_on_another(eng, cluster, cdn):
    box = {}
    worker = threading.Thread(target=lambda: box.update(
        r=eng.report(cdn.url("sn44.mp4"), max_frames=250)))
    worker.start()
    lost = wait_for(lambda: _running_on(eng), 90, "the job placed", every=0.2)
    cluster.remove_node(_names(cluster)[lost])
    cluster.gpu_nodes = [n for n in cluster.gpu_nodes if _names(cluster).get(lost) is not n]
    worker.join(120)
    report = box["r"]
    assert report.ok, report.error
    assert report.node != lost and report.node in _names(cluster)
    assert [x["frame_number"] for x in report.results] == list(range(250))


def test_a_joining_node_gets_the_lost_engine(eng, cluster):
    cluster.gpu_nodes.append(cluster.add_node(**NODE))
    wait_for(lambda: _up_on_all_nodes(eng, cluster), 90, "the new node's engine up", every=0.2)
    assert sum(e["restarts"] for e in _engines(eng)) == 1     # Ray restarted the lost one


def test_node_lost_after_results_fails_naming_it(eng, cluster, cdn):
    stream = eng.stream(cdn.url("sn44.mp4"), max_frames=300)
    first = next(stream)
    assert first.frame_numbers[0] == 0
    lost = wait_for(lambda: _running_on(eng), 90, "the job placed", every=0.2)
    cluster.remove_node(_names(cluster)[lost])
    cluster.gpu_nodes = [n for n in cluster.gpu_nodes if _names(cluster).get(lost) is not n]
    with pytest.raises(EngineError) as err:
        for _ in stream:
            pass
    assert lost in str(err.value) and "lost" in str(err.value)
    cluster.gpu_nodes.append(cluster.add_node(**NODE))
    wait_for(lambda: _up_on_all_nodes(eng, cluster), 90, "two engines up again", every=0.2)
    assert eng.process(cdn.url("small.mp4")).frames_processed == 50


def test_close_leaves_no_actor_engine_process_or_segment(eng, cluster):
    _engines(eng)
    pids = set(eng.seen_pids)
    assert len(pids) >= 4          # two engines at start, two restarted after node losses
    eng.close()
    assert not ray.is_initialized()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        actors = ray.util.list_named_actors(all_namespaces=True)
    finally:
        ray.shutdown()
    assert not [a for a in actors if a["namespace"] == NAMESPACE]   # no other engine runs
    left = [p for p in pids if psutil.pid_exists(p)
            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"engine supervisors still running: {left}"
    assert not [b for p in pids for b in owned_blocks(p)]


# -- the commands, on the same cluster (the module's engine is closed by now, its GPUs free)

def _cli_env():
    return dict(os.environ, ENGINE_LOG_LEVEL="WARNING")


def test_run_with_cluster_option(cluster, cdn, tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "engine", "run", cdn.url("small.mp4"), "--cluster",
         cluster.address, "--processor", WAIT, "--device", "cpu", "--json", str(out), "--quiet"],
        cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["frames_processed"] == 50
    assert report["node"] in _names(cluster)


def test_serve_mode_over_the_cluster(cluster, cdn, tmp_path):
    sock = str(tmp_path / "engine.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "engine", "run", "--cluster", cluster.address, "--socket", sock,
         "--processor", WAIT, "--device", "cpu"],
        cwd=ROOT, env=_cli_env(), stderr=subprocess.PIPE, text=True)
    try:
        assert "serving on" in server.stderr.readline()
        with Engine.connect(sock) as client:       # what a miner already does
            report = client.process(cdn.url("small.mp4"))
            assert report.frames_processed == 50 and report.node in _names(cluster)
            batches = list(client.stream(cdn.url("small.mp4")))
            assert [n for b in batches for n in b.frame_numbers] == list(range(50))
            st = client.status()
        assert {e["node"] for e in st["engines"]} == set(_names(cluster))
        table = subprocess.run([sys.executable, "-m", "engine", "status", "--socket", sock],
                               cwd=ROOT, env=_cli_env(), capture_output=True, text=True,
                               timeout=60)
        assert table.returncode == 0 and all(n in table.stdout for n in _names(cluster))
        pids = {e["pid"] for e in st["engines"]}
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert not os.path.exists(sock)
    assert not [p for p in pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_a_processor_that_cannot_load_fails_the_start_clearly(cluster):
    with pytest.raises(EngineError, match="stand-in model weights missing"):
        Engine(cluster=cluster.address, processor="tests.processors:broken_factory",
               device="cpu", fetchers=1, decoders=1)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        assert not ray.util.list_named_actors(all_namespaces=True)
    finally:
        ray.shutdown()


def test_engine_with_a_cluster_is_an_engine(cluster, cdn, small_clips):
    """``Engine(cluster=...)``: the local engine's client, its dispatcher in a child."""
    with Engine(cluster=cluster.address, processor=WAIT, device="cpu", fetchers=1,
                decoders=1) as eng:
        assert isinstance(eng, Engine)
        report = eng.process(cdn.url("small.mp4"))
        assert report.frames_processed == 50 and report.node in _names(cluster)
        got = eng.frames(cdn.url("small.mp4"), count=3)
        child = eng.pid
    assert got.frame_numbers == [0, 24, 49] and got.report.node in _names(cluster)
    with av.open(str(small_clips["small"])) as c:
        plain = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert np.array_equal(got.array, np.stack([plain[i] for i in (0, 24, 49)]))
    assert not owned_blocks(child)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        assert not ray.util.list_named_actors(all_namespaces=True)
    finally:
        ray.shutdown()
