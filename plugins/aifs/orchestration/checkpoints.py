"""A checkpoint's anemoi metadata, read on the Airflow side without torch or anemoi; and the
worker generation (aifs.generations) it needs.

A checkpoint is the zip ``torch.save`` writes; anemoi keeps its metadata in it as a small JSON
entry, ``<dir>/anemoi-metadata/anemoi.json`` (older checkpoints: ``ai-models.json``; found by base
name, as anemoi.utils.checkpoints.load_metadata does). zipfile reads the archive's directory at its
end and then that one entry, so from a seekable remote file only those bytes travel, never the
1-2.5 GB of weights:

* a path: the file on this machine (the local backend, whose worker runs here);
* ``gs://bucket/object``: google-cloud-storage's BlobReader (ranged downloads of the generation
  found when it was opened);
* a Hugging Face id ``org/repo[:file]`` (as the worker names them, aifs.worker.model): ranged GETs
  of the file's ``resolve`` URL at the revision the deployment pinned (identity ``hf:<commit>``),
  else ``main``; ``HF_TOKEN`` and ``HF_ENDPOINT`` apply as in huggingface_hub (not needed here).

A path on an ssh/gce/gke backend names a file on the GPU host or in its image, which this side
cannot read: there the deployment declares the checkpoint's generation (AIFS_ENS_CHECKPOINTS
``"generation"``), and the worker, which reads the file, refuses one its environment cannot load.

Nothing is cached: every run reads what its checkpoint is when it runs. Errors that a later try
cannot fix (no such file, not a zip, no metadata) are CheckpointUnreadable; network hiccups
propagate as they are, for the task's retries.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import re
import zipfile
from typing import Any, Callable, Mapping

from aifs.generations import GENERATIONS, Generation, generation_of

#: Base names anemoi gives the metadata entry: the current one first (anemoi.utils.checkpoints).
METADATA_NAMES = ("anemoi.json", "ai-models.json")
#: A metadata entry larger than this is not anemoi's (the real ones are well under 1 MiB): refuse it
#: rather than fetch it.
MAX_METADATA_BYTES = 64 << 20
GS_PREFIX = "gs://"


class CheckpointUnreadable(ValueError):
    """The checkpoint's metadata cannot be read (missing, not a zip, no anemoi metadata); names the checkpoint."""


class GenerationMismatch(ValueError):
    """The deployment declared one generation for a checkpoint whose own record says another."""


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    ref: str  # the checkpoint as the run names it
    source: str  # exactly what was read: a file, a bucket object's generation, a URL at a revision
    metadata: dict[str, Any]


# -- where a checkpoint is ------------------------------------------------------------------------


def is_hugging_face_id(ref: str) -> bool:
    """``org/repo`` or ``org/repo:file``: the worker's rule (aifs.worker.model.resolve_checkpoint), without the file check."""
    repo = ref.partition(":")[0]
    return repo.count("/") == 1 and not ref.startswith((".", "/", "~")) and not repo.endswith(".ckpt") and "://" not in ref


def is_host_path(ref: str) -> bool:
    """A path: on the GPU host (ssh, gce, gke) this side cannot read it."""
    return not ref.startswith(GS_PREFIX) and not is_hugging_face_id(ref)


def hugging_face_file(ref: str) -> tuple[str, str]:
    """``(repo_id, filename)`` of ``org/repo[:file]``; the file of a known repo is the worker's choice."""
    from aifs.worker.model import KNOWN_HF_CHECKPOINTS  # the worker's own table: the file it will load

    repo, _, filename = ref.partition(":")
    filename = filename or KNOWN_HF_CHECKPOINTS.get(repo, "")
    if not filename:
        raise CheckpointUnreadable(
            f"checkpoint {ref}: which file of the Hugging Face repository {repo} is the model? "
            f"Name it as {repo}:<file>.ckpt (known repositories: {', '.join(sorted(KNOWN_HF_CHECKPOINTS))})"
        )
    return repo, filename


# -- the metadata entry of a zip ------------------------------------------------------------------


