"""A scriptable HTTP server for generator tests: real sockets, stdlib only, one thread.

    with FakeServer() as server:
        server.on("POST", "/runsync", Reply(429, headers={"Retry-After": "1"}), Reply(json={...}))
        ... point a generator at server.url ...
        assert server.calls("POST", "/runsync")[1].json()["input"]["prompt"] == "cat"

Replies for a route are used in order; the last one repeats. A reply may be a function of the
recorded request (to check auth, for instance). Unscripted routes answer 404.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image


def png_bytes(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 90)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def png_b64(width: int = 64, height: int = 48) -> str:
    return base64.b64encode(png_bytes(width, height)).decode()


def picture_b64(width: int, height: int) -> str:
    """A PNG that passes the quality gate (not a flat frame): two crossed colour ramps."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, axis=0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, axis=1)
    pixels = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@dataclass
class Reply:
    status: int = 200
    json: Any = None
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (released early when the server stops)


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic() when received

    def json(self) -> Any:
        return json.loads(self.body)


Responder = Reply | Callable[[Recorded], Reply]


class FakeServer:
    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], list[Responder]] = {}
        self._used: dict[tuple[str, str], int] = {}
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def on(self, method: str, path: str, *replies: Responder) -> None:
        with self._lock:
            self._routes[(method, path)] = list(replies)
            self._used[(method, path)] = 0

    def calls(self, method: str, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _next(self, recorded: Recorded) -> Reply:
        key = (recorded.method, recorded.path)
        with self._lock:
            self.requests.append(recorded)
            replies = self._routes.get(key)
            if not replies:
                return Reply(404, json={"error": f"no route {recorded.method} {recorded.path}"})
            index = min(self._used[key], len(replies) - 1)
            self._used[key] += 1
        responder = replies[index]
        return responder(recorded) if callable(responder) else responder

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                recorded = Recorded(self.command, parts.path, parts.query,
                                    {k.lower(): v for k, v in self.headers.items()}, body,
                                    time.monotonic())
                reply = server._next(recorded)
                if reply.delay and server._stopping.wait(reply.delay):
                    self.close_connection = True
                    return
                payload = reply.body if reply.body is not None else (
                    json.dumps(reply.json).encode() if reply.json is not None else b"")
                try:
                    self.send_response(reply.status)
                    content_type = "application/json" if reply.json is not None else "image/png"
                    self.send_header("Content-Type", reply.headers.get("Content-Type", content_type))
                    for name, value in reply.headers.items():
                        if name.lower() != "content-type":
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up: fine
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        return Handler
