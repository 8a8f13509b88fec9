"""A small Prometheus text endpoint for serve mode (``--metrics-port``).

It serves the supervisor's last psutil sample (taken every few seconds in its own loop),
so scraping never touches job state from another thread.
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def render(status: dict) -> str:
    lines = ["# TYPE engine_process_cpu_percent gauge", "# TYPE engine_process_rss_bytes gauge",
             "# TYPE engine_process_open_fds gauge", "# TYPE engine_process_restarts counter"]
    for p in status.get("processes", []):
        label = f'role="{p["role"]}"'
        for name, key, scale in (("cpu_percent", "cpu_percent", 1), ("rss_bytes", "rss_mb", 2**20),
                                 ("open_fds", "open_files", 1), ("restarts", "restarts", 1)):
            if p.get(key) is not None:
                lines.append(f"engine_process_{name}{{{label}}} {p[key] * scale:g}")
    shm = status.get("shared_memory", {})
    lines += ["# TYPE engine_shm_bytes gauge", f"engine_shm_bytes {shm.get('bytes', 0)}",
              "# TYPE engine_shm_segments gauge", f"engine_shm_segments {shm.get('segments', 0)}",
              "# TYPE engine_jobs_in_flight gauge",
              f"engine_jobs_in_flight {len(status.get('jobs_in_flight', []))}",
              "# TYPE engine_connections gauge"]
    for host, n in status.get("connections", {}).items():
        lines.append(f'engine_connections{{host="{host}"}} {n}')
    return "\n".join(lines) + "\n"


def start_metrics(port: int, supervisor) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.rstrip("/") not in ("", "/metrics"):
                self.send_error(404)
                return
            body = render(supervisor.last_status).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