def metadata_from_zip(fileobj: Any, ref: str) -> dict[str, Any]:
    """The anemoi metadata JSON of the checkpoint zip open in ``fileobj`` (seekable)."""
    try:
        archive = zipfile.ZipFile(fileobj)
    # not OSError: a dropped connection while reading is for the task's retries, not a verdict on the file
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise CheckpointUnreadable(f"checkpoint {ref} is not a checkpoint: not a zip archive ({exc})") from None
    with archive:
        for name in METADATA_NAMES:
            entries = [i for i in archive.infolist() if os.path.basename(i.filename) == name]
            if len(entries) > 1:
                raise CheckpointUnreadable(f"checkpoint {ref} holds {len(entries)} {name} entries: {', '.join(e.filename for e in entries)}")
            if entries:
                (entry,) = entries
                if entry.file_size > MAX_METADATA_BYTES:
                    raise CheckpointUnreadable(f"checkpoint {ref}: its {entry.filename} is {entry.file_size} bytes, not anemoi metadata")
                try:
                    metadata = json.loads(archive.read(entry))
                except (ValueError, zipfile.BadZipFile) as exc:
                    raise CheckpointUnreadable(f"checkpoint {ref}: {entry.filename} is not valid JSON ({exc})") from None
                if not isinstance(metadata, dict):
                    raise CheckpointUnreadable(f"checkpoint {ref}: {entry.filename} is not a JSON object")
                return metadata
    raise CheckpointUnreadable(
        f"checkpoint {ref} has no anemoi metadata (no anemoi-metadata/{METADATA_NAMES[0]} in the zip): not an anemoi checkpoint"
    )


# -- ranged HTTP reads ------------------------------------------------------------------------------


