"""A real nginx (Debian's package) on loopback, for the tests and benchmarks that put it in
front of a homeserver: TLS reverse proxy, optionally mirroring federation to modgud's sink.
Runs in the foreground of its own process with every path inside its work directory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from proxy_addons.testbed.homeserver import self_signed_certificate, stop_process

__all__ = ["Nginx", "nginx_binary"]


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )


class Nginx:
    """`nginx` serving TLS on `port` for `upstream` (plain HTTP), and when `mirror` is
    given, sending a copy of every federation request there (the README's sink setup).
    Several upstreams: round robin with passive health checks, as the README's replica
    guide sets it up (a refused connection or a 502/503 tries the next one)."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        upstream: str | list[str],
        mirror: str | None = None,
    ):
        self.workdir = Path(workdir)
        self.port = port
        upstreams = [upstream] if isinstance(upstream, str) else list(upstream)
        self.upstreams = [u.rstrip("/") for u in upstreams]
        self.upstream = self.upstreams[0]
        self.mirror = mirror.rstrip("/") if mirror else None
        self.process: subprocess.Popen[bytes] | None = None

    def config(self, cert: Path, key: Path) -> str:
        mirror = ""
        mirror_location = ""
        if self.mirror:
            mirror = "mirror /modgud_mirror;\n            mirror_request_body on;"
            mirror_location = f"""
        location = /modgud_mirror {{
            internal;
            proxy_pass {self.mirror}$request_uri;
            proxy_set_header Host $host;
        }}"""
        failover = " max_fails=1 fail_timeout=2s" if len(self.upstreams) > 1 else ""
        servers = "\n        ".join(
            f"server {u.split('://', 1)[1]}{failover};" for u in self.upstreams
        )
        w = self.workdir
        user = "user root;" if os.geteuid() == 0 else ""  # workers write the temp paths here
        return f"""
{user}
daemon off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {w}/access.log;
    client_body_temp_path {w}/body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    client_max_body_size 50m;
    upstream homeserver {{
        {servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            {mirror}
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_pass http://homeserver;
            proxy_next_upstream error timeout http_502 http_503;
        }}{mirror_location}
    }}
}}
"""

    def start(self, timeout: float = 15) -> Nginx:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cert, key = self_signed_certificate(self.workdir)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.config(cert, key))
        log = open(self.workdir / "nginx.out", "wb")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(self.workdir)], stdout=log, stderr=log
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("nginx exited:\n" + self.log())
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("nginx did not start:\n" + self.log())

    def log(self) -> str:
        return "".join(
            p.read_text(errors="replace")[-2000:]
            for p in (self.workdir / "nginx.out", self.workdir / "error.log")
            if p.exists()
        )

    def stop(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
