"""A local server standing in for the AI Weather Quest's endpoints: ECBOX content and the team registry.

What the ECBOX stand-in SDK (tests/stand_ins/sites) sends arrives here and is recorded:

    PUT  /sites/{space}/{name}/content?path=/a/b.nc   body = the file    (auth: Bearer token)
    GET  /sites/{space}/{name}/content?path=/a/b.nc   -> bytes, or 404    (auth)
    GET  /sites/{space}/{name}/list?path=/a[&type=dir|file][&token=N] -> {"files": [{"path", "type"}], "continuation_token"}
    GET  /registry/export-teams-with-models           -> the registered teams' CSV (public, as the real one)

A wrong token answers 401. ``fail_uploads(after=N, suffix=".nc")`` makes the upload after the next N
matching ones answer 500 (once; later ones succeed again): a server failing mid-submission.

In tests: ``AIWQServer(token, registered=[(team, model)]).start()``, then ``.url``, ``.requests``,
``.uploads()``, ``.files``, ``.stop()``. By hand (the demo):

    python tests/stand_ins/aiwq_server.py --port 0 --port-file F --store DIR --token T --register TEAM:MODEL
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import io
import json
import os
import signal
import sys
import threading
import urllib.parse

REGISTRY_COLUMNS = ("Team name", "Models_model_name", "Status")


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    route: str  # "content", "list", "registry"
    site: str  # "space/name" ('' for the registry)
    path: str  # the remote path asked for ('' for the registry)
    body: bytes | None  # what was uploaded
    status: int  # what the server answered


class AIWQServer:
    def __init__(self, token: str, registered: list[tuple[str, str]] | list[tuple[str, str, str]] = (),
                 store_dir: str | None = None, page_size: int = 100, port: int = 0):
        self.token = token
        self.port = port
        self.registered = [tuple(r) + ("Active",) * (3 - len(r)) for r in registered]
        self.store_dir = store_dir
        self.page_size = page_size
        self.files: dict[str, bytes] = {}  # "space/name:/path" -> current content
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._fail: tuple[int, str] | None = None  # (matching uploads still allowed, suffix)
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- test-facing -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def fail_uploads(self, after: int, suffix: str = ".nc") -> None:
        """The upload after the next ``after`` uploads ending in ``suffix`` answers 500 (once)."""
        with self._lock:
            self._fail = (after, suffix)

    def uploads(self, prefix: str = "", suffix: str = "") -> list[tuple[str, bytes]]:
        """(path, bytes) of every accepted upload, in order; ``prefix``/``suffix`` filter the path."""
        with self._lock:
            return [(r.path, r.body) for r in self.requests if r.method == "PUT" and r.status < 300
                    and r.path.startswith(prefix) and r.path.endswith(suffix)]

    def start(self) -> "AIWQServer":
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="aiwq-stand-in", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    # --- server side ---------------------------------------------------------------------------
    def _registry_csv(self) -> bytes:
        out = io.StringIO()
        out.write(",".join(REGISTRY_COLUMNS) + "\n")
        for row in self.registered:
            out.write(",".join(row) + "\n")
        return out.getvalue().encode()

    def _store(self, key: str, data: bytes) -> None:
        self.files[key] = data
        if self.store_dir:
            target = os.path.join(self.store_dir, *key.replace(":", "/").split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)

    def _list(self, site: str, folder: str, kind: str | None, token: str | None) -> dict:
        folder = folder.rstrip("/")
        entries: dict[str, str] = {}
        for key in self.files:
            key_site, path = key.split(":", 1)
            if key_site != site or not path.startswith(folder + "/"):
                continue
            rest = path[len(folder) + 1:]
            child, sep, _ = rest.partition("/")
            entries[f"{folder}/{child}"] = "dir" if sep else "file"
        names = sorted(p for p, t in entries.items() if kind in (None, t))
        start = int(token or 0)
        page = names[start:start + self.page_size]
        more = start + self.page_size < len(names)
        return {"files": [{"path": p, "type": entries[p]} for p in page],
                "continuation_token": str(start + self.page_size) if more else None}

    def handle(self, method: str, url: str, auth: str | None, body: bytes | None) -> tuple[int, bytes, str]:
        parsed = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        parts = parsed.path.strip("/").split("/")
        with self._lock:
            if parsed.path == "/registry/export-teams-with-models" and method == "GET":
                status, answer, ctype, route, site, path = 200, self._registry_csv(), "text/csv", "registry", "", ""
            elif len(parts) == 4 and parts[0] == "sites" and parts[3] in ("content", "list"):
                route, site, path = parts[3], f"{urllib.parse.unquote(parts[1])}/{urllib.parse.unquote(parts[2])}", query.get("path", "")
                status, answer, ctype = self._site_call(method, route, site, path, query, auth, body)
            else:
                status, answer, ctype, route, site, path = 404, b"no such endpoint", "text/plain", "?", "", parsed.path
            self.requests.append(Request(method, route, site, path, body, status))
        return status, answer, ctype

    def _site_call(self, method, route, site, path, query, auth, body):
        if auth != f"Bearer {self.token}":
            return 401, b"bad or missing token", "text/plain"
        key = f"{site}:{path}"
        if route == "list" and method == "GET":
            return 200, json.dumps(self._list(site, path, query.get("type"), query.get("token"))).encode(), "application/json"
        if method == "GET":
            if key not in self.files:
                return 404, f"{path} not found".encode(), "text/plain"
            return 200, self.files[key], "application/octet-stream"
        if method == "PUT":
            if self._fail is not None and path.endswith(self._fail[1]):
                left, suffix = self._fail
                if left == 0:
                    self._fail = None
                    return 500, b"stand-in: upload failed on purpose", "text/plain"
                self._fail = (left - 1, suffix)
            self._store(key, body or b"")
            return 201, json.dumps({"path": path, "size": len(body or b"")}).encode(), "application/json"
        return 405, b"method not allowed", "text/plain"


def _handler(server: AIWQServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, method: str):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if method == "PUT" else None
            status, answer, ctype = server.handle(method, self.path, self.headers.get("Authorization"), body)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def do_GET(self):  # noqa: N802
            self._answer("GET")

        def do_PUT(self):  # noqa: N802
            self._answer("PUT")

        def log_message(self, fmt, *args):  # one line a request on stderr only when run by hand
            if server.store_dir:
                sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", help="write the port chosen here once listening")
    p.add_argument("--store", required=True, help="directory the uploaded files are written to")
    p.add_argument("--token", required=True, help="the token AIFS_AIWQ_PASSWORD carries")
    p.add_argument("--register", action="append", default=[], metavar="TEAM:MODEL",
                   help="a registered, active team and model (repeatable)")
    args = p.parse_args(argv)
    registered = [tuple(r.split(":", 1)) for r in args.register]
    if any(len(r) != 2 for r in registered):
        p.error("--register takes TEAM:MODEL")
    server = AIWQServer(args.token, registered, store_dir=args.store, port=args.port).start()
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(server._httpd.server_address[1]))
        os.replace(args.port_file + ".tmp", args.port_file)
    print(f"AI Weather Quest stand-in on {server.url} (files in {args.store})", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
