#!/bin/bash
# The live stack's worker python (tests/airflow/test_scheduler.py): the real worker environment
# ($AIFS_REAL_WORKER_PYTHON), except for forecast dates listed in $AIFS_FAKE_DATES_FILE, which run
# backends/fake_worker.sh (it records the job's own start and end in $FAKE_TIMES).
date=; prev=
for a in "$@"; do [ "$prev" = --date ] && date=$a; prev=$a; done
if [ -n "$date" ] && [ -f "${AIFS_FAKE_DATES_FILE:-}" ] && grep -qx "$date" "$AIFS_FAKE_DATES_FILE"; then
  exec "$(dirname "$0")/backends/fake_worker.sh" "$@"
fi
exec "${AIFS_REAL_WORKER_PYTHON:?}" "$@"
