#!/usr/bin/env bash
# Headless Chromium for the products report test (tests/airflow/test_products_report.py), which opens
# report.html as a person would and checks that every picture loads.
#
#   bash tests/airflow/setup_chromium.sh     # CI (.ci/run, as root): installs Debian's chromium if missing
#
# Idempotent: with a chromium already on PATH (or $AIFS_CHROMIUM) it only prints its version.
set -euo pipefail

existing=${AIFS_CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
if [ -n "$existing" ] && [ -x "$existing" ]; then
  "$existing" --version 2>/dev/null || true
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq
  # fonts so that the page's text renders (no boxes); chromium pulls its own libraries
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  chromium --version
else
  echo "chromium is not installed and I cannot install it (not root or no apt-get): apt-get install chromium" >&2
  exit 1
fi
