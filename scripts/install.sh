#!/usr/bin/env bash
# Install zeroshot-inspect and its dependencies into ./.venv (idempotent).
#   PYTHON=python3.11 scripts/install.sh
#   ZSI_FORCE_INSTALL=1 scripts/install.sh    # reinstall even when nothing changed
# A finished install leaves a stamp (hash of pyproject.toml and this script) in .venv;
# while it matches and the packages are installed, the script returns at once (no pip run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.zsi-install-stamp
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ "${ZSI_FORCE_INSTALL:-0}" != "1" ] && [ -x .venv/bin/python ] && [ -f "$STAMP" ] \
    && [ "$(cat "$STAMP")" = "$want" ] \
    && .venv/bin/python -c "import importlib.metadata as m; [m.version(p) for p in ('torch', 'open_clip_torch', 'fastapi', 'zeroshot-inspect')]" 2>/dev/null; then
  echo "install: up to date (pyproject.toml unchanged since the last install; ZSI_FORCE_INSTALL=1 reinstalls)"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip setuptools wheel
# torch first, pinned: these wheels are the ones this project is tested with.
if ! python -c "import torch, torchvision, sys; sys.exit(0 if torch.__version__.startswith('2.14.1') else 1)" 2>/dev/null; then
  python -m pip install torch==2.14.1 torchvision==0.29.1
fi
python -m pip install --quiet -e ".[dev,onnx]"
# SAA+ extra: groundingdino-py builds against the installed torch, so no build isolation.
python -m pip install --quiet --no-build-isolation -e ".[saa]"
python -c "import torch, open_clip, fastapi; print(f'installed: torch {torch.__version__}, open_clip {open_clip.__version__}')"
echo "$want" > "$STAMP"
