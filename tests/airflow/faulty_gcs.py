"""The tests' GCS proxy (aifs.testing.gcs_proxy), under the name the Airflow tests import."""

from aifs.testing.gcs_proxy import Fault, FaultyGCS  # noqa: F401
