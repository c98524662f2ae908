#!/usr/bin/env bash
# Shared by scripts/table*.sh, figures.sh and compare_gamma.sh: run
# python -m scripts.reproduce <name> "$@" with this repository on the path. Paths given
# as options stay relative to the current folder, as in the authors' scripts.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m scripts.reproduce "$@"
