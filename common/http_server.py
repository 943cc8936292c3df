"""The one small HTTP server lorafleet runs: a worker's /metrics and probes, the exporter's
/metrics and /scale. Anyone who reaches the port is a client, and kubelet, Prometheus and KEDA must
get answers whatever the others do, so no client can hold the server:

- one event loop holds every connection (a slow client costs a few hundred bytes, not a thread);
- a request must arrive whole within HEADER_DEADLINE_S of the connection (a scrape or probe sends
  it at once), and its answer be taken within WRITE_DEADLINE_S: a client that trickles a byte every
  few seconds is closed at the deadline, not kept alive by each byte;
- past MAX_CONNECTIONS at once, the oldest connection still sending its request is closed to make
  room, so a flood of half-sent requests cannot shut the probes out either;
- routes run in a small thread pool (they may read Redis), one request per connection.

It binds to `LORAFLEET_METRICS_HOST`.
"""

import asyncio
import http
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("lorafleet.http")
HEADER_DEADLINE_S = 2.0  # from connecting to the request's last header line
WRITE_DEADLINE_S = 5.0  # for the client to take the answer
MAX_CONNECTIONS = 256  # open at once; a new one past this closes the oldest still sending its request
MAX_HEADER_BYTES = 8192  # a probe's request is a few hundred bytes
ROUTE_THREADS = 4

# A route answers a GET with (status, body, content type).
Route = Callable[[], tuple[int, bytes, str]]
TEXT = "text/plain; charset=utf-8"


class Server:
    """The server of `serve`, running its event loop in a daemon thread."""

    def __init__(self, host: str, port: int, routes: dict[str, Route], name: str):
        self.routes, self.name = routes, name
        self.known = ", ".join(routes).encode()
        self.reading: dict[asyncio.StreamWriter, None] = {}  # connections still sending their request, oldest first
        self.open = 0
        self.pool = ThreadPoolExecutor(ROUTE_THREADS, thread_name_prefix=name)
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self.handle, host, port, limit=MAX_HEADER_BYTES, backlog=MAX_CONNECTIONS)
        )
        self.server_address = self.server.sockets[0].getsockname()[:2]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self.thread.start()

    def shutdown(self) -> None:
        """Stop serving and close every connection."""

        async def close() -> None:
            self.server.close()
            for writer in list(self.reading):
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= MAX_CONNECTIONS and self.reading:
            next(iter(self.reading)).transport.abort()  # the oldest half-sent request makes way
        self.open += 1
        self.reading[writer] = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEADER_DEADLINE_S)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return  # too slow, too long or gone: closed unanswered
            finally:
                self.reading.pop(writer, None)
            code, body, content_type = await self.answer(head.split(b"\r\n", 1)[0])
            writer.transport.set_write_buffer_limits(0)  # drain() returns once the kernel holds it all
            writer.write(
                f"HTTP/1.1 {code} {http.HTTPStatus(code).phrase}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await asyncio.wait_for(writer.drain(), WRITE_DEADLINE_S)
            writer.close()  # one request a connection
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self.open -= 1
            if not writer.is_closing():
                writer.transport.abort()

    async def answer(self, request_line: bytes) -> tuple[int, bytes, str]:
        """What a request line (`GET /path HTTP/1.1`) is answered: its route's answer, run in the pool."""
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, b"bad request\n", TEXT
        if parts[0] != "GET":
            return 405, b"only GET\n", TEXT
        route = self.routes.get(parts[1].split("?", 1)[0])
        if route is None:
            return 404, b"not found: " + self.known + b"\n", TEXT
        try:
            return await self.loop.run_in_executor(self.pool, route)
        except Exception:  # one bad answer is logged; the server serves on
            log.exception("%s: %s failed", self.name, parts[1][:200])
            return 500, b"internal error (logged)\n", TEXT


def serve(host: str, port: int, routes: dict[str, Route], name: str) -> Server:
    """Serve `routes` (path → Route) on host:port (port 0: any free one) in a daemon thread."""
    server = Server(host, port, routes, name)
    log.info("%s on %s:%d (%s)", name, host, server.server_address[1], ", ".join(routes))
    return server
