#!/usr/bin/env bash
# Second half of the README's install command (after `pip install -r requirements.txt`):
# Debian's Chromium for the Space's browser test (tests/test_space.py drives it headless
# through Playwright; no browser download from elsewhere). Safe to re-run.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium
else
  echo "warning: no apt-get here; install Chromium yourself (or set MERGEBOT_CHROMIUM) for the browser test" >&2
fi
