#!/usr/bin/env bash
# AIFS-ENS GPU host bootstrap: the `startup-script` of the VMs that the `gce` backend creates.
#
# Made for a boot image that already has the NVIDIA driver, Docker and the NVIDIA container
# toolkit (the default is a Deep Learning VM image, common-cu128-ubuntu-2204-nvidia-570). It:
#
#   1. reads the worker image from instance metadata (key below; the gce backend sets it),
#   2. logs Docker in to Artifact Registry with the VM service account's token
#      (from the metadata server: no gcloud, no key file),
#   3. pulls the image (with retries) under exactly the reference it was given, so that
#      `docker image inspect <ref>` succeeds later,
#   4. waits for the GPU (a Deep Learning VM may still be installing its driver on first boot)
#      and checks that the image's torch sees it through `docker run --gpus all`,
#   5. prepares the scratch disk: formats and mounts the block device named in metadata when
#      there is one (a local SSD, say), else uses a directory on the boot disk; gives it to the
#      worker image's non-root user and checks there is room,
#   6. writes READY_MARKER (what the gce backend waits for over SSH), or FAILED_MARKER with
#      the reason as soon as any step fails (the backend then fails at once, quoting it).
#
# It runs again on every boot; it clears both markers first, so a stale one never misleads.
# Output goes to the serial console and the journal: `sudo journalctl -u google-startup-scripts`.
set -Eeuo pipefail

# --- the host contract: plugins/aifs/hostcontract.py (tests/airflow check these agree) -------------
READY_MARKER=/var/lib/aifs/ready
FAILED_MARKER=/var/lib/aifs/failed
SCRATCH_DIR=/scratch
JOBS_DIR=/var/lib/aifs/jobs
METADATA_WORKER_IMAGE=aifs-worker-image
METADATA_SCRATCH_DEVICE=aifs-scratch-device
WORKER_UID=10001

# --- knobs; the defaults are for a real VM (tests move the paths under a temporary root) ----------
ROOT="${AIFS_HOST_ROOT:-}"
METADATA_URL="${AIFS_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1}"
GPU_WAIT_S="${AIFS_GPU_WAIT_S:-900}"
DOCKER_WAIT_S="${AIFS_DOCKER_WAIT_S:-300}"
DEVICE_WAIT_S="${AIFS_DEVICE_WAIT_S:-120}"
POLL_S="${AIFS_POLL_S:-5}"
PULL_ATTEMPTS="${AIFS_PULL_ATTEMPTS:-5}"
PULL_BACKOFF_S="${AIFS_PULL_BACKOFF_S:-15}"
MIN_SCRATCH_GB="${AIFS_MIN_SCRATCH_GB:-30}"

ready="${ROOT}${READY_MARKER}"
failed="${ROOT}${FAILED_MARKER}"
scratch="${ROOT}${SCRATCH_DIR}"
step="start"

log() {
  printf '%s aifs-startup [%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$step" "$*"
}

# Record why bootstrap failed (the first reason wins) and stop.
fail() {
  trap - ERR
  log "FAILED: $*"
  if [ ! -e "$failed" ]; then
    mkdir -p "$(dirname "$failed")"
    printf 'step %s: %s\n' "$step" "$*" >"${failed}.tmp"
    mv -f "${failed}.tmp" "$failed"
  fi
  exit 1
}
trap 'fail "command failed with status $? at line $LINENO: $BASH_COMMAND"' ERR

# metadata_get PATH VAR [optional]: the metadata server's answer for PATH into VAR.
# An absent optional entry (404) gives an empty value; anything else that is not 200 fails.
metadata_get() {
  local path="$1" var="$2" optional="${3:-}" body code
  body="$(mktemp)"
  code="$(curl -sS --retry 5 --retry-connrefused --max-time 20 -o "$body" -w '%{http_code}' \
    -H 'Metadata-Flavor: Google' "${METADATA_URL}/${path}")" || code="000"
  case "$code" in
    200) printf -v "$var" '%s' "$(cat "$body")" ;;
    404)
      printf -v "$var" '%s' ""
      [ "$optional" = optional ] || { rm -f "$body"; fail "instance metadata '${path##*/}' is not set"; }
      ;;
    *) rm -f "$body"; fail "the metadata server answered HTTP $code for $path" ;;
  esac
  rm -f "$body"
}

# --- 0. a clean slate --------------------------------------------------------------------------------
mkdir -p "$(dirname "$ready")" "$(dirname "$failed")"
rm -f "$ready" "$failed" "${ready}.tmp" "${failed}.tmp"
log "bootstrap starting"

# --- 1. what to run ----------------------------------------------------------------------------------
step="metadata"
image=""
device=""
metadata_get "instance/attributes/${METADATA_WORKER_IMAGE}" image
metadata_get "instance/attributes/${METADATA_SCRATCH_DEVICE}" device optional
[ -n "$image" ] || fail "instance metadata '${METADATA_WORKER_IMAGE}' is empty"
log "worker image: $image; scratch device: ${device:-none (boot disk)}"

