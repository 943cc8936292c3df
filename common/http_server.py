"""The one small HTTP server lorafleet runs: a worker's /metrics and probes, the exporter's
/metrics and /scale. Anyone who reaches the port is a client, so it is bounded: a connection that
sends nothing for `READ_TIMEOUT_S` is closed, and past `MAX_CONNECTIONS` at once a new one is
closed unanswered instead of taking a thread. It binds to `LORAFLEET_METRICS_HOST`.
"""

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("lorafleet.http")
READ_TIMEOUT_S = 5.0  # a scrape or probe sends its request at once; a slow sender is not one
MAX_CONNECTIONS = 32  # Prometheus, kubelet and KEDA need a few; more at once is not a monitor

# A route answers a GET with (status, body, content type).
Route = Callable[[], tuple[int, bytes, str]]
TEXT = "text/plain; charset=utf-8"


class BoundedServer(ThreadingHTTPServer):
    """A threading HTTP server that serves at most MAX_CONNECTIONS connections at once."""

    daemon_threads = True

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: close it rather than queue a thread behind it
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def serve(host: str, port: int, routes: dict[str, Route], name: str) -> BoundedServer:
    """Serve `routes` (path → Route) on host:port (port 0: any free one) in a daemon thread."""
    known = ", ".join(routes).encode()

    class Handler(BaseHTTPRequestHandler):
        timeout = READ_TIMEOUT_S  # socket timeout for each read: an idle connection is closed

        def do_GET(self):
            route = routes.get(self.path.split("?", 1)[0])
            try:
                code, body, content_type = route() if route else (404, b"not found: " + known + b"\n", TEXT)
            except Exception:  # one bad answer is logged; the server serves on
                log.exception("%s: %s failed", name, self.path)
                code, body, content_type = 500, b"internal error (logged)\n", TEXT
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # a scrape every few seconds is not worth a log line
            pass

    server = BoundedServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name=name).start()
    log.info("%s on %s:%d (%s)", name, host, server.server_address[1], ", ".join(routes))
    return server
