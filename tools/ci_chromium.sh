#!/usr/bin/env bash
# Debian's chromium for the tuner report's browser test (Playwright drives /usr/bin/chromium; its own
# browser download is never used). A no-op when chromium is already there.
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
/usr/bin/chromium --version