# --- 2. Docker, logged in to the image's registry ----------------------------------------------------
step="docker"
deadline=$((SECONDS + DOCKER_WAIT_S))
until docker info >/dev/null 2>&1; do
  [ "$SECONDS" -lt "$deadline" ] || fail "the Docker daemon did not answer within ${DOCKER_WAIT_S}s"
  sleep "$POLL_S"
done
registry="${image%%/*}"
case "$registry" in
  *-docker.pkg.dev | gcr.io | *.gcr.io)
    token_json=""
    metadata_get "instance/service-accounts/default/token" token_json
    token="$(printf '%s' "$token_json" | sed -n 's/.*"access_token"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')"
    [ -n "$token" ] || fail "no access token for the VM's service account (does the VM have one, with the cloud-platform scope?)"
    printf '%s' "$token" | docker login --username oauth2accesstoken --password-stdin "https://${registry}" >/dev/null \
      || fail "docker login to ${registry} was refused: the VM's service account needs roles/artifactregistry.reader"
    log "logged in to ${registry} as the VM's service account"
    ;;
  *) log "${registry} is not Artifact Registry; pulling without logging in" ;;
esac

# --- 3. the worker image -----------------------------------------------------------------------------
step="pull"
pulled=""
for attempt in $(seq 1 "$PULL_ATTEMPTS"); do
  if docker pull --quiet "$image"; then
    pulled=yes
    break
  fi
  log "pull attempt ${attempt}/${PULL_ATTEMPTS} failed"
  if [ "$attempt" -lt "$PULL_ATTEMPTS" ]; then sleep $((PULL_BACKOFF_S * attempt)); fi
done
[ -n "$pulled" ] || fail "could not pull ${image} after ${PULL_ATTEMPTS} attempts (image name, registry permission, or no route to the registry: the VM has no public IP, so its subnet needs Private Google Access or Cloud NAT)"
image_id="$(docker image inspect --format '{{.Id}}' "$image")"
log "pulled ${image} (${image_id})"

# --- 4. the GPU, on the host and inside the image ----------------------------------------------------
step="gpu"
gpu=""
deadline=$((SECONDS + GPU_WAIT_S))
until gpu="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1)"; do
  [ "$SECONDS" -lt "$deadline" ] || fail "no GPU: nvidia-smi still failing after ${GPU_WAIT_S}s: $(printf '%s' "$gpu" | head -c 300)"
  log "waiting for the NVIDIA driver: $(printf '%s' "$gpu" | head -n 1)"
  sleep "$POLL_S"
done
log "GPU: $gpu"
probe='import sys, torch
ok = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if ok else "NO GPU VISIBLE")
sys.exit(0 if ok else 1)'
if ! seen="$(docker run --rm --gpus all --entrypoint python "$image" -c "$probe" 2>&1)"; then
  fail "the worker image does not see the GPU (NVIDIA container toolkit, or driver older than the image's CUDA): $(printf '%s' "$seen" | tail -n 3 | tr '\n' ' ')"
fi
log "inside the image: $seen"

# --- 5. scratch ------------------------------------------------------------------------------------
step="scratch"
mkdir -p "$scratch"
if [ -n "$device" ]; then
  deadline=$((SECONDS + DEVICE_WAIT_S))
  until [ -e "$device" ]; do
    [ "$SECONDS" -lt "$deadline" ] || fail "scratch device ${device} did not appear within ${DEVICE_WAIT_S}s"
    sleep "$POLL_S"
  done
  if mountpoint -q "$scratch"; then
    log "${scratch} is already mounted"
  else
    if ! blkid -p "$device" >/dev/null 2>&1; then
      log "formatting ${device} (no filesystem on it yet)"
      mkfs.ext4 -q -F -m 0 -E lazy_itable_init=0,lazy_journal_init=0,discard "$device"
    fi
    mount -o discard,defaults,nofail "$device" "$scratch"
    log "mounted ${device} on ${scratch}"
  fi
fi
install -d -m 0755 -o "$WORKER_UID" -g "$WORKER_UID" "$scratch" "$scratch/input_states" "$scratch/ensemble_outputs"
chown "$WORKER_UID:$WORKER_UID" "$scratch"
avail_kb="$(df -Pk "$scratch" | awk 'NR == 2 {print $4}')"
avail_gb=$((avail_kb / 1024 / 1024))
[ "$avail_gb" -ge "$MIN_SCRATCH_GB" ] \
  || fail "only ${avail_gb} GB free in ${SCRATCH_DIR}; a member needs ~${MIN_SCRATCH_GB} GB (use a larger boot disk or a scratch device)"
install -d -m 0755 "${ROOT}${JOBS_DIR}"

# --- 6. ready --------------------------------------------------------------------------------------
step="ready"
{
  printf 'image=%s\n' "$image"
  printf 'image_id=%s\n' "$image_id"
  printf 'gpu=%s\n' "$gpu"
  printf 'in_image=%s\n' "$seen"
  printf 'scratch=%s %s GB free (%s)\n' "$SCRATCH_DIR" "$avail_gb" "${device:-boot disk}"
  printf 'ready_at=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"${ready}.tmp"
mv -f "${ready}.tmp" "$ready"
log "host ready"
