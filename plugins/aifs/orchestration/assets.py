"""The assets the pipeline's DAGs hand work to each other with, defined once.

A producer DAG (its task's ``outlets``) and its consumers (their ``schedule``) must name the very
same asset, or the consumer never starts; defining each here once keeps them so. The module is
light on purpose (only ``airflow.sdk``): every DAG file imports it when it is parsed.
"""

from __future__ import annotations

from airflow.sdk import Asset

#: Emitted by aifs_ens_forecast's verify once a date's members all verify. Its event's extra says
#: where they are: bucket, date (YYYYMMDD_HHMM), prefix, members (e.g. "1-50"), objects.
#: aifs_ens_products is scheduled on it.
FORECASTS = Asset(name="aifs_ens_forecasts", uri="aifs://aifs-ens/forecasts")

#: Emitted by aifs_ens_inputs once a date's input states verify. Its event's extra: bucket, date
#: (YYYYMMDD_HHMM), members (e.g. "1-50"), checkpoint, prefix. aifs_ens_forecast is scheduled on it
#: when AIFS_ENS_FORECAST_TRIGGER is inputs or inputs_or_time (aifs.orchestration.inputs_asset).
INPUTS = Asset(name="aifs_ens_inputs", uri="aifs://aifs-ens/inputs")
