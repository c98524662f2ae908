#!/usr/bin/env bash
# Every method on one backbone: accuracy against FLOPs and measured time, the Pareto frontier
# (docs/reproducing.md; options: --help). Smoke run on generated data:
#   bash scripts/pareto.sh --smoke --out /tmp/pareto
exec "$(dirname "$0")/run_reproduce.sh" pareto "$@"
