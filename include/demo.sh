#!/usr/bin/env bash
# `make demo`: the whole pipeline on this machine, from nothing, with no cloud account.
#
#   1. a GCS emulator on loopback (objects kept in .demo/gcs so you can look at them afterwards);
#   2. a tiny stand-in for AIFS-ENS (O48 grid), and a local ECMWF open-data mirror serving the fields
#      it needs for the date (dated folders, .index files, byte ranges: what ecmwf-opendata reads);
#   3. `airflow dags test aifs_ens_inputs`: waits for the mirror's index files, builds every member's
#      input state with `python -m aifs.inputs` (a CPU step of the local backend), verifies them and
#      emits the aifs_ens_inputs asset;
#   4. `airflow dags test aifs_ens_forecast` for the date the inputs run's asset event names, with the
#      local backend (set as the deployment's, by AIFS_ENS_* variables; the run's conf holds only a
#      forecaster's params): the real DAG, the real worker (python -m aifs.worker in its own
#      environment), one member after another;
#   5. where the inputs and the forecasts are, and the run summary;
#   6. include/demo_products.sh: `airflow dags test aifs_ens_products` for that date (AI Weather Quest
#      probabilities, maps, plumes, report.html), on the same emulator and database; then where each stage's
#      output is.
#
# Needs AIFS_WORKER_PYTHON (worker environment) and AIRFLOW_PYTHON (Airflow environment); the
# Makefile sets both after building them. Settings: DEMO_LEAD_TIME (hours, default 792 like the
# DAG), DEMO_MEMBERS (default 1-3), DEMO_DATE (default 20250601_0000), DEMO_PORT (default 9023), DEMO_MIRROR_PORT
# (default 9024).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${AIFS_WORKER_PYTHON:?set AIFS_WORKER_PYTHON to the worker environment python (make demo does)}"
: "${AIRFLOW_PYTHON:?set AIRFLOW_PYTHON to the Airflow environment python (make demo does)}"
DEMO="$REPO/.demo"
LEAD_TIME="${DEMO_LEAD_TIME:-792}"
MEMBERS="${DEMO_MEMBERS:-1-3}"
DATE="${DEMO_DATE:-20250601_0000}"
PORT="${DEMO_PORT:-9023}"
MIRROR_PORT="${DEMO_MIRROR_PORT:-9024}"
BUCKET="aifs-demo"
LOGICAL_DATE="${DATE:0:4}-${DATE:4:2}-${DATE:6:2}T${DATE:9:2}:${DATE:11:2}:00+00:00"
AIRFLOW_BIN="$(dirname "$AIRFLOW_PYTHON")/airflow"

say() { printf '\n==> %s\n' "$*"; }

demo_started=$(date +%s)
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
# where aifs_ens_inputs reads open data: the local mirror started below (in production: google, aws, ...)
export AIFS_ENS_OPENDATA_SOURCE="http://127.0.0.1:$MIRROR_PORT"
# a failed try is retried after seconds, not the production's 2 minutes (doubling): a demo that fails says so soon
export AIFS_ENS_RETRY_DELAY_S="${DEMO_RETRY_DELAY_S:-5}"

say "starting the GCS emulator on $STORAGE_EMULATOR_HOST"
answers() { "$AIFS_WORKER_PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/storage/v1/b?project=demo', timeout=1)" "$STORAGE_EMULATOR_HOST" 2>/dev/null; }
if answers; then echo "something already answers on port $PORT: stop it or set DEMO_PORT"; exit 1; fi
# The emulator program itself (not a wrapper), so that the trap's kill really stops it.
"$(dirname "$AIFS_WORKER_PYTHON")/gcp-storage-emulator" -d "$DEMO/gcs" start --host=127.0.0.1 --port="$PORT" --quiet \
  >"$DEMO/emulator.log" 2>&1 &
EMULATOR_PID=$!
MIRROR_PID=""
trap 'kill $EMULATOR_PID $MIRROR_PID 2>/dev/null || true; wait $EMULATOR_PID $MIRROR_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  answers && break
  kill -0 $EMULATOR_PID 2>/dev/null || { cat "$DEMO/emulator.log"; exit 1; }
  sleep 0.3
done

# the deployment's bucket exists before any run, as in production (aifs.inputs writes into it, never creates it)
"$AIRFLOW_PYTHON" -c "import sys; from aifs.orchestration.storage import storage_client; c = storage_client(); c.lookup_bucket(sys.argv[1]) or c.create_bucket(sys.argv[1])" "$BUCKET"

say "building the tiny AIFS-ENS stand-in and serving open data for members $MEMBERS of $DATE on $AIFS_ENS_OPENDATA_SOURCE"
"$AIFS_WORKER_PYTHON" -m aifs.testing checkpoint --grid O48 --out "$DEMO/tiny-o48.ckpt" >/dev/null
"$AIFS_WORKER_PYTHON" -m aifs.testing opendata-mirror --root "$DEMO/opendata" --date "$DATE" \
  --checkpoint "$DEMO/tiny-o48.ckpt" --members "$MEMBERS" --serve --port "$MIRROR_PORT" >"$DEMO/mirror.log" 2>&1 &
