"""An HTTP proxy in front of moto that can go down, come back on the same port, and fail chosen requests.

What a client of an S3 endpoint sees in an outage or a flaky network, without touching the server's data:

- :meth:`FaultProxy.down` stops listening (new connections are refused) and cuts every open
  connection; :meth:`FaultProxy.up` listens again on the same port, so a store configured with
  the proxy's URL reaches the same objects as before the outage.
- ``fault(n, method, path)`` is asked about every request (``n`` counts from 1, per method) and
  returns ``None`` (forward it), ``"refuse"`` (go down before forwarding it), ``"drop"`` (forward
  it, then cut the connection instead of answering: the object may be stored, the client does
  not know) or an HTTP status such as 503 (answer with an S3 error, forward nothing).
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Fault = Callable[[int, str, str], "int | str | None"]
_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}
_S3_ERRORS = {500: ("InternalError", "We encountered an internal error. Please try again."),
              503: ("SlowDown", "Please reduce your request rate.")}


class FaultProxy:
    """Forwards HTTP/1.1 requests to ``upstream`` (``http://host:port``), with faults (see the module)."""

    def __init__(self, upstream: str, fault: Fault | None = None) -> None:
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.fault: Fault = fault or (lambda n, method, path: None)
        self.seen: Counter[str] = Counter()  # requests per method, faulted ones included
        self.log: list[tuple[str, str, int | str]] = []  # (method, path, status or fault)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        self.up()
        self.url = f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ up and down

    def up(self) -> None:
        """Listen (again) on the proxy's port."""
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def down(self) -> None:
        """Stop listening and cut every open connection (an endpoint that went away)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            _cut(conn)

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def close(self) -> None:
        self.down()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3 uses it
    owner: FaultProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._conns.add(self.connection)

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _relay(self) -> None:
        proxy = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with proxy._lock:
            proxy.seen[self.command] += 1
            n = proxy.seen[self.command]
        action = proxy.fault(n, self.command, self.path)
        if action == "refuse":
            proxy.log.append((self.command, self.path, "refused"))
            proxy.down()
            self.close_connection = True
            return
        if isinstance(action, int):
            code, message = _S3_ERRORS.get(action, ("InternalError", "injected"))
            payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                       f"<Message>{message}</Message></Error>").encode()
            proxy.log.append((self.command, self.path, action))
            self.send_response_only(action)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload) if self.command != "HEAD" else 0))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            upstream.request(self.command, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
        finally:
            upstream.close()
        if action == "drop":  # the server did the work; the client never hears about it
            proxy.log.append((self.command, self.path, "dropped"))
            self.close_connection = True
            _cut(self.connection)
            return
        proxy.log.append((self.command, self.path, resp.status))
        self.send_response_only(resp.status, resp.reason)
        for key, value in resp.getheaders():
            if key.lower() not in _HOP and key.lower() != "content-length":
                self.send_header(key, value)
        length_header = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length_header or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay
