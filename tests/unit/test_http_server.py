"""The metrics, probe and /scale server is bounded: half-sent requests cannot pile up threads, an
idle connection is closed, and it answers again once they are gone."""

import socket
import threading
import time
import urllib.request

import pytest

from common.http_server import HEADER_DEADLINE_S, MAX_CONNECTIONS, TEXT, serve

pytestmark = pytest.mark.unit


def test_half_sent_requests_take_at_most_max_connections_threads_and_are_dropped():
    server = serve("127.0.0.1", 0, {"/ok": lambda: (200, b"ok\n", TEXT)}, "test")
    port = server.server_address[1]
    before = threading.active_count()
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS + 40):
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n")  # never finished
            idle.append(connection)
        time.sleep(0.5)
        assert threading.active_count() <= before + MAX_CONNECTIONS
        time.sleep(HEADER_DEADLINE_S + 1)  # each idle connection is closed after the read timeout
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/ok", timeout=5).read() == b"ok\n"
        assert threading.active_count() <= before + 1
    finally:
        for connection in idle:
            connection.close()
        server.shutdown()


def trickle(port: int, stop: threading.Event, closed: list) -> None:
    """A slow client: the start of a request, then a byte a second, until the server closes it."""
    connection = socket.create_connection(("127.0.0.1", port))
    connection.settimeout(1.0)
    started = time.monotonic()
    try:
        connection.sendall(b"GET /metrics HTTP/1.1\r\n")
        while not stop.is_set():
            try:
                if connection.recv(1) == b"":
                    break  # closed by the server
            except TimeoutError:
                pass
            connection.sendall(b"X")
    except OSError:
        pass  # reset by the server
    finally:
        closed.append(time.monotonic() - started)
        connection.close()


def test_clients_that_trickle_their_request_cannot_hold_the_probes():
    """64 clients each sending a byte a second (twice the slots the server once had) for 6 s: every
    probe meanwhile is answered at once, and each slow client is closed at the request deadline."""
    server = serve("127.0.0.1", 0, {"/healthz": lambda: (200, b"ok\n", TEXT)}, "test")
    port = server.server_address[1]
    stop, closed = threading.Event(), []
    slow = [threading.Thread(target=trickle, args=(port, stop, closed), daemon=True) for _ in range(64)]
    try:
        for thread in slow:
            thread.start()
        time.sleep(0.5)
        answered = 0
        for _ in range(12):
            started = time.monotonic()
            assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read() == b"ok\n"
            assert time.monotonic() - started < 0.5
            answered += 1
            time.sleep(0.5)
        assert answered == 12
        assert len(closed) == 64 and max(closed) < HEADER_DEADLINE_S + 1.5, sorted(closed)[-3:]
    finally:
        stop.set()
        server.shutdown()


def test_a_flood_of_idle_connections_cannot_fill_the_server():
    """More half-sent requests at once than the server keeps: the oldest make way, so a probe that
    sends its request at once is still answered."""
    server = serve("127.0.0.1", 0, {"/healthz": lambda: (200, b"ok\n", TEXT)}, "test")
    port = server.server_address[1]
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS + 50):
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(b"GET /healthz HTTP/1.1\r\n")
            idle.append(connection)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read() == b"ok\n"
    finally:
        for connection in idle:
            connection.close()
        server.shutdown()


def test_a_failing_route_answers_500_and_the_server_serves_on():
    def broken():
        raise KeyError("since")  # a malformed record once made /metrics a 500 with a dead scrape

    server = serve("127.0.0.1", 0, {"/broken": broken, "/ok": lambda: (200, b"ok\n", TEXT)}, "test")
    port = server.server_address[1]
    try:
        with pytest.raises(urllib.error.HTTPError, match="500"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/broken", timeout=5)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/ok", timeout=5).read() == b"ok\n"
    finally:
        server.shutdown()


def test_by_default_it_listens_on_this_host_only(monkeypatch):
    from common.settings import Settings

    monkeypatch.delenv("LORAFLEET_METRICS_HOST", raising=False)
    assert Settings().metrics_host == "127.0.0.1"  # the images and k8s set 0.0.0.0
