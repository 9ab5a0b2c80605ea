"""gcp-storage-emulator with linear-time resumable uploads: what bench/member_cycle.py starts.

The stock emulator appends every resumable-upload chunk by reading the whole partial object back,
concatenating and writing it again: O(size^2) copying, ~150 s of emulator CPU for one 1.8 GB GRIB
window in 32 MiB chunks on a 2-core machine. A real bucket does no such thing, and on a small
machine that CPU competes with the very worker being measured. Here partial uploads are kept in a
bytearray per upload session and handed over once complete; everything else (HTTP server,
checksums, storage, listing, read-back) is the stock emulator.

    python bench/_fast_emulator.py start --host=127.0.0.1 --port=PORT --in-memory
"""

import sys

from gcp_storage_emulator import storage as _storage
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import BadRequest

_partials: dict[str, bytearray] = {}


def get_resumable_byte_count(self, file_id):
    return len(_partials.get(file_id, b""))


def add_to_resumable_upload(self, file_id, content, total_size=None, expected_start=None):
    received = _partials.setdefault(file_id, bytearray())
    if expected_start is not None and expected_start != len(received):
        raise BadRequest(f"Invalid Content-Range start: expected {len(received)}, got {expected_start}")
    received += content or b""
    if total_size is None or len(received) < total_size:
        return None
    del _partials[file_id]
    return bytes(memoryview(received)[:total_size])


_storage.Storage.get_resumable_byte_count = get_resumable_byte_count
_storage.Storage.add_to_resumable_upload = add_to_resumable_upload

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
