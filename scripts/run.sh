#!/usr/bin/env bash
# Install (if needed) and run the service on http://127.0.0.1:8000 (Swagger UI at /docs).
#   scripts/run.sh                   # real weights from ./weights (ZSI_WEIGHTS_DIR)
#   ZSI_DEMO=true scripts/run.sh     # tiny random-init models, every answer labelled demo
#   scripts/run.sh --host 0.0.0.0 --port 8080
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/anomaly-inspect serve "$@"
