#!/usr/bin/env bash
# The paper's figures (docs/reproducing.md; options: --help). Smoke run on generated data:
#   bash scripts/figures.sh --smoke --out /tmp/figures
exec "$(dirname "$0")/run_reproduce.sh" figures "$@"
