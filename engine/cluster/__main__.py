"""``python -m engine.cluster FD``: ``Engine(cluster=...)`` starts its cluster side so,
as it starts a local supervisor (``engine.supervisor``): a plain exec, given one end of a
socket pair and then the config."""
import sys

from multiprocess.connection import Connection

from engine.cluster.server import main

_conn = Connection(int(sys.argv[1]))
main(_conn, _conn.recv())
