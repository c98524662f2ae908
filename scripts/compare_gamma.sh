#!/usr/bin/env bash
# The paper's compare_gamma (docs/reproducing.md; options: --help). Smoke run on generated data:
#   bash scripts/compare_gamma.sh --smoke --out /tmp/compare_gamma
exec "$(dirname "$0")/run_reproduce.sh" compare_gamma "$@"
