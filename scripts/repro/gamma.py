"""Tables 3-4 (supplement Tables 1-2), the γ comparison and Figure 3 (paper Sec. 4.2).

Each finetuned model is evaluated by test.py (``--out``) and timed; the full ResNet of
the same depth is the reference row. Columns: FLOPs (mean ± std), block usage (mean ±
std), accuracy, the paper's "speed-up" (the FLOP reduction 1 − FLOPs/full FLOPs), the
measured wall-clock speed-up of dynamic execution over the full ResNet, each beside the
paper's value.
"""
from __future__ import annotations

import hashlib
import os
import statistics
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Sequence

from models import get_spec
from scripts.repro.evaluation import EvalRequest, measure_speedup, run_test
from scripts.repro.released import Finetuned, gamma_text
from scripts.repro.plots import Point, flops_vs_accuracy
from models.flops import flop_table
from scripts.repro.paper import paper_row, paper_rows
from scripts.repro.report import Label, Metric, Table

COLUMNS = (
    Label("network", "network"),
    Label("gamma", "γ"),
    Metric("flops", "FLOPs/img", ".2E", std=True),
    Metric("usage", "blocks", ".2f", std=True),
    Metric("accuracy", "accuracy (%)", ".2f"),
    Metric("speedup", "speed-up, FLOPs (%)", ".1f"),
    Metric("measured_speedup", "speed-up, wall clock (%)", ".1f"),
    Metric("ms", "ms/img", ".3f", paper=False),
    Metric("unique", "unique policies", ".0f"),
)


@dataclass
class EvalSettings:
    """How models are evaluated and timed, and where the JSON and logs go."""

    data_dir: str
    device: str
    batch_size: int
    workers: int
    out: str
    force: bool = False
    time_batch: int = 1
    time_images: int = 256
    repeats: int = 5
    say: Callable[[str], None] = print


@dataclass
class Evaluated:
    """test.py's JSON (and the timing) of one model: a finetuned checkpoint or a full ResNet."""

    model: str
    gamma: float | None
    checkpoint: str | None
    result: dict[str, Any]
    timing: dict[str, float] | None = None
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _request(s: EvalSettings, model: str, load: str | None, base: str | None
             ) -> EvalRequest:
    return EvalRequest(model, load, base, s.data_dir, s.batch_size, s.device, s.workers)


def _tag(model: str, gamma: float | None, checkpoint: str | None = None) -> str:
    """A file name for an evaluation: model, γ and a short hash of the checkpoint path."""
    tag = model if gamma is None else f"{model}_gamma_{gamma_text(gamma)}"
    if checkpoint:
        tag += "_" + hashlib.sha1(os.path.abspath(checkpoint).encode()).hexdigest()[:8]
    return tag


def evaluate_finetuned(s: EvalSettings, item: Finetuned, base: str | None = None
                       ) -> Evaluated:
    """test.py's numbers and the measured speed-up of one finetuned checkpoint."""
    req = _request(s, item.model, item.checkpoint, base)
    tag = _tag(item.model, item.gamma, item.checkpoint)
    result = run_test(req, os.path.join(s.out, "evals", f"{tag}.json"),
                      os.path.join(s.out, "logs", f"test_{tag}.log"), s.force, s.say)
    s.say(f"[time] {tag}: full ResNet vs dynamic execution, batch {s.time_batch}")
    timing = measure_speedup(req, s.time_batch, s.time_images, s.repeats)
    return Evaluated(item.model, item.gamma, item.checkpoint, result, timing)


def evaluate_full(s: EvalSettings, model: str, base: str) -> Evaluated:
    """test.py without --load: the base ResNet with every block kept."""
    req = _request(s, model, None, base)
    result = run_test(req, os.path.join(s.out, "evals", f"{model}_full.json"),
                      os.path.join(s.out, "logs", f"test_{model}_full.log"), s.force, s.say)
    return Evaluated(model, None, base, result)


def depth(model: str) -> str:
    """``"110"`` for ``R110_C10``: the depth in the model's name."""
    return model.split("_")[0].lstrip("R")


def network_name(model: str) -> str:
    return f"ResNet-{depth(model)}"


def _ours(e: Evaluated) -> dict[str, Any]:
    r = e.result
    return {"flops": r["flops_mean"], "flops_std": r["flops_std"],
            "usage": r["block_usage_mean"], "usage_std": r["block_usage_std"],
            "accuracy": 100.0 * r["accuracy"],
            "speedup": 100.0 * (1.0 - r["flops_mean"] / r["full_flops"]),
            "measured_speedup": e.timing["speedup"] if e.timing else None,
            "ms": e.timing["ms_blockdrop"] if e.timing else None,
            "unique": r["unique_policies"]}


