#!/usr/bin/env bash
# `make demo`: the whole pipeline on this machine, from nothing, with no cloud account.
#
#   1. a GCS emulator on loopback (objects kept in .demo/gcs so you can look at them afterwards);
#   2. a tiny stand-in for AIFS-ENS (O48 grid) and synthetic input states for 3 members;
#   3. `airflow dags test aifs_ens_forecast` with the local backend (set as the deployment's, by
#      AIFS_ENS_* variables; the run's conf holds only a forecaster's params): the real DAG, the real worker
#      (python -m aifs.worker in its own environment), one member after another;
#   4. where the forecasts are, and the run summary.
#
# Needs AIFS_WORKER_PYTHON (worker environment) and AIRFLOW_PYTHON (Airflow environment); the
# Makefile sets both after building them. Settings: DEMO_LEAD_TIME (hours, default 792 like the
# DAG), DEMO_MEMBERS (default 1-3), DEMO_DATE (default 20250601_0000), DEMO_PORT (default 9023).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${AIFS_WORKER_PYTHON:?set AIFS_WORKER_PYTHON to the worker environment python (make demo does)}"
: "${AIRFLOW_PYTHON:?set AIRFLOW_PYTHON to the Airflow environment python (make demo does)}"
DEMO="$REPO/.demo"
LEAD_TIME="${DEMO_LEAD_TIME:-792}"
MEMBERS="${DEMO_MEMBERS:-1-3}"
DATE="${DEMO_DATE:-20250601_0000}"
PORT="${DEMO_PORT:-9023}"
BUCKET="aifs-demo"
LOGICAL_DATE="${DATE:0:4}-${DATE:4:2}-${DATE:6:2}T${DATE:9:2}:${DATE:11:2}:00+00:00"
AIRFLOW_BIN="$(dirname "$AIRFLOW_PYTHON")/airflow"

say() { printf '\n==> %s\n' "$*"; }

# A fresh start every time: Airflow home, bucket contents and scratch (the checkpoint is rebuilt too,
# it takes seconds).
rm -rf "$DEMO"
mkdir -p "$DEMO/gcs" "$DEMO/scratch"

export PYTHONPATH="$REPO/plugins${PYTHONPATH:+:$PYTHONPATH}"
export STORAGE_EMULATOR_HOST="http://127.0.0.1:$PORT"
export AIRFLOW_HOME="$DEMO/airflow"
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:///$DEMO/airflow/airflow.db"
export AIRFLOW__CORE__DAGS_FOLDER="$REPO/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$REPO/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIFS_WORKER_PYTHON AIFS_ENS_SCHEDULE=none
# The deployment (an admin's settings, not the trigger's): the local backend on CPU with the demo's
# scratch dir, and the one bucket and checkpoint a trigger may choose.
export AIFS_ENS_BACKEND=local
export AIFS_ENS_HOST="{\"scratch_dir\": \"$DEMO/scratch\", \"device\": \"cpu\", \"min_free_gb\": 0}"
export AIFS_ENS_BUCKETS="$BUCKET"
export AIFS_ENS_CHECKPOINTS="{\"$DEMO/tiny-o48.ckpt\": {\"identity\": null}}"

say "starting the GCS emulator on $STORAGE_EMULATOR_HOST"
answers() { "$AIFS_WORKER_PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/storage/v1/b?project=demo', timeout=1)" "$STORAGE_EMULATOR_HOST" 2>/dev/null; }
if answers; then echo "something already answers on port $PORT: stop it or set DEMO_PORT"; exit 1; fi
# The emulator program itself (not a wrapper), so that the trap's kill really stops it.
"$(dirname "$AIFS_WORKER_PYTHON")/gcp-storage-emulator" -d "$DEMO/gcs" start --host=127.0.0.1 --port="$PORT" --quiet \
  >"$DEMO/emulator.log" 2>&1 &
