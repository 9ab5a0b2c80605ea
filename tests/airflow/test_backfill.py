"""Backfilling a range of dates under a real scheduler: each date is its own run, with its own host.

The deployment here is what a Composer environment would set: a daily schedule, its backend and
host, and its param defaults in AIFS_ENS_PARAM_DEFAULTS, so backfill runs carry no conf of their
own and take their forecast date from their logical date. Unpausing the DAG also lets the scheduler create the
latest daily run; it finds no inputs for that date and fails at wait_for_inputs, before any host,
which this test checks too.

While the backfill runs, an operator also triggers the first backfilled date by hand (same bucket,
same members): two runs of one date on one machine (issue 12). They never run jobs at the same
time, judged by the jobs' own start and end times on the host (the worker Python here is a wrapper
around the real worker that records them), and neither run's teardown removes the other's scratch.
"""

from __future__ import annotations

import json
import stat
import tempfile
from pathlib import Path

from conftest import local_deployment, scratch_leftovers
from test_scheduler import DAG_ID, Airflow

from aifs import layout

DATES = ["20250601_0000", "20250602_0000"]

#: The stack's worker Python: the real one, but each worker job (``-m aifs.worker``) records its own
#: start and end on the host in $AIFS_TEST_TIMES ("start|end EPOCH PID ARGS", as backends/fake_worker.sh
#: does, so backend_helpers.job_spans reads it), and a job of $AIFS_TEST_GATED_DATE waits after its
#: start, holding the GPU lock it inherited, until the test creates $AIFS_TEST_GATE/<its pid>: the test
#: decides when each job of that date may go on, so the two runs meet in a fixed order.
TIMED_PYTHON = """#!/bin/bash
[ "$1 $2" = "-m aifs.worker" ] || exec "$AIFS_TEST_REAL_PYTHON" "$@"
echo "start $(date +%s.%N) $$ ${*:3}" >> "$AIFS_TEST_TIMES"
trap 'echo "end $(date +%s.%N) $$ ${*:3}" >> "$AIFS_TEST_TIMES"' EXIT
trap 'trap "" TERM; exit 143' TERM
if [[ " $* " == *" --date $AIFS_TEST_GATED_DATE "* ]]; then
  for _ in $(seq 1200); do [ -e "$AIFS_TEST_GATE/$$" ] && break; sleep 0.1; done
fi
"$AIFS_TEST_REAL_PYTHON" "$@"
"""


def _create_backfill(airflow: Airflow, body: dict):
    """POST the backfill; None (try again) while SQLite is locked by the scheduler's own writes.

    Unpausing makes the scheduler create the latest daily run at the same moment, and on SQLite
    Airflow then answers 503 "Database is locked" rather than waiting for the lock: a test-stack
    limit (production Composer runs PostgreSQL), so the request is repeated, as an operator would.
    """
    try:
        return airflow.request("POST", "/api/v2/backfills", body)
    except AssertionError as err:
        if "HTTP 503" in str(err) and "Database is locked" in str(err):
            return None
        raise


def _task_log(home: Path, run_id: str, task_id: str) -> str:
    """What a task of a run has logged so far (every try), from the stack's log folder."""
    return "".join(p.read_text(errors="replace") for p in sorted((home / "logs").rglob("*.log"))
                   if f"run_id={run_id}" in str(p) and f"task_id={task_id}" in str(p))


