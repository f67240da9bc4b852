#!/usr/bin/env bash
# Install Debian's Chromium for the monitor's browser test (tests/test_web.py), where this machine allows:
# as root with apt. Anywhere else that test skips, saying why; nothing else needs a browser.
set -u
command -v chromium >/dev/null && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "BROWSER UNAVAILABLE: not root with apt-get; the monitor's browser test will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "BROWSER UNAVAILABLE: apt-get install chromium failed; the monitor's browser test will skip" >&2
exit 0
