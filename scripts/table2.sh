#!/usr/bin/env bash
# The paper's table2 (docs/reproducing.md; options: --help). Smoke run on generated data:
#   bash scripts/table2.sh --smoke --out /tmp/table2
exec "$(dirname "$0")/run_reproduce.sh" table2 "$@"
