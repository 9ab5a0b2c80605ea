"""A google-cloud-storage client for the Airflow side (sensor, plan, verify).

In production the credentials come from an Airflow connection (``gcp_conn_id``, through the
Google provider's GCSHook), as everywhere else in Composer. With ``STORAGE_EMULATOR_HOST`` set
(tests, ``make demo``) the client talks to that emulator with anonymous credentials, because
an emulator has no identity to check and a developer machine has no Google credentials.

The reads of the Airflow side (the input sensor and its trigger, plan, verify) use the helpers
below, or pass ``storage_request()`` to the client themselves: one explicit retry policy for
google-cloud-storage, under which 408, 429, 5xx and dropped or refused connections are retried
with exponential backoff for up to ``STORAGE_RETRY_DEADLINE_S`` per call, then raised (the DAG's
task-level retries take over from there). One hiccup of the bucket must not fail a day's run; a
bucket that is really gone still fails it, within minutes.
"""

from __future__ import annotations

import os

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


def storage_client(gcp_conn_id: str = "google_cloud_default"):
    """A ``google.cloud.storage.Client``: the emulator's when STORAGE_EMULATOR_HOST is set."""
    emulator = os.environ.get(EMULATOR_ENV)
    if emulator:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        project = os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator")
        return storage.Client(project=project, credentials=AnonymousCredentials(), client_options={"api_endpoint": emulator})

    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    return GCSHook(gcp_conn_id=gcp_conn_id).get_conn()


#: How long one storage call may keep retrying transient errors before it raises.
STORAGE_RETRY_DEADLINE_S = 300.0
#: Seconds one HTTP attempt may take (connect, read): a hung connection is an error to retry, not a stall.
STORAGE_ATTEMPT_TIMEOUT_S = (10.0, 60.0)


def transient_retry(deadline_s: float | None = None):
    """google-cloud-storage's own retry predicate (408, 429, 5xx, connection errors) with our deadline.

    The library's predicate, not a list of our own: it also knows the download path's raw
    ``InvalidResponse`` and auth transport errors wrapping a connection error.
    """
    from google.cloud.storage.retry import DEFAULT_RETRY

    deadline_s = STORAGE_RETRY_DEADLINE_S if deadline_s is None else deadline_s
    return DEFAULT_RETRY.with_timeout(deadline_s).with_delay(initial=1.0, multiplier=2.0, maximum=30.0)


def is_transient(exc: BaseException) -> bool:
    """True for an error that a later try may well not meet (what ``transient_retry`` retries).

    For code that turns storage errors into findings: a transient one must be raised instead, so
    that the task's retry reads the bucket again rather than reporting a member as incomplete.
    """
    from google.api_core.exceptions import RetryError
    from google.cloud.storage.retry import _should_retry  # the predicate of DEFAULT_RETRY

    # RetryError: a call that kept meeting transient errors until its deadline
    return isinstance(exc, RetryError) or bool(_should_retry(exc))


def storage_request() -> dict:
    """Keyword arguments (``retry``, ``timeout``) for any google-cloud-storage read call.

    For code that calls the client itself (aifs.completeness takes them as ``**request``).
    """
    return {"retry": transient_retry(), "timeout": STORAGE_ATTEMPT_TIMEOUT_S}


def list_blobs(client, bucket: str, prefix: str) -> list:
    """Every object under ``prefix``, listed with transient errors retried (each page is retried)."""
    return list(client.list_blobs(bucket, prefix=prefix, **storage_request()))


def list_object_names(client, bucket: str, prefix: str) -> set[str]:
    return {blob.name for blob in list_blobs(client, bucket, prefix)}


def get_blob(client, bucket: str, name: str):
    """The object's metadata (a ``Blob``), or None when it does not exist."""
    return client.bucket(bucket).get_blob(name, **storage_request())


def read_bytes(client, bucket: str, name: str) -> bytes:
    """The object's content; raises google.api_core.exceptions.NotFound when it does not exist."""
    return client.bucket(bucket).blob(name).download_as_bytes(**storage_request())
