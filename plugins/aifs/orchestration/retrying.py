"""Task-level retries at the run's edges: the host's teardown and the bucket reads.

The storage layer retries each call for minutes (aifs.orchestration.storage); these retries
cover what outlasts that, and a Compute Engine API error, which the provider's hook does not
retry at all. Their delay is the deployment's AIFS_ENS_RETRY_DELAY_S, doubling each try.
"""

from __future__ import annotations

#: delete_host: a host that outlives its run bills an A100 until its own max_run_hours (12 h),
#: so the teardown insists: 5 retries from 2 minutes, doubling, span about an hour.
DELETE_HOST_RETRIES = 5
#: plan and verify: reading the bucket again is free, and one more try beats a failed day.
STORAGE_TASK_RETRIES = 2


def is_last_try(try_number: int, max_tries: int) -> bool:
    """Whether a failing try will not be retried (Airflow's rule: retry while try_number <= max_tries).

    ``max_tries`` is the task instance's, not the task's ``retries``: clearing a task instance
    raises it, so a cleared create_host gets its full set of tries again.
    """
    return max_tries <= 0 or try_number > max_tries


def will_retry(exc: BaseException, try_number: int, max_tries: int) -> bool:
    """Whether Airflow will run this task again after ``exc`` ends the try.

    Not after its last try, and never after the exceptions it does not retry (AirflowFailException,
    a terminated task): what the try made is then nobody's to adopt.
    """
    from airflow.sdk.exceptions import AirflowFailException, AirflowTaskTerminated

    if isinstance(exc, (AirflowFailException, AirflowTaskTerminated)):
        return False
    return not is_last_try(try_number, max_tries)
