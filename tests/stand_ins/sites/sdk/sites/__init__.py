"""Stand-in for ``sites.sdk.sites`` (ECMWF's ECBOX SDK): what ai-wq-package calls, over HTTP to a local server.

ai-wq-package 3.x calls, and this module implements, exactly:

- ``Site.from_space_and_name(space=..., name=...)``
- ``Authenticator.from_token(token=...)``
- ``site.get_content_manager(authenticator=...)`` -> a content manager with
  ``upload(local_path=..., remote_path="", upload_zero_byte_files=False)`` (a file goes INTO the remote
  folder, the site's root without one, as the real SDK's ``upload`` documents),
  ``download(remote_path=...) -> bytes`` and
  ``list(remote_path=..., file_type=None, continuation_token=None) -> {"files": [{"path": ...}], "continuation_token": ...}``
  (at most ``page_size`` entries a page; ``path`` is the full path from the site's root).

Failures raise ``site_content.ApiCallException`` whose message starts with the HTTP status, which is
what the package looks for ("404"/"not found" when its ID table does not exist yet).

The server is ``AIWQ_STANDIN_URL`` (tests/stand_ins/aiwq_server.py), read at every call: without it
every call fails, so nothing can reach a real service by accident.

The package also reads its list of registered teams and models from a URL hard-coded in two
functions (``check_fc_submission.check_registered_teamname`` and ``check_registered_modelname``:
``pd.read_csv(<competition's URL>)``). Importing this stand-in points that one URL at the same local
server by giving ``check_fc_submission`` a ``pd`` whose ``read_csv`` rewrites it (every other
http(s) address is refused); the package's own check code still runs on the CSV it gets back.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request

from sites.sdk.sites.site_content import ApiCallException
from sites.sdk.sites.utils import FileType

URL_ENV = "AIWQ_STANDIN_URL"
#: hard-coded in ai-wq-package's check_fc_submission (team and model registration)
REGISTRY_URL = "https://aiweatherquest.ecmwf.int/wp-json/csv/v1/export-teams-with-models"
REGISTRY_PATH = "/registry/export-teams-with-models"
TIMEOUT_S = 30


def server_url() -> str:
    url = os.environ.get(URL_ENV, "").rstrip("/")
    if not url.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise ApiCallException(503, "Service Unavailable",
                               f"the ECBOX stand-in needs {URL_ENV}=http://127.0.0.1:PORT (tests/stand_ins/aiwq_server.py); "
                               f"got {url!r}")
    return url


def _call(method: str, route: str, query: dict, token: str | None = None, body: bytes | None = None) -> bytes:
    url = f"{server_url()}{route}?{urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})}"
    request = urllib.request.Request(url, data=body, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", "application/octet-stream")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise ApiCallException(exc.code, exc.reason, exc.read().decode(errors="replace").strip()) from None
    except OSError as exc:
        raise ApiCallException(503, "Service Unavailable", str(exc)) from None


def _join(folder: str, name: str = "") -> str:
    parts = [p for p in f"{folder}/{name}".split("/") if p and p != "."]
    return "/" + "/".join(parts)


class Authenticator:
    def __init__(self, token: str):
        self.token = token

    @classmethod
    def from_token(cls, token: str) -> "Authenticator":
        return cls(token)


class Site:
    def __init__(self, space: str, name: str):
        self.space, self.name = space, name

    @classmethod
    def from_space_and_name(cls, space: str, name: str) -> "Site":
        return cls(space, name)

    def get_content_manager(self, authenticator: Authenticator) -> "ContentManager":
        return ContentManager(self, authenticator)


class ContentManager:
    def __init__(self, site: Site, authenticator: Authenticator):
        self._route = f"/sites/{urllib.parse.quote(site.space)}/{urllib.parse.quote(site.name)}"
        self._token = authenticator.token

    def upload(self, local_path, remote_path: str = "", upload_zero_byte_files: bool = False):
        local_path = os.fspath(local_path)
        if not os.path.isfile(local_path):
            raise ApiCallException(400, "Bad Request", f"the stand-in uploads files only, not {local_path!r}")
        with open(local_path, "rb") as f:
            data = f.read()
        if not data and not upload_zero_byte_files:
            return None  # as the real SDK: an empty file is skipped unless asked for
        target = _join(remote_path or "", os.path.basename(local_path))
        return json.loads(_call("PUT", f"{self._route}/content", {"path": target}, self._token, data))

    def download(self, remote_path: str) -> bytes:
        return _call("GET", f"{self._route}/content", {"path": _join(remote_path)}, self._token)

    def list(self, remote_path: str = "", file_type: FileType | None = None, continuation_token: str | None = None) -> dict:
        query = {"path": _join(remote_path), "type": file_type.value if file_type else None, "token": continuation_token}
        return json.loads(_call("GET", f"{self._route}/list", query, self._token))


class _PandasWithLocalRegistry:
    """pandas for ai-wq-package's check_fc_submission: its registry URL answered by the stand-in server."""

    def __init__(self, pandas_module):
        self._pd = pandas_module

    def __getattr__(self, name):
        return getattr(self._pd, name)

    def read_csv(self, source, *args, **kwargs):
        if isinstance(source, str) and source.startswith(("http://", "https://")):
            if source != REGISTRY_URL:
                raise ApiCallException(403, "Forbidden", f"the stand-in answers only the registry URL, not {source}")
            source = server_url() + REGISTRY_PATH
        return self._pd.read_csv(source, *args, **kwargs)


def _redirect_registry() -> None:
    try:
        from AI_WQ_package import check_fc_submission
    except ImportError:  # the package absent: nothing to redirect
        return
    if not isinstance(check_fc_submission.pd, _PandasWithLocalRegistry):
        check_fc_submission.pd = _PandasWithLocalRegistry(check_fc_submission.pd)


_redirect_registry()
