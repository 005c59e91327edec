"""A tiny local HTTP server that answers as Google's and Microsoft's token
endpoints document, for the paths no real peer can play here.

Only used where the real peer is a third party (Google, Microsoft); everything
else runs against the demo authorization server.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


@dataclass
class StubReply:
    status: int = 200
    body: dict | str = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class StubServer:
    url: str
    replies: list[StubReply]
    requests: list[dict[str, list[str]]] = field(default_factory=list)


@contextmanager
def token_endpoint_stub(
    *replies: StubReply, tls: tuple[str, str] | None = None
) -> Iterator[StubServer]:
    """Serve ``replies`` in order (the last one repeats) on a local port.

    ``tls`` is a ``(certificate, key)`` pair to serve HTTPS with.
    """
    state = StubServer(url="", replies=list(replies))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            state.requests.append(parse_qs(self.rfile.read(length).decode()))
            reply = state.replies[min(len(state.requests), len(state.replies)) - 1]
            if reply.delay:
                time.sleep(reply.delay)
            body = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    scheme = "http"
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"{scheme}://127.0.0.1:{server.server_address[1]}/token"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
