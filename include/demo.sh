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
DEMO="$REPO/.demo"
# settings, the deployment's variables and helpers shared with include/demo_products.sh
# shellcheck source=include/demo_lib.sh
source "$REPO/include/demo_lib.sh"
LEAD_TIME="${DEMO_LEAD_TIME:-792}"
MIRROR_PORT="${DEMO_MIRROR_PORT:-9024}"

demo_started=$(date +%s)
# A fresh start every time: Airflow home, bucket contents and scratch (the checkpoint is rebuilt too,
# it takes seconds).
rm -rf "$DEMO"
mkdir -p "$DEMO/gcs" "$DEMO/scratch"

# The deployment beyond demo_lib.sh's. Where aifs_ens_inputs reads open data: the local mirror
# started below (in production: google, aws, ...)
export AIFS_ENS_OPENDATA_SOURCE="http://127.0.0.1:$MIRROR_PORT"
# a failed try is retried after seconds, not the production's 2 minutes (doubling): a demo that fails says so soon
export AIFS_ENS_RETRY_DELAY_S="${DEMO_RETRY_DELAY_S:-5}"

say "starting the GCS emulator on $STORAGE_EMULATOR_HOST"
if answers; then echo "something already answers on port $PORT: stop it or set DEMO_PORT"; exit 1; fi
EMULATOR_PID=""
MIRROR_PID=""
trap 'kill $EMULATOR_PID $MIRROR_PID 2>/dev/null || true; wait $EMULATOR_PID $MIRROR_PID 2>/dev/null || true' EXIT
start_emulator "$DEMO/emulator.log"

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
run_dag aifs_ens_inputs "$INPUTS_CONF" "$DEMO/inputs-test.log"
INPUTS_STATE="$DAG_STATE"
task_lines "DAG TEST\] (starting|end) task" "$DEMO/inputs-test.log"
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
run_dag aifs_ens_forecast "$CONF" "$DEMO/dags-test.log"
STATE="$DAG_STATE"
task_lines "\[(START|MEMBER|WINDOW|MANIFEST|CLEANUP)\]|DAG TEST\] (starting|end) task" "$DEMO/dags-test.log"

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
