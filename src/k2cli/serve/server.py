"""Running the app with uvicorn: in the foreground (`k2 serve`) or in a thread (tests, benchmarks).

The listening socket is bound here, before uvicorn starts, so that port 0 (any free port) works and
the real address can be printed or handed to a client.

Connection-level defences live in `K2Protocol` (uvicorn's h11 protocol, plus two things):
  * TCP_NODELAY on every accepted socket. Without it Nagle's algorithm holds the second write of a
    response (headers and body go out separately) until the client ACKs the first, and the client
    delays that ACK by ~40 ms: every request after the first on a kept-alive connection cost 40 ms.
    (asyncio sets the option itself only on sockets created with proto=IPPROTO_TCP; a plain
    `socket.socket()` has proto 0, so it silently did not.)
  * a header deadline: a connection must deliver a complete request head within `header_timeout`
    seconds of opening, or of its first byte after a response. A half-open connection (connects,
    sends nothing) or a slow-loris one (dribbles a header byte now and then) is closed, where
    uvicorn alone would hold it forever. Idle kept-alive connections are closed by uvicorn's own
    keep-alive timeout; a slow *body* is the app's business (`app.read_body` has a deadline).
"""

from __future__ import annotations

import functools
import socket
import threading
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0  # a request head (request line + headers) must arrive within this
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this (uvicorn's default)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6; port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets on Linux
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


class K2Protocol(H11Protocol):
    """uvicorn's h11 protocol with TCP_NODELAY and a deadline on each request head (see above)."""

    def __init__(self, *args, header_timeout: float = HEADER_TIMEOUT_S, **kw):
        super().__init__(*args, **kw)
        self.header_timeout = header_timeout
        self.header_deadline = None  # asyncio.TimerHandle while a request head is awaited

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover (the peer already left)
                pass
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._arm()  # between requests: the next head starts now (a no-op if already waiting)
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:  # a request head was parsed: the app has the connection now
            self._disarm()

    def _arm(self) -> None:
        if self.header_deadline is None and not self.transport.is_closing():
            self.header_deadline = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _head_too_slow(self) -> None:
        self.header_deadline = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()  # nothing is owed to a client that never finished asking


def make_server(app, log_level: str = "warning", access_log: bool = False, header_timeout: float = HEADER_TIMEOUT_S,
                keep_alive: float = KEEP_ALIVE_S):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5,
                            lifespan="off", http=functools.partial(K2Protocol, header_timeout=header_timeout),
                            timeout_keep_alive=keep_alive)
    return uvicorn.Server(config)


class BackgroundServer:
    """`with BackgroundServer(app) as s:` serves `app` on 127.0.0.1:<free port> in a thread; s.base_url."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **server_options):
        self.app, self.host, self.port, self.options = app, host, port, server_options

    def __enter__(self) -> "BackgroundServer":
        self.sock = bind(self.host, self.port)
        self.base_url = url_of(self.sock)
        self.server = make_server(self.app, **self.options)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="k2-uvicorn")
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
