"""``python -m engine bench --cluster``: one engine against a Ray cluster of two simulated
GPU nodes, on a model-bound load.

8 concurrent jobs (``--jobs``) of the small clip (50 frames) with a processor that holds
each frame ``--ms-per-frame`` ms (20) without using the CPU, standing in for a GPU model:
wall time for all of them on one local engine, then on two engines of a simulated cluster
(``ray.cluster_utils.Cluster``: a head without GPUs and two nodes with one GPU each), and
the throughput ratio. Then the first result's latency (client-side, submit to first
streamed batch, idle engine, median of ``--runs``) through the cluster against the local
engine. Everything on 127.0.0.1; the clip is served by the tests' nginx CDN.
"""
from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine.tools.bench.context import REPO


def _all_jobs(eng, url: str, jobs: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        reports = list(pool.map(lambda _: eng.report(url), range(jobs)))
    wall = time.perf_counter() - t0
    bad = [r.error for r in reports if not r.ok]
    if bad:
        raise SystemExit(f"error: a job failed: {bad[0]}")
    return wall, sum(r.frames_processed for r in reports)


def _first_result(eng, url: str, runs: int) -> float:
    lat = []
    for _ in range(runs):
        t0 = time.perf_counter()
        stream = eng.stream(url)
        next(stream)
        lat.append(time.perf_counter() - t0)
        for _ in stream:
            pass
    return statistics.median(lat)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine bench --cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--ms-per-frame", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=5, help="first-result samples per engine")
    a = ap.parse_args(argv)
    _environment(a)

    from engine.demo.clips import cached_clip
    from engine.demo.nginx import NginxCDN

    tmp = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    (tmp / "root").mkdir()
    os.link(cached_clip("small"), tmp / "root" / "small.mp4")
    cdn = NginxCDN(tmp / "root", tmp / "nginx").start()
    os.environ["SSL_CERT_FILE"] = str(cdn.ca_file)
    url = cdn.url("small.mp4")
    try:
        local = _on_one_engine(url, a)
        cluster = _on_a_cluster(url, a)
    finally:
        cdn.stop()
    _print(a, local, cluster)
    return 0


def _environment(a) -> None:
    """What the processor, Ray's nodes and the engines read, set before any of them starts."""
    os.environ["ENGINE_WAIT_MS_PER_FRAME"] = str(a.ms_per_frame)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                             os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"    # every address on 127.0.0.1
    os.environ.setdefault("ENGINE_LOG_LEVEL", "WARNING")


OPTIONS = dict(processor="engine.processors:wait", device="cpu", fetchers=1,
               connections=2, decoders=2)


def _on_one_engine(url: str, a) -> tuple[float, int, float]:
    """(wall for all jobs, frames, first result) on one local engine."""
    from engine import Engine
    with Engine(cluster="", **OPTIONS) as eng:
        eng.report(url)     # warm: connections pooled, processor loaded
        wall, frames = _all_jobs(eng, url, a.jobs)
        return wall, frames, _first_result(eng, url, a.runs)


def _on_a_cluster(url: str, a) -> tuple[float, int, float]:
    """The same on a simulated cluster: a head without GPUs and two one-GPU nodes."""
    import ray
    from ray.cluster_utils import Cluster

    from engine import Engine
    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1, num_gpus=1)
    try:
        with Engine(cluster=c.address, **OPTIONS) as eng:
            deadline = time.monotonic() + 180
            while sum(e["state"] == "up" for e in eng.status()["engines"]) < 2:
                if time.monotonic() > deadline:
                    raise SystemExit("error: the cluster's engines did not start")
                time.sleep(0.2)
            for _ in range(2):      # one warm job on each engine
                _all_jobs(eng, url, 2)
            wall, frames = _all_jobs(eng, url, a.jobs)
            out = wall, frames, _first_result(eng, url, a.runs)
        assert not ray.is_initialized()
        return out
    finally:
        c.shutdown()


def _print(a, local: tuple, cluster: tuple) -> None:
    (local_wall, frames, local_first), (cluster_wall, cframes, cluster_first) = local, cluster
    print(f"{a.jobs} concurrent jobs x 50 frames, processor {a.ms_per_frame:g} ms/frame "
          "without CPU")
    print(f"  one engine          {local_wall:6.2f} s  {frames / local_wall:6.1f} frames/s")
    print(f"  cluster, 2 nodes    {cluster_wall:6.2f} s  {cframes / cluster_wall:6.1f} frames/s")
    print(f"  throughput ratio    {local_wall / cluster_wall:6.2f}x  (goal >= 1.8x)")
    print(f"first result, idle engine, median of {a.runs}")
    print(f"  one engine          {local_first * 1000:6.1f} ms")
    print(f"  cluster             {cluster_first * 1000:6.1f} ms  "
          f"(+{(cluster_first - local_first) * 1000:.1f} ms)")
