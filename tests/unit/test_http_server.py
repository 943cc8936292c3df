"""The metrics, probe and /scale server is bounded: half-sent requests cannot pile up threads, an
idle connection is closed, and it answers again once they are gone."""

import socket
import threading
import time
import urllib.request

import pytest

from common.http_server import MAX_CONNECTIONS, READ_TIMEOUT_S, TEXT, serve

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
        time.sleep(READ_TIMEOUT_S + 1)  # each idle connection is closed after the read timeout
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/ok", timeout=5).read() == b"ok\n"
        assert threading.active_count() <= before + 1
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
