"""gcp-storage-emulator with a real bucket's linear costs for resumable uploads: what bench/member_cycle.py starts.

The stock emulator does two things no real bucket does, both on the one Python thread that also
answers every other request, on a machine whose two cores the measured worker needs:

- it appends every resumable-upload chunk by reading the whole partial object back, concatenating
  and writing it again: O(size^2) copying, ~150 s of emulator CPU for one 1.8 GB GRIB window in
  32 MiB chunks;
- it finalizes an object by copying all of it once more and hashing all of it (md5 and crc32c)
  only when the last chunk arrives: ~5 s for a 1.8 GB window, during which the upload's final
  request waits. GCS hashes a resumable upload as its chunks arrive and finalizes in a fraction
  of a second whatever the size.

Here each upload session keeps its bytes in one bytearray with running md5 and crc32c, updated as
each chunk arrives, and hands both over when the object is complete; the stock checksum checks
then compare against those digests. Everything else (HTTP server, storage, listing, read-back)
is the stock emulator.

    python bench/_fast_emulator.py start --host=127.0.0.1 --port=PORT --in-memory
"""

import base64
import hashlib
import sys

import google_crc32c
from gcp_storage_emulator import storage as _storage
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import BadRequest
from gcp_storage_emulator.handlers import objects as _objects


class _Session:
    __slots__ = ("data", "md5", "crc32c")

    def __init__(self):
        self.data = bytearray()
        self.md5 = hashlib.md5()
        self.crc32c = google_crc32c.Checksum()


_open: dict[str, _Session] = {}  # upload id -> session still receiving chunks
_complete: dict[int, _Session] = {}  # id(object bytes) -> session, from its last chunk until finalized


def get_resumable_byte_count(self, file_id):
    session = _open.get(file_id)
    return len(session.data) if session else 0


def add_to_resumable_upload(self, file_id, content, total_size=None, expected_start=None):
    session = _open.setdefault(file_id, _Session())
    if expected_start is not None and expected_start != len(session.data):
        raise BadRequest(f"Invalid Content-Range start: expected {len(session.data)}, got {expected_start}")
    if content:
        session.data += content
        session.md5.update(content)
        session.crc32c.update(content)
    if total_size is None or len(session.data) < total_size:
        return None
    del _open[file_id]
    if len(session.data) > total_size:  # more sent than declared: no running digests to trust
        return bytes(memoryview(session.data)[:total_size])
    _complete[id(session.data)] = session
    return session.data


def _digest_of(content, stock, running):
    session = _complete.get(id(content))
    if session is not None and session.data is content:
        return base64.b64encode(running(session).digest()).decode("ascii")
    return stock(content)


_stock_crc32c, _stock_md5, _stock_finalize = _objects._crc32c, _objects._md5, _objects._finalize_resumable_object


def _crc32c(content):
    return _digest_of(content, _stock_crc32c, lambda s: s.crc32c)


def _md5(content):
    return _digest_of(content, _stock_md5, lambda s: s.md5)


def _finalize_resumable_object(response, storage, obj, data, upload_id):
    try:
        return _stock_finalize(response, storage, obj, data, upload_id)
    finally:
        _complete.pop(id(data), None)


_storage.Storage.get_resumable_byte_count = get_resumable_byte_count
_storage.Storage.add_to_resumable_upload = add_to_resumable_upload
_objects._crc32c, _objects._md5 = _crc32c, _md5
_objects._finalize_resumable_object = _finalize_resumable_object

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
