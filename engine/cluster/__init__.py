"""The engine on a Ray cluster: one ordinary engine per GPU on every node, one entry point.

``actor``: what runs in each Ray actor (a local engine). ``dispatch``: ``ClusterEngine``,
which places each job on an engine and retries a job whose engine was lost.
``server``: the local engine's messages over the dispatcher, for serve mode's socket and
for ``Engine(cluster=...)``, whose client is the local one's.

Ray is an optional dependency (``pip install -e ".[cluster]"``): nothing here imports it
until a cluster is asked for.
"""
from engine.cluster.actor import node_name
from engine.cluster.dispatch import ClusterBusy, ClusterEngine

__all__ = ["ClusterBusy", "ClusterEngine", "node_name"]
