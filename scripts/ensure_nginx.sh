#!/usr/bin/env bash
# Install Debian's nginx (the binary only is used: tests/deploy/test_nginx.py runs it with the
# project's docker/nginx.conf in front of two local test servers), if missing. The package's
# own service is not needed: it is stopped if the install started it.
set -euo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then exit 0; fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nginx-light >/dev/null \
  || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nginx >/dev/null
if [ -f /run/nginx.pid ]; then $SUDO nginx -s stop 2>/dev/null || true; fi
