"""A loopback webhook receiver for the webhook tests: records every request it is sent.

Each request is kept with its path, headers, raw body, the decoded JSON body (raw webhooks and
Discord messages without files) and the multipart parts (Discord messages with attachments:
form fields and files with their names, content types and bytes). ``status`` sets what it
answers (500 to simulate a failing webhook); ``hang()`` makes it hold every request open until
``release()`` (or the test's end), to simulate a webhook that times out.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    json: Any = None
    parts: tuple[Part, ...] = ()

    def field(self, name: str) -> str | None:
        for part in self.parts:
            if part.name == name and part.filename is None:
                return part.data.decode()
        return None

    @property
    def files(self) -> list[Part]:
        return [part for part in self.parts if part.filename is not None]


@dataclass
class WebhookServer:
    """``url(path)`` is an address on this server; ``requests`` what it has received so far."""

    status: int = 204
    requests: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _hanging: threading.Event = field(default_factory=threading.Event)
    _released: threading.Event = field(default_factory=threading.Event)
    _received: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> WebhookServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                headers = {key.lower(): value for key, value in self.headers.items()}
                server._record(self.path, headers, body)
                if server._hanging.is_set():
                    server._released.wait(timeout=30)
                self.send_response(server.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def url(self, path: str = "/hook") -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def hang(self) -> None:
        self._released.clear()
        self._hanging.set()

    def release(self) -> None:
        self._hanging.clear()
        self._released.set()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """The requests once ``count`` have arrived (fewer if ``timeout`` passes first)."""
        with self._received:
            self._received.wait_for(lambda: len(self.requests) >= count, timeout=timeout)
            return list(self.requests)

    def _record(self, path: str, headers: dict[str, str], body: bytes) -> None:
        content_type = headers.get("content-type", "")
        decoded: Any = None
        parts: tuple[Part, ...] = ()
        if content_type.startswith("application/json"):
            decoded = json.loads(body)
        elif content_type.startswith("multipart/form-data"):
            parts = _parse_multipart(content_type, body)
        with self._received:
            self.requests.append(Received(path=path, headers=headers, body=body, json=decoded, parts=parts))
            self._received.notify_all()


def _parse_multipart(content_type: str, body: bytes) -> tuple[Part, ...]:
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = []
    for part in message.iter_parts():
        parts.append(
            Part(
                name=part.get_param("name", header="content-disposition") or "",
                filename=part.get_filename(),
                content_type=part.get_content_type(),
                data=part.get_payload(decode=True) or b"",
            )
        )
    return tuple(parts)
