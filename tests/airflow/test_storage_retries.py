"""The storage layer rides out the bucket's transient errors: a real HTTP proxy in front of the GCS
emulator answers 503 (or 429, 500) to the real google-cloud-storage client on a real connection."""

from __future__ import annotations

import pytest
from faulty_gcs import FaultyGCS

from aifs import layout
from aifs.orchestration import storage

DATE = "20250601_0000"


@pytest.fixture
def proxy(emulator, monkeypatch):
    faulty = FaultyGCS(emulator.url)
    monkeypatch.setenv(storage.EMULATOR_ENV, faulty.url)
    yield faulty
    faulty.close()


@pytest.mark.parametrize("status", [503, 429, 500])
def test_listing_getting_and_reading_survive_a_transient_error(gcs, bucket, proxy, status):
    name = layout.input_object(DATE, 1)
    gcs.bucket(bucket).blob(name).upload_from_string(b"input state")
    client = storage.storage_client()
    listing = proxy.fail("GET", rf"/b/{bucket}/o\?.*prefix=", status)
    get = proxy.fail("GET", rf"/b/{bucket}/o/[^?]+\?", status)
    read = proxy.fail("GET", r"alt=media", status)

    assert storage.list_object_names(client, bucket, f"{DATE}/input/") == {name}
    assert storage.get_blob(client, bucket, name).size == len(b"input state")
    assert storage.read_bytes(client, bucket, name) == b"input state"
    assert storage.get_blob(client, bucket, layout.input_object(DATE, 2)) is None  # absent is an answer, not an error

    assert [len(f.hits) for f in (listing, get, read)] == [1, 1, 1]
    assert len(proxy.answered(status)) == 3


def test_a_bucket_that_stays_down_raises_a_transient_error_in_time(gcs, bucket, proxy, monkeypatch):
    """After its deadline the call raises, and says the error was transient (the task's retry is next)."""
    monkeypatch.setattr(storage, "STORAGE_RETRY_DEADLINE_S", 3.0)  # minutes in production
    proxy.fail("GET", rf"/b/{bucket}/o\?", times=1000)
    with pytest.raises(Exception) as caught:
        storage.list_object_names(storage.storage_client(), bucket, f"{DATE}/input/")
    assert storage.is_transient(caught.value)
    assert len(proxy.answered(503)) >= 2  # retried before giving up
