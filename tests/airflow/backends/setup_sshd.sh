#!/usr/bin/env bash
# Start a throwaway, key-only OpenSSH server on 127.0.0.1 for the ssh-backend tests.
#
#   tests/airflow/backends/setup_sshd.sh            # CI (.ci/run, as root): installs openssh-server if missing
#   AIFS_SSHD_DIR=/tmp/x AIFS_SSHD_PORT=2299 ...    # elsewhere
#
# Idempotent: when the server from an earlier call still answers, it only re-checks it.
# It listens on loopback only, accepts one user (root when run as root, else the caller) and only
# the key it generates. Connection facts go to $AIFS_SSHD_DIR/conn.env, which the tests read.
# Stop it with: kill "$(cat "$AIFS_SSHD_DIR/sshd.pid")"
set -euo pipefail
D=${AIFS_SSHD_DIR:-${TMPDIR:-/tmp}/aifs-sshd}
PORT=${AIFS_SSHD_PORT:-2222}
U=${AIFS_SSHD_USER:-$(id -un)}
SSH_OPTS=(-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5)

check() {
  ssh -q "${SSH_OPTS[@]}" -i "$D/client_ed25519" -p "$PORT" "$U@127.0.0.1" 'echo ok' 2>/dev/null | grep -qx ok
}

mkdir -p "$D"; chmod 700 "$D"
if [ -f "$D/sshd.pid" ] && kill -0 "$(cat "$D/sshd.pid")" 2>/dev/null && [ -f "$D/conn.env" ] && check; then
  echo "sshd already running on 127.0.0.1:$PORT (pid $(cat "$D/sshd.pid"))"; exit 0
fi

if ! [ -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null || ! command -v flock >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server openssh-client util-linux >/dev/null
  else
    echo "openssh-server is not installed and I cannot install it (not root or no apt-get)" >&2; exit 1
  fi
fi
if [ "$(id -u)" = 0 ]; then mkdir -p /run/sshd && chmod 0755 /run/sshd; fi   # privilege-separation dir

[ -f "$D/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$D/host_ed25519"
[ -f "$D/client_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$D/client_ed25519"
cp "$D/client_ed25519.pub" "$D/authorized_keys"; chmod 600 "$D/authorized_keys"

cat > "$D/sshd_config" <<CFG
ListenAddress 127.0.0.1
Port $PORT
HostKey $D/host_ed25519
PidFile $D/sshd.pid
AuthorizedKeysFile $D/authorized_keys
AllowUsers $U
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# the keys live in a private temp dir, not in the user's home
StrictModes no
MaxSessions 50
MaxStartups 50
ClientAliveInterval 0
LogLevel VERBOSE
CFG

if [ -f "$D/sshd.pid" ]; then kill "$(cat "$D/sshd.pid")" 2>/dev/null || true; sleep 0.2; fi
/usr/sbin/sshd -t -f "$D/sshd_config"
/usr/sbin/sshd -f "$D/sshd_config" -E "$D/sshd.log"    # daemonizes
for _ in $(seq 40); do check && break; sleep 0.25; done
check || { echo "sshd did not accept the test key; see $D/sshd.log" >&2; tail -20 "$D/sshd.log" >&2; exit 1; }

cat > "$D/conn.env" <<ENV
AIFS_SSHD_HOST=127.0.0.1
AIFS_SSHD_PORT=$PORT
AIFS_SSHD_USER=$U
AIFS_SSHD_KEY=$D/client_ed25519
AIFS_SSHD_PID_FILE=$D/sshd.pid
ENV
echo "sshd ready on 127.0.0.1:$PORT for $U (key $D/client_ed25519)"