def test_backfill_runs_each_date_with_its_own_host(emulator, worker_python, gcs, bucket, seed, tiny_checkpoint, tmp_path):
    from backends.backend_helpers import assert_no_overlap, job_spans

    for date in DATES:
        seed(bucket, date, "1")
    defaults = {
        "members": "1", "bucket": bucket, "checkpoint": tiny_checkpoint, "lead_time": 12, "upload_threads": 2,
        "input_wait_minutes": 0.2, "input_poke_seconds": 1,
    }
    home = Path(tempfile.mkdtemp(prefix="aifs-backfill-test-"))
    timed_python, times, gate = tmp_path / "timed_python.sh", tmp_path / "job_times", tmp_path / "gate"
    timed_python.write_text(TIMED_PYTHON)
    timed_python.chmod(timed_python.stat().st_mode | stat.S_IXUSR)
    gate.mkdir()
    scratch = tmp_path / "scratch"
    stack = Airflow(home, {
        "STORAGE_EMULATOR_HOST": emulator.url,
        "AIFS_WORKER_PYTHON": str(timed_python),
        "AIFS_TEST_REAL_PYTHON": worker_python,
        "AIFS_TEST_TIMES": str(times),
        "AIFS_TEST_GATE": str(gate),
        "AIFS_TEST_GATED_DATE": DATES[0],
        "AIFS_ENS_SCHEDULE": "0 0 * * *",
        "AIFS_ENS_START_DATE": "2025-06-01",
        "AIFS_ENS_PARAM_DEFAULTS": json.dumps(defaults),
        **local_deployment(scratch),
    })

    def jobs(date: str, run_type: str) -> list[tuple[float, float | None, str]]:
        """The jobs of one date started by runs of one type (the run id is in the job's scratch path)."""
        return [s for s in job_spans(times) if f"--date {date} " in s[2] + " " and f"--{run_type}__" in s[2]]

    def run_dir(span) -> Path:  # <scratch>/<dag>/<date-hash>--<run id>, from the job's --input-dir
        args = span[2].split()
        return Path(args[args.index("--input-dir") + 1]).parent

    def release(span) -> None:
        pid = next(line.split()[2] for line in times.read_text().splitlines()
                   if line.startswith("start ") and float(line.split()[1]) == span[0])
        (gate / pid).touch()

    try:
        airflow = stack.start()
        airflow.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
        backfill = {"dag_id": DAG_ID, "from_date": "2025-06-01T00:00:00Z", "to_date": "2025-06-02T00:00:00Z",
                    "max_active_runs": 1}
        airflow.wait_for(lambda: _create_backfill(airflow, backfill), "the backfill to be created", timeout=60)

        # -- a manual run of the first date while the backfill's job for it holds the GPU ----------
        (backfill_job,) = airflow.wait_for(lambda: jobs(DATES[0], "backfill"), "the backfill's first job to start", timeout=300)
        manual_conf = {**defaults, "date": DATES[0]}  # same date, bucket and members; its own (empty) logical date
        manual_id = airflow.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": manual_conf})["dag_run_id"]
        # its member was planned (no manifest yet: the backfill's job has not run the forecast), so it waits for
        # the GPU; without the machine's GPU lock its job would start now instead, beside the backfill's
        airflow.wait_for(lambda: "the GPU is busy" in _task_log(home, manual_id, "run_member") or jobs(DATES[0], "manual"),
                         "the manual run's member to wait for the GPU", timeout=240)
        backfill_dir = run_dir(backfill_job)
        manual_dirs = [p for p in backfill_dir.parent.iterdir() if "--manual__" in p.name]
        assert backfill_dir.is_dir() and len(manual_dirs) == 1 and (manual_dirs[0] / "input").is_dir(), list(backfill_dir.parent.iterdir())
        release(backfill_job)

        # the backfill's job ends, its teardown runs, while the manual run's job is in flight (it waits at its start)
        (manual_job,) = airflow.wait_for(lambda: jobs(DATES[0], "manual"), "the manual run's job to start", timeout=120)
        airflow.wait_for(lambda: not backfill_dir.exists(), "the backfill's teardown of the first date", timeout=120)
        assert run_dir(manual_job) == manual_dirs[0] and (manual_dirs[0] / "input").is_dir() and (manual_dirs[0] / "output").is_dir(), \
            "the backfill's teardown removed the manual run's scratch"
        first_manifest = gcs.bucket(bucket).get_blob(layout.manifest_object(DATES[0], 1))
        assert first_manifest is not None, "the backfill's job did not finish its member"
        release(manual_job)

        def backfill_runs():
            runs = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?run_type=backfill&limit=10")["dag_runs"]
            done = [r for r in runs if r["state"] in ("success", "failed")]
            return runs if len(runs) == len(DATES) and len(done) == len(DATES) else None

        runs = sorted(airflow.wait_for(backfill_runs, "both backfill runs to finish", timeout=420),
                      key=lambda r: r["logical_date"])
        assert [r["state"] for r in runs] == ["success", "success"], [airflow.task_instances(r["dag_run_id"]) for r in runs]
        assert [r["logical_date"][:10] for r in runs] == ["2025-06-01", "2025-06-02"]

        for run, date in zip(runs, DATES):
            states = {(ti["task_id"], ti["map_index"]): ti["state"] for ti in airflow.task_instances(run["dag_run_id"])}
            # its own host: created and deleted within this run
            assert states[("create_host", -1)] == "success" and states[("delete_host", -1)] == "success", states
            assert states[("run_member", 0)] == "success"
            manifest = gcs.bucket(bucket).get_blob(layout.manifest_object(date, 1))
            assert manifest is not None, f"no manifest for {date}: the run did not forecast its own date"
            assert gcs.bucket(bucket).get_blob(layout.forecast_object(date, 1, 0, 12)) is not None

        # -- the manual run of the first date ------------------------------------------------------
        assert airflow.wait_for_run(manual_id, timeout=180) in ("success", "failed")
        # -- never two jobs at once on the machine, by the jobs' own clocks --------------------------
        spans = job_spans(times)
        assert len(spans) == 3 and len(jobs(DATES[0], "manual")) == 1, spans  # the backfill's two and the manual one
        assert_no_overlap(spans)
        assert airflow.run_state(manual_id) == "success", airflow.task_instances(manual_id)
        states = {(ti["task_id"], ti["map_index"]): ti["state"] for ti in airflow.task_instances(manual_id)}
        # it planned the member (not complete when it looked), so it made its own host and ran a job, which
        # found the member complete for this run and skipped it; then it removed its own scratch
        assert all(states[key] == "success" for key in (("create_host", -1), ("run_member", 0), ("delete_host", -1), ("verify", -1))), states
        member_log = _task_log(home, manual_id, "run_member")
        assert f"held by run={runs[0]['dag_run_id']} member=001" in member_log
        assert "[SKIP] member 001" in member_log
        assert gcs.bucket(bucket).get_blob(layout.manifest_object(DATES[0], 1)).generation == first_manifest.generation
        for run_id, own in ((runs[0]["dag_run_id"], backfill_dir), (manual_id, manual_dirs[0])):
            # each teardown found its own scratch there (not removed by the other run's) and removed only it
            removed = [line for line in _task_log(home, run_id, "delete_host").splitlines() if "scratch" in line]
            assert len(removed) == 1 and f"removed scratch {own}" in removed[0], removed

        # the latest scheduled run found no inputs for its date and stopped before making a host
        scheduled = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?run_type=scheduled&limit=10")["dag_runs"]
        for run in scheduled:
            airflow.wait_for_run(run["dag_run_id"], timeout=180)
            states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances(run["dag_run_id"])}
            assert states.get("wait_for_inputs") == "failed" and states.get("create_host") != "success", states
        assert scratch_leftovers(scratch) == []  # every host's scratch removed
    finally:
        for pid in (line.split()[2] for line in (times.read_text().splitlines() if times.exists() else [])):
            (gate / pid).touch()  # never leave a job waiting on its gate
        stack.stop()
