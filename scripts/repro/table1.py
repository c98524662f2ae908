"""Table 1: BlockDrop against fixed heuristics at the same block budget, before and after
joint finetuning (paper Sec. 4.1).

K = BlockDrop's mean block usage rounded up (``policies.fixed.ceil_usage``). Before
finetuning, BlockDrop is the curriculum-learning policy on the pretrained ResNet and the
heuristics keep K blocks of that ResNet; after, BlockDrop is the finetuned model and each
heuristic's ResNet is finetuned under its own fixed policy (``finetune.py --policy NAME
--k K``). RandomK is averaged over ``--seeds``. Every number comes from ``test.py --out``.
"""
from __future__ import annotations

import argparse
import os
import statistics
from typing import Any
from collections.abc import Sequence

from policies.fixed import ceil_usage
from policies.registry import get_method
from scripts.repro import pipeline
from scripts.repro.context import ReproContext, model_list, preamble, prepare
from scripts.repro.evaluation import EvalRequest, run_test
from scripts.repro.released import (NotFoundError, base_checkpoint, curriculum_checkpoint,
                                    find_finetuned, gamma_text)
from scripts.repro.plots import ours_vs_paper_bars, save
from scripts.repro.paper import paper_row
from scripts.repro.report import Label, Metric, Table, write_table

MODELS = {"c10": ("R32_C10", "R110_C10"), "c100": ("R32_C100", "R110_C100")}
FIXED = ("firstk", "randomk", "distributek")
METHOD_NAMES = {"firstk": "FirstK", "randomk": "RandomK", "distributek": "DistributeK",
                "blockdrop": "BlockDrop", "full": "Full ResNet"}
COLUMNS = (Label("model", "model"), Label("method", "method"),
           Metric("acc", "accuracy (%)", ".1f", std=True), Metric("k", "K", ".1f"),
           Metric("acc_ft", "accuracy, ft (%)", ".1f", std=True), Metric("k_ft", "K, ft", ".1f"))


def table1_gamma(model: str, flag: float | None) -> float:
    """``--gamma``, else the γ of the Table 3 model whose usage Table 1 reports after
    finetuning (R32: 5, R110: 10), else 5."""
    if flag is not None:
        return flag
    row = paper_row("table1", model=model, method="blockdrop")
    match = paper_row("table3", model=model, usage=row["k_ft"]) if row else None
    return float(match["gamma"]) if match else 5.0


class Evaluator:
    """test.py --out calls of one model, each kept as ``<out>/evals/<tag>.json``."""

    def __init__(self, ctx: ReproContext, model: str, base: str):
        self.ctx, self.model, self.base = ctx, model, base

    def __call__(self, tag: str, load: str | None = None, **policy: Any) -> dict[str, Any]:
        s = self.ctx.evals
        req = EvalRequest(self.model, load, self.base, s.data_dir, s.batch_size, s.device,
                          s.workers, **policy)
        name = f"table1_{self.model}_{tag}"
        return run_test(req, os.path.join(s.out, "evals", f"{name}.json"),
                        os.path.join(s.out, "logs", f"test_{name}.log"), s.force, s.say)


