"""Airflow-side logic: GPU host backends, params, planning, verification, alerts.

Never imports torch, anemoi or earthkit: this runs inside Composer.
"""