EMULATOR_PID=$!
trap 'kill $EMULATOR_PID 2>/dev/null || true; wait $EMULATOR_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  answers && break
  kill -0 $EMULATOR_PID 2>/dev/null || { cat "$DEMO/emulator.log"; exit 1; }
  sleep 0.3
done

say "building the tiny AIFS-ENS stand-in and seeding inputs for members $MEMBERS of $DATE"
"$AIFS_WORKER_PYTHON" -m aifs.testing checkpoint --grid O48 --out "$DEMO/tiny-o48.ckpt" >/dev/null
"$AIFS_WORKER_PYTHON" -m aifs.testing seed --checkpoint "$DEMO/tiny-o48.ckpt" --bucket "$BUCKET" \
  --date "$DATE" --members "$MEMBERS"

say "creating Airflow's database in $AIRFLOW_HOME"
"$AIRFLOW_BIN" db migrate >"$DEMO/airflow-db.log" 2>&1 || { tail -50 "$DEMO/airflow-db.log"; exit 1; }

CONF=$(cat <<EOF
{"members": "$MEMBERS", "bucket": "$BUCKET", "checkpoint": "$DEMO/tiny-o48.ckpt", "lead_time": $LEAD_TIME,
 "input_wait_minutes": 1, "input_poke_seconds": 5}
EOF
)
say "airflow dags test aifs_ens_forecast $LOGICAL_DATE  (lead time ${LEAD_TIME} h; full log: $DEMO/dags-test.log)"
started=$(date +%s)
set +e
"$AIRFLOW_BIN" dags test aifs_ens_forecast "$LOGICAL_DATE" --conf "$CONF" >"$DEMO/dags-test.log" 2>&1
set -e
# `airflow dags test` exits 0 even when the run failed: ask Airflow for the run's state.
STATE=$("$AIRFLOW_BIN" dags state aifs_ens_forecast "$LOGICAL_DATE" 2>/dev/null | tail -1)
grep -E "\[(START|MEMBER|WINDOW|MANIFEST|CLEANUP)\]|DAG TEST\] (starting|end) task" "$DEMO/dags-test.log" \
  | sed -E 's/^[^ ]+ \[[a-z ]+\] //; s/ \[[A-Za-z0-9_.]+\] loc=.*$//' || true

say "run summary (logged by the verify task)"
sed -n '/AIFS-ENS run summary for/,/^members: /p' "$DEMO/dags-test.log" | sed -E 's/^.*(AIFS-ENS run summary)/\1/; s/ \[[A-Za-z0-9_.]+\] loc=.*$//'

say "forecasts in gs://$BUCKET/$DATE/forecasts/ (the emulator keeps them on disk in $DEMO/gcs/.cloudstorage/$BUCKET/)"
"$AIRFLOW_PYTHON" - "$BUCKET" "$DATE" <<'EOF'
import sys
from aifs import layout
from aifs.manifest import Manifest
from aifs.orchestration.storage import storage_client
bucket, date = sys.argv[1:]
client = storage_client()
for blob in client.list_blobs(bucket, prefix=layout.manifest_prefix(date)):
    # by name, not the listed generation: the emulator's on-disk mode does not serve those
    manifest = Manifest.from_json(client.bucket(bucket).blob(blob.name).download_as_bytes())
    first, last = manifest.objects[0].name.rsplit("/", 1)[1], manifest.objects[-1].name.rsplit("/", 1)[1]
    print(f"  member {manifest.member:03d}: {len(manifest.objects)} GRIB windows, {manifest.total_bytes / 1e6:.1f} MB: {first} ... {last}")
    print(f"              manifest gs://{bucket}/{blob.name}")
EOF

STATE="${STATE%%,*}"
echo
echo "run state: $STATE (airflow dags test took $(( $(date +%s) - started )) s)"
[ "$STATE" = "success" ] || { echo "the run did not succeed: see $DEMO/dags-test.log"; exit 1; }
