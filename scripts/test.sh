#!/usr/bin/env bash
# Install (if needed), make sure Redis and PostgreSQL run, and run the whole test suite.
#   scripts/test.sh            # everything, slow tests included (as CI)
#   scripts/test.sh -m "not slow"   # extra pytest arguments are passed through
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
scripts/ensure_redis.sh
scripts/ensure_postgres.sh || echo "postgres unavailable: the PostgreSQL tests will be skipped (they fail under CI=1)"
[ "${ZSI_SKIP_BROWSER_SETUP:-0}" = "1" ] || scripts/ensure_chromium.sh || echo "chromium unavailable: the browser test will be skipped"
scripts/ensure_nginx.sh || echo "nginx unavailable: the live load-balancer test will be skipped"
exec .venv/bin/python -m pytest "$@"
