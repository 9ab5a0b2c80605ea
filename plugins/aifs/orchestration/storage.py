"""A google-cloud-storage client for the Airflow side (sensor, plan, verify).

In production the credentials come from an Airflow connection (``gcp_conn_id``, through the
Google provider's GCSHook), as everywhere else in Composer. With ``STORAGE_EMULATOR_HOST`` set
(tests, ``make demo``) the client talks to that emulator with anonymous credentials, because
an emulator has no identity to check and a developer machine has no Google credentials.
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


def list_object_names(client, bucket: str, prefix: str) -> set[str]:
    return {blob.name for blob in client.list_blobs(bucket, prefix=prefix)}
