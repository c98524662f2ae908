"""The paper's reported numbers, read from ``configs/paper_results.yaml`` (paper Tables 1-4,
supplement Tables 1-2, Figure 3's text).

The reproduction tables put these values beside ours. Rows are plain dicts with the
file's keys (``model``, ``method``, ``gamma``, ``accuracy``, ...); look them up by field.
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_RESULTS = os.path.join(ROOT, "configs", "paper_results.yaml")


class PaperResultsError(UserError, ValueError):
    """The paper-results file is missing or lacks an expected table."""


def load_paper_results(path: str = PAPER_RESULTS) -> dict[str, Any]:
    """Every table of the paper-results file, as read from YAML."""
    if not os.path.isfile(path):
        raise PaperResultsError(f"paper results not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise PaperResultsError(f"{path} must hold a mapping of table names to tables")
    return data


def paper_rows(table: str, results: dict[str, Any] | None = None,
               **match: Any) -> list[dict[str, Any]]:
    """The rows of ``table`` whose fields equal every ``match`` value (all rows without one)."""
    results = load_paper_results() if results is None else results
    if table not in results:
        raise PaperResultsError(f"no table {table!r} in the paper results; "
                                f"tables: {', '.join(sorted(results))}")
    body = results[table]
    rows = body["rows"] if isinstance(body, dict) else body
    return [dict(r) for r in rows if all(r.get(k) == v for k, v in match.items())]


def paper_row(table: str, results: dict[str, Any] | None = None,
              **match: Any) -> dict[str, Any] | None:
    """The one row of ``table`` matching ``match``, or None when the paper has none."""
    rows = paper_rows(table, results, **match)
    if len(rows) > 1:
        raise PaperResultsError(f"{len(rows)} rows of {table} match {match}; expected one")
    return rows[0] if rows else None


def table_meta(table: str, results: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields of ``table`` other than its rows (caption, device, batch size...)."""
    results = load_paper_results() if results is None else results
    body = results.get(table, {})
    return {k: v for k, v in body.items() if k != "rows"} if isinstance(body, dict) else {}
