"""AIFS-ENS on Airflow: shared contracts (layout, members, exit codes), the worker and the orchestration.

Importing ``aifs`` or its contract modules must stay cheap and free of torch/anemoi: the DAG
imports them at parse time in Composer.
"""

__version__ = "0.1.0"
