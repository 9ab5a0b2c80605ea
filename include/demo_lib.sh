# shellcheck shell=bash
# Sourced by include/demo.sh and include/demo_products.sh (never run): the demo's settings, its
# deployment (an admin's AIFS_ENS_* variables, not a trigger's) and the helpers both stages use,
# so the two stages cannot drift apart on a port, a bucket or a date.
#
# The sourcing script sets REPO (the repository) and DEMO (the demo's folder) first.
# shellcheck disable=SC2034  # the settings below are the sourcing script's
: "${REPO:?REPO is set by the script that sources include/demo_lib.sh}"
: "${DEMO:?DEMO is set by the script that sources include/demo_lib.sh}"
: "${AIFS_WORKER_PYTHON:?set AIFS_WORKER_PYTHON to the worker environment python (make demo does)}"
: "${AIRFLOW_PYTHON:?set AIRFLOW_PYTHON to the Airflow environment python (make demo does)}"
MEMBERS="${DEMO_MEMBERS:-1-3}"
DATE="${DEMO_DATE:-20250601_0000}"
PORT="${DEMO_PORT:-9023}"
BUCKET="aifs-demo"
LOGICAL_DATE="${DATE:0:4}-${DATE:4:2}-${DATE:6:2}T${DATE:9:2}:${DATE:11:2}:00+00:00"
AIRFLOW_BIN="$(dirname "$AIRFLOW_PYTHON")/airflow"

export PYTHONPATH="$REPO/plugins${PYTHONPATH:+:$PYTHONPATH}"
export STORAGE_EMULATOR_HOST="http://127.0.0.1:$PORT"
export AIRFLOW_HOME="$DEMO/airflow"
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:///$DEMO/airflow/airflow.db"
export AIRFLOW__CORE__DAGS_FOLDER="$REPO/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$REPO/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIFS_WORKER_PYTHON AIFS_ENS_SCHEDULE=none
# The deployment: the local backend on CPU with the demo's scratch dir, and the one bucket and
# checkpoint a trigger may choose.
export AIFS_ENS_BACKEND=local
export AIFS_ENS_HOST="{\"scratch_dir\": \"$DEMO/scratch\", \"device\": \"cpu\", \"min_free_gb\": 0}"
export AIFS_ENS_BUCKETS="$BUCKET"
export AIFS_ENS_CHECKPOINTS="{\"$DEMO/tiny-o48.ckpt\": {\"identity\": null}}"

say() { printf '\n==> %s\n' "$*"; }

# Whether the demo's GCS emulator answers on STORAGE_EMULATOR_HOST.
answers() { "$AIFS_WORKER_PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/storage/v1/b?project=demo', timeout=1)" "$STORAGE_EMULATOR_HOST" 2>/dev/null; }

# start_emulator LOG: the GCS emulator on PORT, objects on disk in $DEMO/gcs; sets EMULATOR_PID and
# waits until it answers (its log and exit 1 when it dies first). The emulator program itself, not
# a wrapper, so that killing EMULATOR_PID really stops it.
start_emulator() {
  "$(dirname "$AIFS_WORKER_PYTHON")/gcp-storage-emulator" -d "$DEMO/gcs" start --host=127.0.0.1 --port="$PORT" --quiet \
    >"$1" 2>&1 &
  EMULATOR_PID=$!
  for _ in $(seq 100); do
    answers && break
    kill -0 "$EMULATOR_PID" 2>/dev/null || { cat "$1"; exit 1; }
    sleep 0.3
  done
}

# run_dag DAG CONF LOG: `airflow dags test DAG` for the demo's logical date, its output in LOG; sets
# DAG_STATE to the run's state (`airflow dags test` exits 0 even when the run failed: Airflow is asked).
run_dag() {
  set +e
  "$AIRFLOW_BIN" dags test "$1" "$LOGICAL_DATE" --conf "$2" >"$3" 2>&1
  set -e
  DAG_STATE=$("$AIRFLOW_BIN" dags state "$1" "$LOGICAL_DATE" 2>/dev/null | tail -1)
  DAG_STATE="${DAG_STATE%%,*}"
}

# task_lines REGEX LOG: the lines of an `airflow dags test` log matching REGEX, without their
# timestamp, level and source location.
task_lines() {
  grep -E "$1" "$2" | sed -E 's/^[^ ]+ \[[a-z ]+\] //; s/ \[[A-Za-z0-9_.]+\] loc=.*$//' || true
}
