"""Running the app with uvicorn: in the foreground (`k2 serve`) or in a thread (tests, benchmarks).

The listening socket is bound here, before uvicorn starts, so that port 0 (any free port) works and
the real address can be printed or handed to a client.
"""

from __future__ import annotations

import socket
import threading
import time


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6; port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def make_server(app, log_level: str = "warning", access_log: bool = False):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5,
                            lifespan="off")
    return uvicorn.Server(config)


class BackgroundServer:
    """`with BackgroundServer(app) as s:` serves `app` on 127.0.0.1:<free port> in a thread; s.base_url."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port

    def __enter__(self) -> "BackgroundServer":
        self.sock = bind(self.host, self.port)
        self.base_url = url_of(self.sock)
        self.server = make_server(self.app)
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
