#!/bin/bash
# Stands in for the worker environment's python with the local backend: answers create_host's
# environment check (-c ...) like a CPU-only torch would, and runs backends/fake_worker.sh for
# `-m aifs.worker ...` (FAKE_* variables come through the backend's env setting). Its anemoi-models is
# v1's unless FAKE_ANEMOI_MODELS says otherwise (create_host checks it against the run's generation).
if [ "$1" = -c ]; then
  echo "{\"python\": \"$0\", \"torch\": \"fake\", \"anemoi_models\": \"${FAKE_ANEMOI_MODELS:-0.6.0}\", \"cuda\": false, \"gpus\": 0}"
  exit 0
fi
exec "$(dirname "$0")/backends/fake_worker.sh" "$@"
