#!/usr/bin/env bash
# Install matryoshka and what it needs on Debian (run as root or with sudo available).
# torch is pinned through constraints.txt so pip never pulls a CUDA build here.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the browser of the web demo's tests (tests/test_web_browser.py), driven by Playwright.
need=()
for pkg in fonts-noto-color-emoji unicode-data chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install -q -c constraints.txt -e ".[test]"
