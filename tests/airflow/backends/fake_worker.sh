#!/bin/bash
# Stands in for "python" in the ssh-backend tests: `fake_worker.sh -m aifs.worker --date D --members N ...`.
# Records each run in $FAKE_RUNS, prints FAKE_STEPS "step i" lines FAKE_SLEEP s apart, exits FAKE_EXIT.
[ "$1 $2" = "-m aifs.worker" ] || { echo "fake worker: expected -m aifs.worker, got $*" >&2; exit 2; }
shift 2
echo "$$ $*" >> "${FAKE_RUNS:?}"
echo "fake worker started: $*"
for i in $(seq "${FAKE_STEPS:-5}"); do
  echo "step $i"
  sleep "${FAKE_SLEEP:-0.2}"
done
echo "fake worker done, exit ${FAKE_EXIT:-0}"
exit "${FAKE_EXIT:-0}"
