#!/usr/bin/env bash
# The paper's table4 (docs/reproducing.md; options: --help). Smoke run on generated data:
#   bash scripts/table4.sh --smoke --out /tmp/table4
exec "$(dirname "$0")/run_reproduce.sh" table4 "$@"
