#!/usr/bin/env bash
# The paper's table3 (docs/reproducing.md; options: --help). Smoke run on generated data:
#   bash scripts/table3.sh --smoke --out /tmp/table3
exec "$(dirname "$0")/run_reproduce.sh" table3 "$@"
