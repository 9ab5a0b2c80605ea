#!/usr/bin/env bash
# The demo's last stage: the tiny model's forecasts (include/demo.sh) become AI Weather Quest
# products, pictures and a report, through `airflow dags test aifs_ens_products`.
#
#   1. the GCS emulator of the demo (reused when it still answers, else restarted on .demo/gcs);
#   2. a 20-year climatology generated for the tiny model's grid (no ECMWF account here);
#   3. `airflow dags test aifs_ens_products` for the demo's date and bucket: the real DAG, the real
#      `python -m aifs.products` as a CPU step on the local backend; no submission unless
#      DEMO_SUBMIT=true (the 1 June 2025 demo date is no competition date anyway: a Sunday);
#   4. the run summary, and the report: its gs:// address and a local copy to open in a browser.
#
# Same environment as include/demo.sh (AIFS_WORKER_PYTHON, AIRFLOW_PYTHON; DEMO_DATE, DEMO_MEMBERS,
# DEMO_PORT), run after it: the forecasts must reach day 32 (DEMO_LEAD_TIME 792, its default).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEMO="${DEMO_DIR:-$REPO/.demo}"
# settings, the deployment's variables and helpers shared with include/demo.sh
# shellcheck source=include/demo_lib.sh
source "$REPO/include/demo_lib.sh"

[ -d "$DEMO/gcs" ] || { echo "no demo bucket in $DEMO/gcs: run include/demo.sh (make demo) first"; exit 1; }

# The deployment beyond demo_lib.sh's: the products' settings (an admin's, never a trigger's).
export AIFS_ENS_CLIMATOLOGY="$DEMO/climatology"   # a directory of the competition-format files
export AIFS_ENS_AIWQ_TEAM="${DEMO_TEAM:-demoteam}" AIFS_ENS_AIWQ_MODEL="${DEMO_MODEL:-tinyaifs}"
export AIFS_ENS_SUBMIT="${DEMO_SUBMIT:-false}"

EMULATOR_PID=""
cleanup() {
  [ -z "$EMULATOR_PID" ] || { kill "$EMULATOR_PID" 2>/dev/null || true; wait "$EMULATOR_PID" 2>/dev/null || true; }
}
trap cleanup EXIT
if answers; then
  say "using the demo's GCS emulator on $STORAGE_EMULATOR_HOST"
else
  say "restarting the demo's GCS emulator on $STORAGE_EMULATOR_HOST (objects in $DEMO/gcs)"
  start_emulator "$DEMO/emulator-products.log"
fi

say "generating a 20-year climatology for the tiny model's grid ($AIFS_ENS_CLIMATOLOGY)"
"$AIFS_WORKER_PYTHON" -m aifs.testing climatology --date "$DATE" --out "$AIFS_ENS_CLIMATOLOGY" >/dev/null
[ "$AIFS_ENS_SUBMIT" != "true" ] || echo "DEMO_SUBMIT=true: the package's submission needs ECMWF's ECBOX SDK (not on PyPI); without it make_products fails with exit 33 after writing the products"

[ -f "$DEMO/airflow/airflow.db" ] || "$AIRFLOW_BIN" db migrate >"$DEMO/airflow-db.log" 2>&1 || { tail -50 "$DEMO/airflow-db.log"; exit 1; }

CONF="{\"date\": \"$DATE\", \"bucket\": \"$BUCKET\", \"members\": \"$MEMBERS\"}"
say "airflow dags test aifs_ens_products $LOGICAL_DATE --conf '$CONF'  (full log: $DEMO/dags-test-products.log)"
started=$(date +%s)
run_dag aifs_ens_products "$CONF" "$DEMO/dags-test-products.log"
STATE="$DAG_STATE"
task_lines "\[PRODUCTS\]|DAG TEST\] (starting|end) task" "$DEMO/dags-test-products.log" | tail -40

say "products summary (logged by check_products)"
sed -n '/AIFS-ENS products for/,/open in a browser: /p' "$DEMO/dags-test-products.log" \
  | sed -E 's/^.*(AIFS-ENS products for)/\1/; s/ \[[A-Za-z0-9_.]+\] loc=.*$//'

# a local copy of the products folder: the report links its pictures by relative names
LOCAL="$DEMO/products/$DATE"
"$AIRFLOW_PYTHON" - "$BUCKET" "$DATE" "$LOCAL" <<'EOF' || true
import pathlib, sys
from aifs import layout
from aifs.orchestration.storage import storage_client
bucket, date, local = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
client = storage_client()
prefix = layout.products_prefix(date)
names = [b.name for b in client.list_blobs(bucket, prefix=prefix)]
for name in names:
    target = local / name[len(prefix):]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(client.bucket(bucket).blob(name).download_as_bytes())  # by name: the on-disk emulator
print(f"  {len(names)} products in gs://{bucket}/{prefix} (copied to {local})")
EOF

echo
echo "products run state: $STATE (airflow dags test took $(( $(date +%s) - started )) s)"
if [ -f "$LOCAL/report.html" ]; then
  echo "report: gs://$BUCKET/$DATE/products/report.html"
  echo "        file://$LOCAL/report.html   (open it in a browser)"
fi
[ "$STATE" = "success" ] || { echo "the products run did not succeed: see $DEMO/dags-test-products.log"; exit 1; }
