"""Fetch open-data fields with the real ecmwf-opendata client: each index once, only the needed byte ranges.

The client reads a file's ``.index`` on every ``retrieve``; its requests go through a session that
keeps index files (:class:`IndexCache`), so each is read once per date however many members and
groups ask for it, and the planner checks every field against the same index before anything is
fetched. Transient failures the client does not retry itself (a connection dropped half-way
through a body, a short transfer) are retried here with exponential backoff.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time

import requests

from aifs.inputs.errors import SourceFailed, SourceNotPublished
from aifs.inputs.opendata_layout import DataFile, source_url
from aifs.inputs.plan import RequestGroup, index_identity

LOG = logging.getLogger("aifs.inputs")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries of one request group, the first included
    first_wait: float = 2.0  # seconds before the first retry; doubles each time
    max_wait: float = 60.0

    def waits(self):
        wait = self.first_wait
        for _ in range(self.attempts - 1):
            yield wait
            wait = min(wait * 2, self.max_wait)

    def client_retry_after(self):
        """The client's (multiurl's) own backoff for failed requests: (min, max, growth)."""
        return (self.first_wait, max(self.max_wait, self.first_wait * 2), 2)


class IndexCache:
    """Index files by URL, fetched once (thread-safe), as responses the client can read again."""

    def __init__(self, retry: RetryPolicy):
        self.retry = retry
        self._responses: dict[str, requests.Response] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.fetches = 0
        self.bytes = 0

    def response(self, url: str, get) -> requests.Response:
        with self._guard:
            lock = self._locks.setdefault(url, threading.Lock())
        with lock:
            if url not in self._responses:
                from multiurl import robust

                response = robust(get, self.retry.attempts, self.retry.client_retry_after())(url)
                if response.status_code != 200:
                    return response  # not kept: a missing index may be published later
                _ = response.content  # read it whole: the kept response can be iterated again
                self.fetches += 1
                self.bytes += len(response.content)
                self._responses[url] = response
            return self._responses[url]

    def lines(self, session: requests.Session, file: DataFile, root: str) -> list[dict]:
        url = file.index_url(root)
        try:
            response = session.get(url)
        except requests.RequestException as exc:
            raise SourceFailed(f"could not read the index: {exc}", where=url) from exc
        if response.status_code in (403, 404):
            raise SourceNotPublished("index file not found: the cycle is not (fully) published yet", where=url)
        if response.status_code != 200:
            raise SourceFailed(f"index answered HTTP {response.status_code} {response.reason}", where=url)
        try:
            return [json.loads(line) for line in response.iter_lines() if line.strip()]
        except ValueError as exc:
            raise SourceFailed(f"index is not JSON lines: {exc}", where=url) from exc


class IndexCachingSession(requests.Session):
    """A requests session whose GETs of ``*.index`` go through an IndexCache (data GETs pass through)."""

    def __init__(self, cache: IndexCache):
        super().__init__()
        self.index_cache = cache

    def get(self, url, **kwargs):
        if isinstance(url, str) and url.endswith(".index"):
            return self.index_cache.response(url, lambda u: super(IndexCachingSession, self).get(u, **kwargs))
        return super().get(url, **kwargs)


def _quiet_client_class():
    """ecmwf-opendata's Client, without multiurl's per-file progress bars (they flood task logs)."""
    from ecmwf.opendata import Client
    from multiurl import download
    from multiurl.base import NoBar

    class QuietClient(Client):
        def _download(self, result):  # Client._download with progress_bar=NoBar: the same download otherwise
            if self.use_sas_token:  # azure
                result.urls = self._apply_sas_to_urls(result.urls)
            result.size = download(result.urls, target=result.target, verify=self.verify, session=self.session,
                                   accept_ranges=self.source.accept_ranges,
                                   accept_multiple_ranges=self.source.accept_multiple_ranges,
                                   maximum_retries=self.maximum_retries, retry_after=self.retry_after,
                                   progress_bar=NoBar)
            return result

    return QuietClient


@dataclasses.dataclass
class Fetched:
    group: RequestGroup
    path: str
    url: str
    ranges: list[tuple[int, int]]  # (offset, length), ascending: the order of the messages in ``path``
    lines: list[dict]  # the index lines, same order
    seconds: float

    @property
    def bytes(self) -> int:
        return sum(length for _, length in self.ranges)


class OpenData:
    """One source's files for one date: index lookups and byte-range fetches (one client per thread)."""

    def __init__(self, source: str, retry: RetryPolicy = RetryPolicy()):
        self.source, self.root, self.retry = source, source_url(source), retry
        self.index = IndexCache(retry)
        self._local = threading.local()
        self._keyed_index: dict[DataFile, dict] = {}
        self._keyed_lock = threading.Lock()

    @property
    def client(self):
        if not hasattr(self._local, "client"):
            client = _quiet_client_class()(source=self.source, maximum_retries=self.retry.attempts,
                            retry_after=self.retry.client_retry_after())
            client.session = IndexCachingSession(self.index)  # the client's own downloads use it too
            self._local.client = client
        return self._local.client

    def index_lines(self, file: DataFile) -> list[dict]:
        return self.index.lines(self.client.session, file, self.root)

    def missing(self, group: RequestGroup) -> list:
        """The group's fields (FieldSource) the file's index does not list."""
        return [field for field, line in self.lines_for(group).items() if line is None]

    def lines_for(self, group: RequestGroup) -> dict:
        """{field: its index line or None} for one group, from the cached index."""
        keyed = self._keyed(group.file)
        ident = index_identity(group.member)
        found = {}
        for field in group.fields:
            key = (ident["type"], ident.get("number"), field.param, group.levtype,
                   None if field.level is None else str(field.level), str(group.file.step))
            matches = keyed.get(key, [])
            found[field] = matches[0] if len(matches) == 1 else None
        return found

    def _keyed(self, file: DataFile) -> dict[tuple, list[dict]]:
        """The file's index lines by (type, number, param, levtype, levelist, step), built once per file."""
        with self._keyed_lock:
            if file not in self._keyed_index:
                keyed: dict[tuple, list[dict]] = {}
                for line in self.index_lines(file):
                    key = tuple(line.get(k) for k in ("type", "number", "param", "levtype", "levelist", "step"))
                    keyed.setdefault(key, []).append(line)
                self._keyed_index[file] = keyed
            return self._keyed_index[file]

    def fetch(self, group: RequestGroup, target: str) -> Fetched:
        """Download the group's fields into ``target`` (only their byte ranges), retrying transient failures."""
        found = self.lines_for(group)
        if any(line is None for line in found.values()):
            raise SourceFailed(f"fields {', '.join(f.label() for f in self.missing(group))} are not in the index",
                               group.member, group.describe())
        lines = sorted(found.values(), key=lambda line: line["_offset"])
        ranges = [(int(line["_offset"]), int(line["_length"])) for line in lines]
        url = group.file.url(self.root)
        started = time.perf_counter()
        waits = self.retry.waits()
        while True:
            try:
                result = self.client.retrieve(target=target, **group.client_request())
                got = [(u.split("?", 1)[0], [tuple(p) for p in parts]) for u, parts in result.urls]  # azure: less its token
                if [u for u, _ in got] != [url]:
                    raise SourceFailed(f"the ecmwf-opendata client asked for {[u for u, _ in got]}, not {url}: "
                                       "aifs.inputs.opendata_layout and the client disagree on open data's layout",
                                       group.member, group.describe())
                if sorted(got[0][1]) != ranges:
                    raise SourceFailed("the client's byte ranges are not the index's lines for these fields",
                                       group.member, group.describe())
                size = os.path.getsize(target)
                if size != sum(length for _, length in ranges):
                    raise OSError(f"short transfer: {size} bytes of {sum(length for _, length in ranges)}")
                return Fetched(group, target, url, ranges, lines, time.perf_counter() - started)
            except SourceFailed:
                raise
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else None
                if status in (403, 404):
                    raise SourceNotPublished(f"data file not found (HTTP {status}) although its index exists",
                                             group.member, url) from exc
                problem = exc
            except Exception as exc:  # broken bodies (ChunkedEncodingError, ProtocolError), short files (multiurl asserts)
                problem = exc
            wait = next(waits, None)
            if wait is None:
                raise SourceFailed(f"giving up after {self.retry.attempts} attempts: {type(problem).__name__}: {problem}",
                                   group.member, group.describe()) from problem
            LOG.warning("[FETCH] %s: %s: %s; retrying in %.1f s", group.describe(), type(problem).__name__, problem, wait)
            time.sleep(wait)