class RangedHTTPFile(io.RawIOBase):
    """A read-only, seekable file over HTTP byte ranges: only the blocks read are fetched.

    Each fetch is one ``Range: bytes=a-b`` GET of ``url`` (redirects followed, as Hugging Face's
    resolve URLs redirect to their CDN); blocks are kept (bounded) so zipfile's small reads of the
    same region cost one request. A server that answers a range with the whole file is refused
    before its body is read: falling back to downloading gigabytes is not an option here.
    """

    BLOCK = 256 << 10
    MAX_BLOCKS = 256  # 64 MiB at most in memory

    def __init__(self, url: str, headers: Mapping[str, str] | None = None, *, session: Any = None,
                 timeout: tuple[float, float] = (10.0, 60.0), name: str | None = None):
        import requests

        super().__init__()
        self.url, self.name = url, name or url
        self._headers = dict(headers or {})
        self._own_session = session is None
        self._session = session or requests.Session()
        self._timeout = timeout
        self._blocks: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._pos = 0
        self.requests = 0  # ranged GETs made
        self.fetched = 0  # bytes they brought
        # the file's tail (where zipfile looks first) and its size, in one request
        tail, self.size = self._get(f"bytes=-{self.BLOCK}")
        first = (self.size - len(tail)) // self.BLOCK
        for index in range(first, -(-self.size // self.BLOCK)):
            start = index * self.BLOCK - (self.size - len(tail))
            if start >= 0:
                self._keep(index, tail[start:start + self.BLOCK])

    def _get(self, byte_range: str) -> tuple[bytes, int]:
        response = self._session.get(self.url, headers={**self._headers, "Range": byte_range}, timeout=self._timeout,
                                     stream=True, allow_redirects=True)
        with response:
            if response.status_code in (401, 403, 404, 410):
                raise CheckpointUnreadable(
                    f"checkpoint {self.name}: {response.status_code} {response.reason} from {response.url}"
                    + (" (a gated or private repository needs HF_TOKEN)" if response.status_code in (401, 403) else "")
                )
            if response.status_code != 206:
                response.raise_for_status()  # 5xx: for the task's retries
                raise CheckpointUnreadable(
                    f"checkpoint {self.name}: {response.url} answered a byte-range request with {response.status_code}, "
                    "not 206 Partial Content; reading the metadata would mean downloading the whole checkpoint"
                )
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.headers.get("Content-Range", "").strip())
            if not match:
                raise CheckpointUnreadable(f"checkpoint {self.name}: no usable Content-Range in the answer of {response.url}")
            body = response.content
        self.requests += 1
        self.fetched += len(body)
        start, end, size = map(int, match.groups())
        if len(body) != end - start + 1:
            raise IOError(f"checkpoint {self.name}: asked {byte_range}, got {len(body)} bytes for {start}-{end}")
        return body, size

    def _keep(self, index: int, block: bytes) -> None:
        self._blocks[index] = block
        self._blocks.move_to_end(index)
        while len(self._blocks) > self.MAX_BLOCKS:
            self._blocks.popitem(last=False)

    def _ensure(self, first: int, last: int) -> None:
        """Fetch the missing blocks ``first..last`` (inclusive), each missing run in one request."""
        index = first
        while index <= last:
            if index in self._blocks:
                self._blocks.move_to_end(index)
                index += 1
                continue
            run_end = index
            while run_end + 1 <= last and run_end + 1 not in self._blocks:
                run_end += 1
            start, stop = index * self.BLOCK, min(self.size, (run_end + 1) * self.BLOCK)
            body, _ = self._get(f"bytes={start}-{stop - 1}")
            for i in range(index, run_end + 1):
                self._keep(i, body[(i - index) * self.BLOCK:(i - index + 1) * self.BLOCK])
            index = run_end + 1

    def close(self) -> None:
        if not self.closed:
            self._blocks.clear()
            if self._own_session:
                self._session.close()
        super().close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(22, "negative seek position")  # as a real file does (zipfile expects OSError)
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self.size, self._pos + len(view))
        if end <= self._pos:
            return 0
        self._ensure(self._pos // self.BLOCK, (end - 1) // self.BLOCK)
        done = 0
        while self._pos < end:
            index, offset = divmod(self._pos, self.BLOCK)
            piece = self._blocks[index][offset:offset + (end - self._pos)]
            view[done:done + len(piece)] = piece
            done += len(piece)
            self._pos += len(piece)
        return done


# -- the three places -------------------------------------------------------------------------------


def _read_path(ref: str) -> CheckpointMetadata:
    path = os.path.expanduser(ref)
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            metadata = metadata_from_zip(f, ref)
    except FileNotFoundError:
        raise CheckpointUnreadable(f"checkpoint {ref}: no such file on this machine") from None
    except IsADirectoryError:
        raise CheckpointUnreadable(f"checkpoint {ref} is a directory, not a checkpoint file") from None
    except PermissionError as exc:
        raise CheckpointUnreadable(f"checkpoint {ref} cannot be read here: {exc}") from None
    return CheckpointMetadata(ref, f"{os.path.abspath(path)} ({stat.st_size} bytes)", metadata)


def _read_gcs(ref: str, gcp_conn_id: str) -> CheckpointMetadata:
    from google.api_core.exceptions import NotFound

    from aifs.orchestration.storage import STORAGE_ATTEMPT_TIMEOUT_S, storage_client, storage_request, transient_retry

    bucket_name, _, name = ref[len(GS_PREFIX):].partition("/")
    if not bucket_name or not name:
        raise CheckpointUnreadable(f"checkpoint {ref}: expected gs://<bucket>/<object>")
    try:
        blob = storage_client(gcp_conn_id).bucket(bucket_name).get_blob(name, **storage_request())
    except NotFound:
        blob = None
    if blob is None:
        raise CheckpointUnreadable(f"checkpoint {ref}: no such object (or no such bucket)")
    generation, size = blob.generation, blob.size  # before reading: each download rewrites the blob's properties
    # ranged reads of the generation found now: an object replaced meanwhile fails the read, not mixes two files
    with blob.open("rb", chunk_size=RangedHTTPFile.BLOCK, retry=transient_retry(), timeout=STORAGE_ATTEMPT_TIMEOUT_S,
                   if_generation_match=generation) as f:
        metadata = metadata_from_zip(f, ref)
    return CheckpointMetadata(ref, f"{ref} generation {generation} ({size} bytes)", metadata)


#: Hugging Face's public download URL of a file at a revision (what huggingface_hub.hf_hub_url builds;
#: written out here because Composer's environment need not have huggingface_hub, while requests
#: comes with Airflow). HF_ENDPOINT and HF_TOKEN mean what they mean to huggingface_hub.
HF_RESOLVE_URL = "{endpoint}/{repo}/resolve/{revision}/{filename}"
HF_DEFAULT_ENDPOINT = "https://huggingface.co"


def hugging_face_url(repo: str, filename: str, revision: str, endpoint: str | None = None) -> str:
    from urllib.parse import quote

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
    return HF_RESOLVE_URL.format(endpoint=endpoint, repo=repo, revision=quote(revision, safe=""), filename=quote(filename))


def _read_hugging_face(ref: str, revision: str, endpoint: str | None) -> CheckpointMetadata:
    repo, filename = hugging_face_file(ref)
    url = hugging_face_url(repo, filename, revision, endpoint)
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}  # gated or private repositories
    with RangedHTTPFile(url, headers, name=ref) as f:
        metadata = metadata_from_zip(f, ref)
        size, fetched = f.size, f.fetched
    return CheckpointMetadata(ref, f"{url} ({size} bytes; {fetched} read)", metadata)