def _acc(results: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Mean accuracy in percent, with the std over seeds when there are several."""
    accs = [100.0 * r["accuracy"] for r in results]
    return {"mean": statistics.mean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else None}


def checkpoints(ctx: ReproContext, model: str, gamma: float) -> dict[str, str]:
    """Base ResNet, curriculum and finetuned checkpoints: released, or trained here."""
    if ctx.args.released:
        return released_checkpoints(ctx.args, model, gamma)
    runs = pipeline.blockdrop(ctx.plan(), model, [gamma])
    return {"base": runs["base"], "curriculum": runs["curriculum"],
            "finetuned": runs["finetuned"][gamma]}


def released_checkpoints(args: argparse.Namespace, model: str, gamma: float) -> dict[str, str]:
    """The three checkpoints of ``model`` under ``--released`` (``--base_ckpt`` wins)."""
    found = {"base": args.base_ckpt or base_checkpoint(args.released, model),
             "curriculum": curriculum_checkpoint(args.released, model),
             "finetuned": next((f.checkpoint for f in find_finetuned(args.released, [model],
                                                                      [gamma])), None)}
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise NotFoundError(
            f"--released {args.released}: no {', '.join(missing)} checkpoint of {model}: looked "
            f"for {args.released}/pretrained/{model}/pk_*.t7, "
            f"{args.released}/cl_learning|cl_training/{model}/ckpt_E_*.t7 and "
            f"{args.released}/finetuned/{model}_gamma_{gamma_text(gamma)}/ckpt_E_*.t7")
    return found


def model_rows(ctx: ReproContext, model: str, gamma: float, seeds: Sequence[int]
               ) -> list[dict[str, Any]]:
    """Our Table 1 values of one model: one dict per method."""
    ckpts = checkpoints(ctx, model, gamma)
    run = Evaluator(ctx, model, ckpts["base"])
    full = run("full")
    bd, bd_ft = run("blockdrop", ckpts["curriculum"]), run("blockdrop_ft", ckpts["finetuned"])
    k, k_ft = ceil_usage(bd["block_usage_mean"]), ceil_usage(bd_ft["block_usage_mean"])
    plan = ctx.plan()
    rows = []
    for name in FIXED:
        before, after = [], []
        for seed in (seeds if get_method(name).seeded else [None]):  # only RandomK draws
            tail = "" if seed is None else f"_seed{seed}"
            before.append(run(f"{name}_k{k}{tail}", policy=name, k=k, seed=seed))
            tuned = pipeline.finetune(plan, model, gamma, ckpts["base"], None,
                                      {"policy": name, "k": k_ft, "seed": seed})
            after.append(run(f"{name}_ft_k{k_ft}{tail}", tuned, policy=name, k=k_ft, seed=seed))
        a, b = _acc(before), _acc(after)
        rows.append({"method": name, "acc": a["mean"], "acc_std": a["std"], "k": k,
                     "acc_ft": b["mean"], "acc_ft_std": b["std"], "k_ft": k_ft})
    rows.append({"method": "blockdrop", "learned": True,
                 "acc": 100 * bd["accuracy"], "k": bd["block_usage_mean"],
                 "acc_ft": 100 * bd_ft["accuracy"], "k_ft": bd_ft["block_usage_mean"]})
    blocks = float(full["block_usage_mean"])
    rows.append({"method": "full", "acc": 100 * full["accuracy"], "k": blocks,
                 "acc_ft": 100 * full["accuracy"], "k_ft": blocks})
    return rows


def run_table1(args: argparse.Namespace, argv: Sequence[str]) -> None:
    models = model_list(args.models, MODELS[args.dataset][:1] if args.smoke
                        else MODELS[args.dataset])
    seeds = args.seeds or ([0, 1] if args.smoke else [0, 1, 2])
    for model in models if args.released else []:  # every model's files before any work
        released_checkpoints(args, model, table1_gamma(model, args.gamma))
    ctx = prepare(args, argv, models, train=True)
    table = Table("Table 1: BlockDrop vs heuristic policies at the same K, before and after "
                  "joint finetuning (ft)", COLUMNS)
    for model in models:
        gamma = table1_gamma(model, args.gamma)
        for row in model_rows(ctx, model, gamma, seeds):
            method, learned = row.pop("method"), row.pop("learned", False)
            paper = paper_row("table1", model=model, method=method) or {}
            label = METHOD_NAMES[method] + (f" (γ={gamma_text(gamma)})" if learned else "")
            table.add({"model": model, "method": label}, row,
                      {k: paper.get(k) for k in ("acc", "k", "acc_ft", "k_ft")})
    table.notes = _notes(ctx, seeds)
    md, csv = write_table(table, ctx.out, "table1", preamble(ctx, "table1"))
    pngs = [save(figure(table, key), os.path.join(ctx.out, f"table1_{key}.png"))
            for key in ("acc", "acc_ft")]
    ctx.say(table.markdown())
    ctx.say(f"wrote {md}, {csv}, {', '.join(pngs)}")


def figure(table: Table, key: str):
    """Accuracy of every method, ours beside the paper's, before (``acc``) or after
    (``acc_ft``) finetuning."""
    groups = [f"{r.labels['model']}\n{r.labels['method']}" for r in table.rows]
    when = "before finetuning" if key == "acc" else "after joint finetuning (ft)"
    return ours_vs_paper_bars(groups, [r.ours.get(key) for r in table.rows],
                              [r.paper.get(key) for r in table.rows], "accuracy (%)",
                              f"Table 1: accuracy at the same K, {when}",
                              [r.ours.get(key + "_std") for r in table.rows])


def _notes(ctx: ReproContext, seeds: Sequence[int]) -> list[str]:
    out = []
    if ctx.args.smoke:
        out.append("SMOKE RUN: generated data and one-epoch schedules; not comparable with the "
                   "paper.")
    out += [f"K = BlockDrop's mean block usage rounded up, before and after finetuning; "
            f"BlockDrop's K column is its mean usage. RandomK: mean ± std over seeds "
            f"{', '.join(map(str, seeds))}. Accuracy from test.py on {ctx.data_dir}.",
            "Before ft: the curriculum policy on the pretrained ResNet, the heuristics on that "
            "ResNet. ft: the finetuned BlockDrop model; each heuristic's ResNet finetuned under "
            "its own fixed policy (finetune.py --policy NAME --k K).",
            "Δ = ours − paper (accuracy in points, K in blocks)."]
    return out
