"""Write a member's state to the bucket so that it only ever appears whole, then its manifest.

The pickle goes to a local scratch file, then up in one verified upload (the worker's own
``upload_verified``: a resumable upload, which GCS makes visible only when its last chunk
commits, read back for size and crc32c). The manifest follows: its presence says the pickle
beside it is this run's and complete.
"""

from __future__ import annotations

import json
import logging
import os
import pickle

from aifs.inputs import manifest as manifests
from aifs.inputs.errors import InputWriteFailed
from aifs.layout import input_filename, input_manifest_object, input_object

LOG = logging.getLogger("aifs.inputs")

#: Seconds one object may take, retries included.
UPLOAD_DEADLINE = 600.0


def existing_problems(bucket, date: str, member: int, identity: str, variables) -> list[str]:
    """Empty when the member's pickle and manifest are in the bucket and match this run; else why not."""
    from aifs.worker.storage import BUCKET_ERRORS

    try:
        blob = bucket.get_blob(input_manifest_object(date, member))
        if blob is None:
            return ["no input manifest"]
        manifest = json.loads(blob.download_as_bytes())
        pickle_blob = bucket.get_blob(input_object(date, member))
    except ValueError:
        return ["the input manifest is not JSON"]
    except BUCKET_ERRORS as exc:
        raise InputWriteFailed(f"could not read the bucket: {exc}", member, f"gs://{bucket.name}/{date}/") from exc
    return manifests.manifest_problems(manifest, identity=identity, variables=variables,
                                       size=None if pickle_blob is None else pickle_blob.size,
                                       crc32c=None if pickle_blob is None else pickle_blob.crc32c)


def write_pickle(state: dict, scratch: str, member: int) -> str:
    local = os.path.join(scratch, input_filename(member))
    with open(local, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)  # protocol 5: arrays as raw bytes, what safe_pickle reads
    return local


def upload_member(bucket, date: str, member: int, local: str, manifest_of) -> dict:
    """Upload the pickle, verified; then the manifest ``manifest_of(size, crc32c)``; return the manifest."""
    from aifs.worker.errors import UploadFailed
    from aifs.worker.storage import delete_object, upload_text, upload_verified

    name = input_object(date, member)
    try:
        size, crc = upload_verified(bucket, local, name, member, UPLOAD_DEADLINE)
    except UploadFailed as exc:
        try:  # an object that did not verify must not stay where the forecast looks for inputs
            delete_object(bucket, name, member, 60.0)
        except UploadFailed as cleanup:
            LOG.error("[WRITE] could not remove the unverified %s: %s", name, cleanup)
        raise InputWriteFailed(exc.problem, member, exc.path) from exc
    try:
        manifest = manifest_of(size, crc)
        upload_text(bucket, manifests.dumps(manifest), input_manifest_object(date, member), member, UPLOAD_DEADLINE)
    except UploadFailed as exc:
        raise InputWriteFailed(exc.problem, member, exc.path) from exc
    return manifest
