"""Host-backend tests (a package, so that its conftest does not shadow tests/airflow/conftest.py)."""
