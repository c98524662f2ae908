#!/usr/bin/env bash
# The paper's table1 (docs/reproducing.md; options: --help). Smoke run on generated data:
#   bash scripts/table1.sh --smoke --out /tmp/table1
exec "$(dirname "$0")/run_reproduce.sh" table1 "$@"
