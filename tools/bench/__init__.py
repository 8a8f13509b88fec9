"""``python -m engine bench``: the engine side by side with the methods miners use today.

One run starts the bundled local CDN (nginx behind the CDN emulator with a named network
profile), serves one clip, and measures every contender ``--runs`` times, interleaving
the contenders round by round (the order rotates each round) so that drift and noise
spread over all of them. The modes, one module each:

* ``default``: the engine against the stock and seed miners, PyAV on the URL and the
  physical floor; ``--model-bound`` (``model_bound``) puts a GPU model's stand-in in
  every contender's place of the processor;
* ``fetch`` (``--fetch``): the transfer alone, against httpx, aria2c and the link;
* ``sparse`` (``--sparse``): a few frames of a long video, against what VLM servers run;
* ``cluster`` (``--cluster``): one engine against a Ray cluster of two simulated GPU nodes.

They share one small framework: each contender is a ``Contender`` (``contenders``:
``prepare`` once off the clock, ``run`` once per round returning a measurement dict), a
``Context`` (``context``) holds what they run on (the clip, the local CDN, SSL_CERT_FILE,
the workers' environment, the warm engine), one ``Runner`` (``runner``) owns the rounds,
the notes and the JSON file, and ``tables`` turns the measurements into medians
[min-max] and tables (``plot`` into a waterfall). Subprocess contenders are ``workers``;
connections and bytes on the wire come from the emulator's own counters, so they are
known for every contender.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if "--worker" in argv:
        from engine.tools.bench.workers import worker_main
        return worker_main(argv, find_worker)
    if "--fetch" in argv:
        from engine.tools.bench.fetch import fetch_main
        return fetch_main([x for x in argv if x != "--fetch"])
    if "--cluster" in argv:
        from engine.tools.bench.cluster import main as cluster_main
        return cluster_main([x for x in argv if x != "--cluster"])
    if "--sparse" in argv:
        from engine.tools.bench.sparse import main as sparse_main
        return sparse_main([x for x in argv if x != "--sparse"])
    from engine.tools.bench.default import main as default_main
    return default_main(argv)


def find_worker(name: str):
    """A subprocess worker by the name ``--worker`` gives; a mode's own are ``MODE:NAME``."""
    if name.startswith("sparse:"):
        from engine.tools.bench.sparse import WORKERS
        return WORKERS[name.split(":", 1)[1]]
    from engine.tools.bench.workers import WORKERS
    return WORKERS[name]