def read_metadata(ref: str, *, identity: str | None = None, gcp_conn_id: str = "google_cloud_default",
                  hf_endpoint: str | None = None) -> CheckpointMetadata:
    """The anemoi metadata of ``ref`` (a path here, ``gs://``, or a Hugging Face id at ``identity``'s revision)."""
    if ref.startswith(GS_PREFIX):
        return _read_gcs(ref, gcp_conn_id)
    if is_hugging_face_id(ref) and not os.path.exists(ref):  # the worker's order: an existing file wins
        revision = identity[len("hf:"):] if identity and identity.startswith("hf:") else "main"
        return _read_hugging_face(ref, revision, hf_endpoint)
    return _read_path(ref)


# -- the generation ---------------------------------------------------------------------------------


def choose_generation(
    ref: str,
    *,
    backend: str,
    declared: str | None = None,
    identity: str | None = None,
    gcp_conn_id: str = "google_cloud_default",
    log: Callable[[str], None] = lambda line: None,
) -> Generation:
    """The generation whose worker environment loads ``ref``, from what the checkpoint records.

    Raises aifs.generations.UnsupportedCheckpoint (no environment loads it: the message says what
    it needs), CheckpointUnreadable, or GenerationMismatch (the deployment's declaration disagrees
    with the checkpoint). A path on a GPU host (any backend but local) takes the declaration.
    """
    if backend != "local" and is_host_path(ref):
        if declared not in GENERATIONS:
            raise CheckpointUnreadable(
                f"checkpoint {ref} is a path on the {backend} host, which Airflow cannot read, and AIFS_ENS_CHECKPOINTS "
                f'declares no generation for it: add "generation": one of {", ".join(GENERATIONS)}'
            )
        log(f"checkpoint {ref}: a path on the {backend} host; generation {declared} as the deployment declares "
            "(the worker refuses a checkpoint its environment cannot load)")
        return GENERATIONS[declared]
    found = read_metadata(ref, identity=identity, gcp_conn_id=gcp_conn_id)
    generation = generation_of(found.metadata, f"checkpoint {ref}")
    log(f"checkpoint {ref}: metadata read from {found.source}; it needs {generation.model} "
        f"({generation.name}: anemoi-models {generation.anemoi_models[0]}.{generation.anemoi_models[1]}.x)")
    if declared and declared != generation.name:
        raise GenerationMismatch(
            f"checkpoint {ref}: AIFS_ENS_CHECKPOINTS declares generation {declared}, but the checkpoint records the "
            f"versions of {generation.name} ({generation.model}); correct the declaration"
        )
    return generation