MIRROR_PID=$!

# while the mirror writes its files
say "creating Airflow's database in $AIRFLOW_HOME"
"$AIRFLOW_BIN" db migrate >"$DEMO/airflow-db.log" 2>&1 || { tail -50 "$DEMO/airflow-db.log"; exit 1; }

mirror_answers() { "$AIFS_WORKER_PYTHON" -c "import sys; from aifs.inputs.published import opendata_published; sys.exit(0 if opendata_published(sys.argv[1], sys.argv[2]) else 1)" "$AIFS_ENS_OPENDATA_SOURCE" "$DATE" 2>/dev/null; }
for _ in $(seq 200); do
  mirror_answers && break
  kill -0 $MIRROR_PID 2>/dev/null || { cat "$DEMO/mirror.log"; exit 1; }
  sleep 0.3
done
mirror_answers || { echo "the open-data mirror did not publish $DATE: see $DEMO/mirror.log"; exit 1; }

INPUTS_CONF="{\"members\": \"$MEMBERS\", \"bucket\": \"$BUCKET\", \"checkpoint\": \"$DEMO/tiny-o48.ckpt\", \"publish_wait_minutes\": 2, \"publish_poke_seconds\": 2}"
say "airflow dags test aifs_ens_inputs $LOGICAL_DATE  (open data -> input states; full log: $DEMO/inputs-test.log)"
inputs_started=$(date +%s)
set +e
"$AIRFLOW_BIN" dags test aifs_ens_inputs "$LOGICAL_DATE" --conf "$INPUTS_CONF" >"$DEMO/inputs-test.log" 2>&1
set -e
INPUTS_STATE=$("$AIRFLOW_BIN" dags state aifs_ens_inputs "$LOGICAL_DATE" 2>/dev/null | tail -1)
INPUTS_STATE="${INPUTS_STATE%%,*}"
grep -E "DAG TEST\] (starting|end) task" "$DEMO/inputs-test.log" \
  | sed -E 's/^[^ ]+ \[[a-z ]+\] //; s/ \[[A-Za-z0-9_.]+\] loc=.*$//' || true
echo "inputs run state: $INPUTS_STATE (airflow dags test took $(( $(date +%s) - inputs_started )) s)"
[ "$INPUTS_STATE" = "success" ] || { echo "the inputs run did not succeed: see $DEMO/inputs-test.log"; exit 1; }

# The forecast runs for the date the inputs run's asset event names (as AIFS_ENS_FORECAST_TRIGGER=inputs does).
FORECAST_DATE=$("$AIRFLOW_PYTHON" - <<'EOF'
from sqlalchemy import select
from airflow.models.asset import AssetEvent
from airflow.utils.session import create_session
with create_session() as session:
    event = session.scalars(select(AssetEvent).where(AssetEvent.source_dag_id == "aifs_ens_inputs").order_by(AssetEvent.id.desc())).first()
    print(event.extra["date"])
EOF
)
say "inputs of $FORECAST_DATE in gs://$BUCKET/$FORECAST_DATE/input/ (asset aifs_ens_inputs)"
"$AIRFLOW_PYTHON" - "$BUCKET" "$FORECAST_DATE" <<'EOF'
import sys
from aifs.orchestration.storage import storage_client
bucket, date = sys.argv[1:]
for blob in storage_client().list_blobs(bucket, prefix=f"{date}/input"):
    print(f"  gs://{bucket}/{blob.name}  {blob.size / 1e6:.2f} MB")
EOF

CONF=$(cat <<EOF
{"date": "$FORECAST_DATE", "members": "$MEMBERS", "bucket": "$BUCKET", "checkpoint": "$DEMO/tiny-o48.ckpt", "lead_time": $LEAD_TIME,
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

say "forecasts in gs://$BUCKET/$FORECAST_DATE/forecasts/ (the emulator keeps them on disk in $DEMO/gcs/.cloudstorage/$BUCKET/)"
"$AIRFLOW_PYTHON" - "$BUCKET" "$FORECAST_DATE" <<'EOF'
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

# The products stage: aifs_ens_products for the forecasts' date, on this demo's emulator and Airflow database
# (the forecasts asset event would start it under a scheduler; `dags test` runs it by hand).
DEMO_DATE="$FORECAST_DATE" DEMO_MEMBERS="$MEMBERS" DEMO_PORT="$PORT" DEMO_DIR="$DEMO" bash "$REPO/include/demo_products.sh"

say "the whole loop in $(( $(date +%s) - demo_started )) s"
echo "  open data:  $AIFS_ENS_OPENDATA_SOURCE (files in $DEMO/opendata)"
echo "  inputs:     gs://$BUCKET/$FORECAST_DATE/input/ and input_manifests/"
echo "  forecasts:  gs://$BUCKET/$FORECAST_DATE/forecasts/ and manifests/ (on disk: $DEMO/gcs/.cloudstorage/$BUCKET/)"
echo "  products:   gs://$BUCKET/$FORECAST_DATE/products/"
echo "  report:     file://$DEMO/products/$FORECAST_DATE/report.html"
