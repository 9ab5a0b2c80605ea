"""A recording, fault-injecting HTTP proxy in front of the GCS emulator: real client, real connections.

Requests pass through to the emulator unchanged, except those matching an armed fault, which
get the fault's status (503 by default) instead, as Cloud Storage answers when a backend is
briefly unavailable. The client under test sees a real HTTP error on a real connection, so its
own retry machinery (or the lack of it) is what is tested. Every request is recorded with the
status answered, its Range header and the body bytes served, so tests count reads where they
happen (``media``), not where the code under test says they did. Tests only.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclasses.dataclass
class Fault:
    method: str
    path: re.Pattern
    status: int = 503
    times: int = 1
    every: int = 1  # 2: answer the 1st, 3rd, 5th... matching request (each call's first attempt)
    seen: int = 0
    hits: list[str] = dataclasses.field(default_factory=list)

    def take(self, method: str, target: str) -> bool:
        if method != self.method or not self.path.search(target):
            return False
        self.seen += 1
        if len(self.hits) >= self.times or (self.seen - 1) % self.every:
            return False
        self.hits.append(target)
        return True


class FaultyGCS:
    """``url`` goes into STORAGE_EMULATOR_HOST; ``fail(...)`` arms a fault; ``requests`` is what passed."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.upstream_netloc = parts.netloc.encode()
        self.requests: list[tuple[str, str, int]] = []  # (method, path?query, status answered)
        self.served: list[tuple[str, str, str, int]] = []  # (method, unquoted path?query, Range header, body bytes)
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else each answer's body waits ~40 ms for the headers' delayed ACK

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._take_fault(self.command, self.path)
                if fault is not None:
                    payload = json.dumps({"error": {"code": fault.status, "message": "injected: backend unavailable",
                                                    "errors": [{"reason": "backendError", "message": "injected"}]}}).encode()
                    proxy._record(self.command, self.path, fault.status, self.headers.get("Range", ""), len(payload))
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    upstream = conn.getresponse()
                    data = upstream.read()
                finally:
                    conn.close()
                # links in a JSON answer (an object's mediaLink, recorded by the emulator when the object
                # was uploaded, maybe not through us) must lead back here, as a reverse proxy rewrites
                # them; an object's own bytes (alt=media) pass untouched
                if "alt=media" not in self.path:
                    data = data.replace(proxy.upstream_netloc, proxy.netloc)
                proxy._record(self.command, self.path, upstream.status, self.headers.get("Range", ""), len(data))
                self.send_response(upstream.status)
                for key, value in upstream.getheaders():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that drops a kept-alive connection is not news

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def netloc(self) -> bytes:
        return f"127.0.0.1:{self.server.server_address[1]}".encode()

    @property
    def url(self) -> str:
        return f"http://{self.netloc.decode()}"

    def fail(self, method: str, path_regex: str, status: int = 503, times: int = 1, every: int = 1) -> Fault:
        """Answer ``status`` to matching requests (``path_regex`` searched in path?query), ``times`` at most."""
        fault = Fault(method, re.compile(path_regex), status, times, every)
        with self._lock:
            self.faults.append(fault)
        return fault

    def answered(self, status: int) -> list[tuple[str, str]]:
        return [(m, p) for m, p, s in self.requests if s == status]

    def _take_fault(self, method: str, target: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.take(method, target):
                    return fault
        return None

    def _record(self, method: str, target: str, status: int, byte_range: str, served: int) -> None:
        with self._lock:
            self.requests.append((method, target, status))
            self.served.append((method, unquote(target), byte_range, served))

    def media(self, name: str) -> list[tuple[str, int]]:
        """(Range header, bytes served) of each download of object ``name``'s bytes."""
        with self._lock:
            return [(rng, n) for method, target, rng, n in self.served
                    if method == "GET" and "alt=media" in target and target.partition("?")[0].endswith(f"/o/{name}")]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.served.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
