"""A real HTTPS "CDN" on 127.0.0.1, served by the system's nginx.

Why nginx rather than a Python server: the engine's fetch path (TLS,
HTTP/2 multiplexing, keep-alive, Range, sendfile-speed bodies) should be
measured and tested against the kind of server it will meet in production,
not against a toy that may be the bottleneck or may be lenient where nginx
is not.  Misbehaviours nginx cannot produce live in tests/faulty_server.py.

Design choices:
  * nginx runs with ``daemon off`` as our direct child in its own session, so
    we can reap it, read its stderr on failure, and SIGKILL its whole process
    group as a last resort: stop() never leaves an nginx behind.  stop() uses
    SIGTERM (fast shutdown), not SIGQUIT, whose graceful wait would hang on a
    client that stalls mid-transfer.
  * Every path nginx writes (pid, logs, temp dirs) lives in ``workdir``, so it
    runs as root or not without touching /var.
  * A fresh self-signed certificate (CA:TRUE, SAN 127.0.0.1 + localhost) is
    made at start; ``ca_file`` can be given to ssl.create_default_context or
    exported as SSL_CERT_FILE, which httpx honours.
  * Two TLS ports: ``port`` offers HTTP/2 and HTTP/1.1 via ALPN, ``port_h1``
    HTTP/1.1 only.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import ipaddress
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NGINX = os.environ.get("ENGINE_NGINX", "/usr/sbin/nginx")
HTML_PAGE = "<!doctype html><html><head><title>engine</title></head><body>not a video</body></html>"


def write_self_signed_cert(cert_file: Path, key_file: Path) -> None:
    """Write a self-signed EC certificate for 127.0.0.1/localhost that is its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def free_port() -> int:
    """An ephemeral port that was free a moment ago (callers retry on conflict)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_version() -> tuple[int, ...]:
    out = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr
    return tuple(int(x) for x in re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out).groups())


def _die_with_starter() -> None:
    """In the child, before exec: nginx gets SIGTERM when the process that started it dies
    without stopping it (a test run or demo killed with SIGKILL), instead of serving on."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)   # PR_SET_PDEATHSIG


class NginxCDN:
    """nginx serving ``root`` over HTTPS on two ephemeral 127.0.0.1 ports."""

    def __init__(self, root: Path, workdir: Path):
        self.root = Path(root).resolve()
        self.workdir = Path(workdir).resolve()
        self.port: int | None = None
        self.port_h1: int | None = None
        self.pid: int | None = None  # nginx master pid
        self.ca_file = self.workdir / "cert.pem"
        self.cert_file = self.ca_file
        self.key_file = self.workdir / "key.pem"
        self.conf_file = self.workdir / "nginx.conf"
        self.pid_file = self.workdir / "nginx.pid"
        self._proc: subprocess.Popen | None = None
        self._owner = os.getpid()

    # -- public API ---------------------------------------------------------
    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def url_h1(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port_h1}/{path.lstrip('/')}"

    def start(self, attempts: int = 5) -> "NginxCDN":
        if self._proc is not None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_self_signed_cert(self.cert_file, self.key_file)
        error = ""
        for _ in range(attempts):
            self.port, self.port_h1 = free_port(), free_port()
            if self.port == self.port_h1:
                continue
            self.conf_file.write_text(self._config())
            error = self._launch()
            if not error:
                atexit.register(self.stop)
                return self
            if "Address already in use" not in error:
                break
        raise RuntimeError(f"nginx failed to start: {error.strip()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop nginx and wait until master and worker are gone (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is None or os.getpid() != self._owner:  # forked children never stop it
            return
        atexit.unregister(self.stop)
        pid = self._read_pid() or proc.pid
        try:
            os.kill(pid, signal.SIGTERM)  # fast shutdown: drops open connections
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)  # the master exits only after its worker has
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: master + worker
            proc.wait()
        self.pid = None

    def __enter__(self) -> "NginxCDN":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------
    def _launch(self) -> str:
        """Start nginx and wait for TLS on both ports; return "" or the error text."""
        log = open(self.workdir / "nginx.stderr", "w+")
        self.pid_file.unlink(missing_ok=True)
        proc = subprocess.Popen(
            [NGINX, "-p", str(self.workdir), "-c", str(self.conf_file), "-e", str(self.workdir / "error.log")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            preexec_fn=_die_with_starter,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if self._tls_ready(self.port) and self._tls_ready(self.port_h1):
                self._proc, self.pid = proc, self._read_pid() or proc.pid
                log.close()
                return ""
            time.sleep(0.02)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        error = log.read()
        log.close()
        error_log = self.workdir / "error.log"
        if error_log.exists():
            error += error_log.read_text()
        return error or "nginx did not become ready"

    def _tls_ready(self, port: int) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                    return True
        except OSError:
            return False

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _config(self) -> str:
        w, root = self.workdir, self.root
        # nginx >= 1.25.1 has "http2 on;"; older ones take a listen flag.
        new_h2 = nginx_version() >= (1, 25, 1)
        h2_listen, h2_directive = ("", "http2 on;") if new_h2 else (" http2", "")
        temps = "\n".join(
            f"    {kind}_temp_path {w / ('tmp-' + kind)};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        # Workers default to user "nobody", which cannot read files under
        # root-only directories (/root/.cache, pytest's 0700 tmp dirs).
        user = "user root;" if os.geteuid() == 0 else ""
        # Shared by the HTTP/2 and the HTTP/1.1-only server blocks (with
        # "http2 on;" being per server in new nginx, they must be separate).
        locations = w / "locations.conf"
        locations.write_text(f"""\
ssl_certificate {self.cert_file};
ssl_certificate_key {self.key_file};
ssl_protocols TLSv1.2 TLSv1.3;
root {root};
location / {{ }}
location /norange/ {{ alias {root}/; max_ranges 0; }}
location /slow/ {{ alias {root}/; limit_rate 2m; }}
location = /status/404 {{ return 404; }}
location = /status/500 {{ return 500; }}
location /redirect/ {{ rewrite ^/redirect/(.*)$ /$1 redirect; }}
location /other-origin/ {{ rewrite ^/other-origin/(.*)$ https://localhost:{self.port_h1}/$1 redirect; }}
location = /loop {{ return 302 /loop; }}
location = /html {{ default_type text/html; return 200 "{HTML_PAGE}"; }}
""")
        return f"""\
{user}
daemon off;
master_process on;
worker_processes 1;
pid {self.pid_file};
error_log {w / 'error.log'} warn;
events {{ worker_connections 1024; }}
http {{
    types {{ video/mp4 mp4; text/html html; text/plain txt; }}
    default_type application/octet-stream;
    access_log off;
{temps}
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 75s;
    keepalive_requests 10000;
    absolute_redirect off;
    server {{
        listen 127.0.0.1:{self.port} ssl{h2_listen};
        {h2_directive}
        include {locations};
    }}
    server {{
        listen 127.0.0.1:{self.port_h1} ssl;
        include {locations};
    }}
}}
"""
