"""Result tables with the paper's values beside ours (paper Tables 1-4, supplement Tables 1-2).

A :class:`Table` has label columns (text) and metric columns. Each metric of a row holds
our value and the paper's, each with an optional standard deviation; the Markdown view
shows ``ours | paper | Δ`` for every metric that has a paper value, the CSV view keeps
the raw numbers (``<key>``, ``<key>_std``, ``paper_<key>``, ``paper_<key>_std``,
``diff_<key>``).
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Sequence

MISSING = "–"


@dataclass(frozen=True)
class Label:
    """A text column: ``key`` in each row's labels."""

    key: str
    header: str


@dataclass(frozen=True)
class Metric:
    """A number column. ``fmt`` is a format spec such as ``.2E`` or ``.1f``; ``std``
    shows ``mean ± std``; ``paper`` adds the paper's value and the difference."""

    key: str
    header: str
    fmt: str
    std: bool = False
    paper: bool = True


@dataclass
class Row:
    labels: dict[str, str]
    ours: dict[str, float | None] = field(default_factory=dict)  # key, key_std
    paper: dict[str, float | None] = field(default_factory=dict)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def format_value(value: float | None, fmt: str, std: float | None = None) -> str:
    """``value`` in ``fmt`` (``–`` when absent), with ``± std`` when a std is given."""
    value = _number(value)
    if value is None:
        return MISSING
    text = format(value, fmt)
    std = _number(std)
    return text if std is None else f"{text} ± {format(std, fmt)}"


def difference(ours: float | None, paper: float | None) -> float | None:
    ours, paper = _number(ours), _number(paper)
    return None if ours is None or paper is None else ours - paper


@dataclass
class Table:
    """A result table; ``notes`` are printed under the Markdown table."""

    title: str
    columns: Sequence[Any]  # Label and Metric
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, labels: dict[str, str], ours: dict[str, Any],
            paper: dict[str, Any] | None = None) -> Row:
        row = Row(dict(labels), {k: _number(v) for k, v in ours.items()},
                  {k: _number(v) for k, v in (paper or {}).items()})
        self.rows.append(row)
        return row

    def _metrics(self) -> list[Metric]:
        return [c for c in self.columns if isinstance(c, Metric)]

    def _compared(self, metric: Metric) -> bool:
        return metric.paper and any(r.paper.get(metric.key) is not None for r in self.rows)

    def headers(self) -> list[str]:
        out = []
        for col in self.columns:
            if isinstance(col, Label):
                out.append(col.header)
            elif self._compared(col):
                out += [f"{col.header} (ours)", f"{col.header} (paper)", "Δ"]
            else:
                out.append(col.header)
        return out

    def _cells(self, row: Row) -> list[str]:
        out = []
        for col in self.columns:
            if isinstance(col, Label):
                out.append(str(row.labels.get(col.key, MISSING)))
                continue
            std_key = col.key + "_std" if col.std else None
            out.append(format_value(row.ours.get(col.key), col.fmt,
                                    row.ours.get(std_key) if std_key else None))
            if self._compared(col):
                out.append(format_value(row.paper.get(col.key), col.fmt,
                                        row.paper.get(std_key) if std_key else None))
                out.append(format_value(difference(row.ours.get(col.key),
                                                   row.paper.get(col.key)), "+" + col.fmt))
        return out

    def markdown(self) -> str:
        """The table in GitHub Markdown, numbers right-aligned, notes below."""
        heads = self.headers()
        align = ["---" if i < self._label_count() else "---:" for i in range(len(heads))]
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(self._cells(r)) + " |" for r in self.rows]
        text = "\n".join(lines)
        if self.notes:
            text += "\n\n" + "\n".join(f"- {n}" for n in self.notes)
        return text

    def _label_count(self) -> int:
        return sum(isinstance(c, Label) for c in self.columns)

    def csv_header(self) -> list[str]:
        out = [c.key for c in self.columns if isinstance(c, Label)]
        for m in self._metrics():
            keys = [m.key] + ([m.key + "_std"] if m.std else [])
            out += keys
            if m.paper:
                out += ["paper_" + k for k in keys] + ["diff_" + m.key]
        return out

    def csv_records(self) -> list[dict[str, Any]]:
        records = []
        for row in self.rows:
            rec: dict[str, Any] = {c.key: row.labels.get(c.key, "")
                                   for c in self.columns if isinstance(c, Label)}
            for m in self._metrics():
                keys = [m.key] + ([m.key + "_std"] if m.std else [])
                rec.update({k: row.ours.get(k) for k in keys})
                if m.paper:
                    rec.update({"paper_" + k: row.paper.get(k) for k in keys})
                    rec["diff_" + m.key] = difference(row.ours.get(m.key), row.paper.get(m.key))
            records.append({k: ("" if v is None else v) for k, v in rec.items()})
        return records


def write_table(table: Table, out_dir: str, name: str, preamble: Sequence[str] = ()
                ) -> tuple[str, str]:
    """Write ``<out_dir>/<name>.md`` (title, ``preamble`` lines, table) and ``<name>.csv``."""
    os.makedirs(out_dir, exist_ok=True)
    md_path, csv_path = (os.path.join(out_dir, f"{name}.{ext}") for ext in ("md", "csv"))
    parts = [f"# {table.title}", *preamble, table.markdown()]
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(p for p in parts if p) + "\n")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=table.csv_header())
        writer.writeheader()
        writer.writerows(table.csv_records())
    return md_path, csv_path
