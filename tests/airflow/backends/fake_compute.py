"""A fake Compute Engine API at the HTTP layer, for the gce backend tests.

The Google provider's ComputeEngineHook talks to Compute Engine two ways: google-cloud-compute's
REST transport (insert/get/delete, through ``google.auth.transport.requests.AuthorizedSession``)
and the discovery client (operation polling, through ``httplib2.Http``). Both are patched here, so
everything above them (hook, client library, proto (de)serialisation, error mapping such as 404 ->
NotFound) is the real code, and ``sent`` holds the exact requests the real API would receive.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from typing import Any, Callable
from unittest import mock
from urllib.parse import urlsplit

import httplib2
import requests
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession

BASE = "/compute/v1/projects/{project}/zones/{zone}"


class FakeCompute:
    def __init__(self, project: str, zone: str, on_insert: Callable[[dict], None] | None = None):
        self.project, self.zone = project, zone
        self.instances: dict[str, dict[str, Any]] = {}
        self.sent: list[tuple[str, str, Any]] = []  # (method, path, JSON body or None)
        self.on_insert = on_insert
        self._ops = itertools.count(1)
        self._lock = threading.Lock()
        self.prefix = BASE.format(project=project, zone=zone)

    # -- what the tests look at ------------------------------------------------------------

    def calls(self) -> list[tuple[str, str]]:
        return [(m, p.replace(self.prefix, "")) for m, p, _ in self.sent]

    def bodies(self, method: str = "POST") -> list[dict]:
        return [b for m, _, b in self.sent if m == method]

    def add(self, name: str, status: str = "RUNNING") -> None:
        self.instances[name] = {"name": name, "status": status, "zone": self.zone}

    # -- the API -------------------------------------------------------------------------------

    def handle(self, method: str, url: str, body: bytes | str | None) -> tuple[int, dict]:
        path = urlsplit(url).path
        payload = json.loads(body) if body else None
        with self._lock:
            self.sent.append((method, path, payload))
        if not path.startswith(self.prefix):
            return 404, _error(404, f"unexpected path {path}")
        rest = path[len(self.prefix):]
        if rest.startswith("/operations/") and method == "GET":
            return 200, {"name": rest.split("/")[-1], "status": "DONE", "zone": self.zone}
        if rest == "/instances" and method == "POST":
            name = payload["name"]
            if name in self.instances:
                return 409, _error(409, f"The resource '{name}' already exists")
            self.instances[name] = {**payload, "status": "RUNNING", "zone": self.zone}
            if self.on_insert:
                self.on_insert(payload)
            return 200, self._operation("insert", name)
        if rest.startswith("/instances/"):
            name = rest.split("/")[2]
            if name not in self.instances:
                return 404, _error(404, f"The resource 'projects/{self.project}/zones/{self.zone}/instances/{name}' was not found")
            if method == "GET":
                return 200, self.instances[name]
            if method == "DELETE":
                del self.instances[name]
                return 200, self._operation("delete", name)
        return 400, _error(400, f"unsupported {method} {path}")

    def _operation(self, kind: str, name: str) -> dict:
        return {"name": f"operation-{kind}-{next(self._ops)}", "status": "RUNNING", "zone": self.zone,
                "operationType": kind, "targetLink": f"{self.prefix}/instances/{name}"}

    # -- the two transports ----------------------------------------------------------------------

    def _requests(self, session, method, url, data=None, headers=None, **kwargs):
        status, payload = self.handle(method, url, data)
        response = requests.Response()
        response.status_code = status
        response.headers["content-type"] = "application/json"
        response._content = json.dumps(payload).encode()
        response.request = requests.Request(method, url).prepare()
        response.url = url
        return response

    def _httplib2(self, http, uri, method="GET", body=None, headers=None, *args, **kwargs):
        status, payload = self.handle(method, uri, body)
        return httplib2.Response({"status": status, "content-type": "application/json"}), json.dumps(payload).encode()

    @contextlib.contextmanager
    def patched(self):
        from airflow.providers.google.cloud.hooks.compute import ComputeEngineHook

        fake = self
        with mock.patch.object(ComputeEngineHook, "get_credentials", return_value=AnonymousCredentials()), \
                mock.patch.object(AuthorizedSession, "request", lambda s, m, u, *a, **k: fake._requests(s, m, u, *a, **k)), \
                mock.patch.object(httplib2.Http, "request", lambda h, u, *a, **k: fake._httplib2(h, u, *a, **k)), \
                mock.patch("airflow.providers.google.cloud.hooks.compute.TIME_TO_SLEEP_IN_SECONDS", 0):
            yield self


def _error(code: int, message: str) -> dict:
    return {"error": {"code": code, "message": message, "errors": [{"message": message, "reason": "notFound" if code == 404 else "x"}]}}
