"""The JSON-over-HTTP request handler the judge server and the test and benchmark judges share (stdlib only,
so a fake judge starts without importing jax)."""
from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler


class JSONHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, Nagle off (headers and body leave at once: no 40 ms delayed-ACK stall per
    request), no access log on stderr, and `send_json(status, payload)`."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, fmt: str, *args) -> None:
        pass

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
