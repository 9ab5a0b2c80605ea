#!/bin/bash
# Stands in for "python" in the backend tests: `fake_worker.sh -m aifs.worker --date D --members N ...`.
# Records each run in $FAKE_RUNS, prints FAKE_STEPS "step i" lines FAKE_SLEEP s apart, exits FAKE_EXIT.
# With $FAKE_TIMES set, the job records its own start and end there ("start|end EPOCH PID ARGS"),
# so tests check when jobs really ran on the host, not when Airflow or the session thought they did.
[ "$1 $2" = "-m aifs.worker" ] || { echo "fake worker: expected -m aifs.worker, got $*" >&2; exit 2; }
shift 2
echo "$$ $*" >> "${FAKE_RUNS:?}"
# FAKE_LONG_MEMBERS="1 2" with FAKE_LONG_ONCE=DIR: the first launch of those members runs long
# (FAKE_LONG_STEPS x FAKE_SLEEP), later launches (retries) run FAKE_STEPS
member=; prev=; for a in "$@"; do [ "$prev" = --members ] && member=$a; prev=$a; done
if [ -n "${FAKE_LONG_ONCE:-}" ] && [[ " ${FAKE_LONG_MEMBERS:-} " == *" $member "* ]] && mkdir "$FAKE_LONG_ONCE/m$member" 2>/dev/null; then
  FAKE_STEPS=${FAKE_LONG_STEPS:-600}
fi
if [ -n "${FAKE_TIMES:-}" ]; then
  echo "start $(date +%s.%N) $$ $*" >> "$FAKE_TIMES"
  trap 'echo "end $(date +%s.%N) $$ $*" >> "$FAKE_TIMES"' EXIT
  trap 'trap "" TERM; exit 143' TERM  # one TERM is enough: ignore the group-wide repeats
fi
echo "fake worker started: $*"
for i in $(seq "${FAKE_STEPS:-5}"); do
  echo "step $i"
  sleep "${FAKE_SLEEP:-0.2}" & wait $!
done
echo "fake worker done, exit ${FAKE_EXIT:-0}"
exit "${FAKE_EXIT:-0}"