def _paper(table: str | None, model: str, gamma: float | None) -> dict[str, Any]:
    if table is None:
        return {}
    blocks = get_spec(model).num_blocks if gamma is None else None
    match = {"model": model, "gamma": None if gamma is None else gamma}
    if blocks is not None:
        match["blocks"] = blocks
    row = paper_row(table, **match) or {}
    out = {k: row.get(k) for k in ("flops", "flops_std", "usage", "usage_std", "accuracy",
                                   "speedup")}
    if gamma is not None:
        timed = paper_row("table2", model=model, method="blockdrop")
        out["measured_speedup"] = timed["speedup"] if timed else None
        printed = paper_row("readme_test_prints", model=model, gamma=gamma)
        out["unique"] = printed["unique_policies"] if printed else None
    return out


def full_row(model: str, full: Evaluated | None, timed: Sequence[Evaluated]
             ) -> dict[str, Any]:
    """Our full-ResNet values: analytic FLOPs, every block, test.py's accuracy."""
    k = get_spec(model).num_blocks
    ms = [e.timing["ms_full"] for e in timed if e.timing and e.model == model]
    return {"flops": flop_table(model).full_resnet, "flops_std": 0.0, "usage": float(k),
            "usage_std": 0.0, "accuracy": 100.0 * full.result["accuracy"] if full else None,
            "ms": statistics.median(ms) if ms else None}


def gamma_table(title: str, models: Sequence[str], evals: Sequence[Evaluated],
                fulls: dict[str, Evaluated | None], paper_table: str | None) -> Table:
    """Full ResNets first (with the paper's other full rows of the table), then BlockDrop
    per model and γ."""
    table = Table(title, COLUMNS)
    for model in models:
        table.add({"network": network_name(model), "gamma": "–"},
                  full_row(model, fulls.get(model), evals), _paper(paper_table, model, None))
        if paper_table:
            for row in paper_rows(paper_table, model=model, gamma=None):
                if row["blocks"] != get_spec(model).num_blocks:
                    table.add({"network": row["label"] + " (paper only)", "gamma": "–"}, {},
                              {k: row.get(k) for k in ("flops", "flops_std", "usage",
                                                       "usage_std", "accuracy")})
    for e in evals:
        table.add({"network": f"BlockDrop-{depth(e.model)} ({e.model})",
                   "gamma": gamma_text(e.gamma)}, _ours(e), _paper(paper_table, e.model, e.gamma))
    return table


def notes(s: EvalSettings, evals: Sequence[Evaluated], smoke: bool) -> list[str]:
    out = []
    if smoke:
        out.append("SMOKE RUN: generated data and one-epoch schedules; the numbers only show "
                   "that every step runs and are not comparable with the paper's.")
    if evals:
        r = evals[0].result
        out.append(f"Ours: test.py on {r['num_images']} images of {s.data_dir} (batch "
                   f"{r.get('batch_size')}, device {r.get('device')}). FLOPs include the policy "
                   f"network; blocks: mean ± sample std; FLOPs: mean ± population std.")
    out.append(f"Speed-up, FLOPs = 1 − FLOPs/full-ResNet FLOPs (the supplement's 'speed-up'). "
               f"Speed-up, wall clock = 1 − time/full-ResNet time, measured here on "
               f"{s.device} at batch {s.time_batch} over {s.time_images} test images with "
               f"dynamic execution (policy network included); ms/img is BlockDrop's (full rows: "
               f"the full ResNet's). The paper's wall-clock value is Table 2's (batch 1, NVIDIA "
               f"P6000), which does not name γ.")
    out.append("Δ = ours − paper, in the column's unit (accuracy and speed-ups in points).")
    return out


def figure3_points(models: Sequence[str], evals: Sequence[Evaluated],
                   fulls: dict[str, Evaluated | None], paper_table: str | None
                   ) -> list[Point]:
    """Ours (per γ), our full ResNets, and the paper's points from its table."""
    several = len(models) > 1
    points = []
    for e in evals:
        label = (f"{network_name(e.model)} " if several else "") + f"γ={gamma_text(e.gamma)}"
        points.append(Point(label, e.result["flops_mean"], 100 * e.result["accuracy"],
                            e.result["flops_std"], "ours"))
    for model, full in fulls.items():
        if full is not None:
            points.append(Point(network_name(model), flop_table(model).full_resnet,
                                100 * full.result["accuracy"], 0.0, "full"))
    for model in models:
        for row in paper_rows(paper_table, model=model) if paper_table else []:
            if row["gamma"] is None:
                points.append(Point(f"{row['label']} (paper)", row["flops"], row["accuracy"],
                                    0.0, "paper_full"))
            else:
                label = (f"{network_name(model)} " if several else "") + \
                    f"γ={gamma_text(row['gamma'])} (paper)"
                points.append(Point(label, row["flops"], row["accuracy"], row["flops_std"],
                                    "paper"))
    return points


def figure3(title: str, models, evals, fulls, paper_table):
    return flops_vs_accuracy(figure3_points(models, evals, fulls, paper_table), title)
