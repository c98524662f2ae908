"""Every method on one backbone, on the same axes: accuracy against FLOPs and against
measured time (docs/reproducing.md, "Pareto comparison").

The points: the full network; each fixed heuristic at a grid of K on the base ResNet
(RandomK over ``--seeds``, mean ± std); a stochastic-depth network under its static
policies at the same K; and each learned checkpoint at its default threshold and along a
threshold sweep (``test.py --threshold``). Every number comes from ``test.py --out``
(cached like the tables' evaluations); every point is timed at batch 1 and at
``--time_batch_large`` in one interleaved run of the benchmark's clock on the same images.
The peers' published points (``configs/paper_results.yaml``, ``peers``, in this project's
FLOPs) are drawn hollow, labelled as reported.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from models import get_spec
from models.fast import inference_copy
from policies.registry import DEFAULT_METHOD, get_method, method_names, method_of
from scripts.repro import pipeline
from scripts.repro.context import ReproContext, preamble, prepare
from scripts.repro.evaluation import EvalRequest, run_test
from scripts.repro.frontier import common_window, mean_accuracy_over, on_frontier
from scripts.repro.paper import load_paper_results
from scripts.repro.plots import new_figure, save
from scripts.repro.released import NotFoundError, find_finetuned
from scripts.repro.report import Label, Metric, Table, write_table
from scripts.repro.tables import ModelMismatchError, _base_of, identify
from utils.checkpoint import read_checkpoint
from utils.data import get_dataset
from utils.networks import Request, load_for_eval
from utils.timing import Clock, time_interleaved

STATIC = ("firstk", "distributek", "everyother")  # static policies of a stochastic-depth net
SWEEP = (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)  # fractions of a method's threshold range
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f")


@dataclass
class Point:
    method: str  # the legend group
    setting: str
    requests: list[EvalRequest]  # several: RandomK's seeds
    results: list[dict[str, Any]] = field(default_factory=list)
    ms: dict[int, float] = field(default_factory=dict)  # batch size -> ms per image
    frontier: bool = False

    def value(self, key: str) -> float:
        return statistics.mean(float(r[key]) for r in self.results)

    def spread(self, key: str) -> float | None:
        values = [float(r[key]) for r in self.results]
        return statistics.stdev(values) if len(values) > 1 else None


# -- which points ---------------------------------------------------------------
def k_grid(num_blocks: int, count: int) -> list[int]:
    """``count`` block budgets spread over 1..K-1 (K itself is the full network)."""
    ks = {max(1, min(num_blocks - 1, round(num_blocks * (i + 1) / (count + 1))))
          for i in range(count)}
    return sorted(ks)


def sweep_thresholds(method_name: str, points: int) -> list[float]:
    lo, hi = get_method(method_name).threshold_range
    fractions = SWEEP if points == len(SWEEP) else [(i + 0.5) / points for i in range(points)]
    return [round(lo + f * (hi - lo), 4) for f in fractions]


def request(ctx: ReproContext, model: str, load: str | None, base: str | None,
            **policy: Any) -> EvalRequest:
    s = ctx.evals
    return EvalRequest(model, load, base, s.data_dir, s.batch_size, s.device, s.workers,
                       **policy)


def heuristic_points(ctx: ReproContext, model: str, base: str | None, ks: Sequence[int],
                     seeds: Sequence[int]) -> list[Point]:
    points = [Point("full network", f"K={get_spec(model).num_blocks}",
                    [request(ctx, model, None, base, policy="firstk",
                             k=get_spec(model).num_blocks)])]
    for name in method_names(learned=False):
        method = get_method(name)
        if method.selected_by is not None:  # a training regime, drawn with its checkpoints
            continue
        for k in ks:
            runs = [request(ctx, model, None, base, policy=name, k=k, seed=s)
                    for s in (seeds if method.seeded else [None])]
            points.append(Point(name, f"K={k}", runs))
    return points


def checkpoint_points(ctx: ReproContext, model: str, path: str, base: str | None,
                      ks: Sequence[int], sweep: int) -> list[Point]:
    """A learned checkpoint's default point and threshold sweep; a network trained to
    tolerate dropping (stochastic depth) under the static policies."""
    method = method_of(read_checkpoint(path), path)
    label = os.path.basename(os.path.dirname(path)) or path
    if method is None or not method.learned:
        name = method.name if method is not None else "resnet"
        return [Point(f"{name} + {rule}", f"K={k}", [request(ctx, model, path, base,
                                                              policy=rule, k=k)])
                for rule in STATIC for k in ks]
    points = [Point(method.name, f"{label} default", [request(ctx, model, path, base)])]
    if method.threshold_help:
        points += [Point(method.name, f"{label} T={t:g}",
                         [request(ctx, model, path, base, threshold=t)])
                   for t in sweep_thresholds(method.name, sweep)]
    return points


# -- measuring ------------------------------------------------------------------------
def evaluate_points(ctx: ReproContext, points: list[Point]) -> None:
    s = ctx.evals
    for i, point in enumerate(points):
        for j, req in enumerate(point.requests):
            name = f"pareto_{req.model}_{i:03d}_{j}"
            point.results.append(run_test(req, os.path.join(s.out, "evals", f"{name}.json"),
                                          os.path.join(s.out, "logs", f"test_{name}.log"),
                                          s.force, s.say))


def time_points(ctx: ReproContext, model: str, points: list[Point], batches: Sequence[int],
                images: int, repeats: int) -> None:
    """Milliseconds per image of every point, at each batch size, in one interleaved run
    per batch size on the same ``images`` test images (inference copies, dynamic
    execution: what test.py runs)."""
    spec, device = get_spec(model), torch.device(ctx.evals.device)
    testset = get_dataset(spec, ctx.data_dir, train=False)
    n = min(images, len(testset))
    x = torch.stack([testset[i][0] for i in range(n)]).to(device)
    runners = {}
    for i, point in enumerate(points):
        req = point.requests[0]
        setup = load_for_eval(spec, Request(req.load, req.base_ckpt, req.policy, req.k,
                                            req.seed, req.threshold))
        rnet = inference_copy(setup.rnet.to(device).eval(), device=device)
        source = setup.source.to(device).eval().for_inference(device=device)
        runners[i] = (rnet, source)
    for batch in batches:
        chunks = x.split(batch)
        fns = {i: (lambda r=r, src=src, chunks=chunks: [src.run(r, c) for c in chunks])
               for i, (r, src) in runners.items()}
        with torch.inference_mode():
            med = time_interleaved(fns, repeats, 1, Clock(device))
        for i, point in enumerate(points):
            point.ms[batch] = 1e3 * med[i] / n


# -- reporting ------------------------------------------------------------------------
COLUMNS = (Label("method", "method"), Label("setting", "setting"),
           Metric("acc", "accuracy (%)", ".2f", std=True, paper=False),
           Metric("flops", "FLOPs/img", ".3E", paper=False),
           Metric("usage", "blocks used", ".2f", std=True, paper=False),
           Metric("unique", "unique policies", ".0f", paper=False),
           Metric("ms1", "ms/img, batch 1", ".3f", paper=False),
           Metric("ms_large", "ms/img, large batch", ".4f", paper=False),
           Label("frontier", "on frontier"))


def table_of(points: Sequence[Point], model: str, large: int) -> Table:
    table = Table(f"Every method on {model}: accuracy against FLOPs and time "
                  f"(time at batch 1 and {large})", COLUMNS)
    for p in points:
        table.add({"method": p.method, "setting": p.setting,
                   "frontier": "yes" if p.frontier else ""},
                  {"acc": 100 * p.value("accuracy"), "acc_std": _pct(p.spread("accuracy")),
                   "flops": p.value("flops_mean"), "usage": p.value("block_usage_mean"),
                   "usage_std": p.value("block_usage_std"), "unique": p.value("unique_policies"),
                   "ms1": p.ms.get(1), "ms_large": p.ms.get(large)}, {})
    return table


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def areas(points: Sequence[Point]) -> tuple[tuple[float, float] | None, dict[str, float | None]]:
    """The common FLOP window of the methods with several points, and each one's mean
    accuracy (%) over it (:mod:`scripts.repro.frontier`)."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.method, []).append(p)
    curves = {m: ps for m, ps in groups.items() if len(ps) > 1}
    window = common_window([[p.value("flops_mean") for p in ps] for ps in curves.values()])
    if window is None:
        return None, {}
    return window, {m: _pct(mean_accuracy_over([p.value("flops_mean") for p in ps],
                                               [p.value("accuracy") for p in ps], window))
                    for m, ps in curves.items()}


def reported_points(model: str) -> list[dict[str, Any]]:
    """The peers' published points for ``model`` (``peers`` in paper_results.yaml: per
    method a ``rows`` list) that give an accuracy (%) and FLOPs in this project's units."""
    out = []
    for method, body in (load_paper_results().get("peers") or {}).items():
        rows = body.get("rows") if isinstance(body, dict) else body
        for row in rows or []:
            if not isinstance(row, dict) or row.get("model") != model:
                continue
            acc = row.get("accuracy", row.get("acc"))
            if acc is None or row.get("flops") is None:
                continue
            variant = row.get("variant")
            name = method if variant in (None, method) else f"{method} ({variant})"
            out.append({"method": method, "label": f"{name} (reported)", "acc": float(acc),
                        "flops": float(row["flops"])})
    return out


def _colours(points: Sequence[Point]) -> dict[str, str]:
    names = list(dict.fromkeys(p.method for p in points))
    return {m: COLOURS[i % len(COLOURS)] for i, m in enumerate(names)}


def flops_figure(points: Sequence[Point], reported: Sequence[dict[str, Any]], model: str):
    fig = new_figure(9, 5.5)
    ax = fig.add_subplot()
    colours = _colours(points)
    for method, colour in colours.items():
        ps = sorted((p for p in points if p.method == method),
                    key=lambda p: p.value("flops_mean"))
        ax.plot([p.value("flops_mean") / 1e9 for p in ps], [100 * p.value("accuracy") for p in ps],
                marker="o", markersize=5, color=colour, linewidth=1, alpha=0.85, label=method)
    front = sorted((p for p in points if p.frontier), key=lambda p: p.value("flops_mean"))
    ax.step([p.value("flops_mean") / 1e9 for p in front],
            [100 * p.value("accuracy") for p in front],
            where="post", color="black", linewidth=1.5, linestyle="--", label="Pareto frontier")
    for r in reported:
        ax.plot([r["flops"] / 1e9], [r["acc"]], marker="D", markersize=8, markerfacecolor="none",
                markeredgecolor=colours.get(r["method"], "#444444"), linestyle="none",
                label=r["label"])
    ax.set(xlabel="GFLOPs per image (2 FLOPs per multiply-add)", ylabel="accuracy (%)",
           title=f"{model}: accuracy against FLOPs")
    ax.grid(alpha=0.3)
    _legend(ax)
    return fig


def time_figure(points: Sequence[Point], model: str, large: int):
    fig = new_figure(13, 5)
    colours = _colours(points)
    for col, batch in enumerate((1, large)):
        ax = fig.add_subplot(1, 2, col + 1)
        for method, colour in colours.items():
            ps = sorted((p for p in points if p.method == method and batch in p.ms),
                        key=lambda p: p.ms[batch])
            ax.plot([p.ms[batch] for p in ps], [100 * p.value("accuracy") for p in ps],
                    marker="o", markersize=5, color=colour, linewidth=1, alpha=0.85,
                    label=method)
        ax.set(xlabel=f"ms per image at batch {batch} (measured)", ylabel="accuracy (%)",
               title=f"{model}, batch {batch}")
        ax.grid(alpha=0.3)
    _legend(ax)
    return fig


def _legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    ax.legend(seen.values(), seen.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0),
              fontsize=8)


# -- the command --------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="CKPT_OR_RUN_DIR",
                   help="checkpoints or run folders (newest ckpt_E_* inside) of any methods, "
                        "all of one model")
    p.add_argument("--model", default=None, help="the model (default: read from the files; "
                                                  "R32_C10 for --smoke or from scratch)")
    p.add_argument("--released", metavar="CV_DIR", default=None,
                   help="add the authors' finetuned BlockDrop checkpoints of the model under "
                        "CV_DIR (CV_DIR/finetuned/<model>_gamma_<γ>/)")
    p.add_argument("--base_ckpt", default=None,
                   help="base ResNet of the heuristics and the full network (default: the "
                        "runs' config.yaml, else the model's default path)")
    p.add_argument("--ks", type=int, default=None,
                   help="block budgets per fixed heuristic (default 5; smoke 2)")
    p.add_argument("--thresholds", type=int, default=None,
                   help="threshold-sweep points per learned checkpoint (default 7; smoke 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="RandomK seeds (default 0 1 2; smoke 0 1)")
    p.add_argument("--time_batch_large", type=int, default=None,
                   help="the large batch size timed (default 256; smoke 8)")


def problems(args: argparse.Namespace) -> list[str]:
    out = []
    for flag in ("ks", "thresholds"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            out.append(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.time_batch_large is not None and args.time_batch_large < 1:
        out.append(f"--time_batch_large must be at least 1, got {args.time_batch_large}")
    return out


def _checkpoints(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The model and the checkpoints of ``paths`` and ``--released``, all of one model."""
    items = [identify(p, args.model) for p in args.paths]
    if args.released:
        model = args.model or (items[0].model if items else None)
        if model is None:
            raise NotFoundError("--released needs --model (or checkpoints that name the model)")
        found = find_finetuned(args.released, [model])
        if not found:
            raise NotFoundError(f"--released {args.released}: no finetuned checkpoint of {model} "
                                f"under {args.released}/finetuned/{model}_gamma_*/")
        items += found
    names = sorted({i.model for i in items} | ({args.model} if args.model else set()))
    if len(names) > 1:
        listed = ", ".join(f"{i.checkpoint} ({i.model})" for i in items)
        raise ModelMismatchError(f"the checkpoints are of different models: {listed}"
                                 + (f"; --model {args.model}" if args.model else "")
                                 + ". Compare one model at a time")
    return (names[0] if names else None), [i.checkpoint for i in items]


def train_methods(ctx: ReproContext, model: str) -> tuple[str, list[str]]:
    """From scratch (or ``--smoke``): the base network, BlockDrop's curriculum and
    finetuning (the paper's steps), and one run of every other registered learned method
    and training regime, each from its configs (pipeline.method_run)."""
    plan = ctx.plan()
    runs = pipeline.blockdrop(plan, model, pipeline.default_gammas(model)[:1] or [5.0])
    ckpts = list(runs["finetuned"].values())
    for name in method_names():
        method = get_method(name)
        if name != DEFAULT_METHOD and (method.learned or method.selected_by is not None):
            ckpts.append(pipeline.method_run(plan, model, name, runs["base"],
                                             runs["curriculum"]))
    return runs["base"], ckpts


def run_pareto(args: argparse.Namespace, argv: Sequence[str]) -> None:
    model, ckpts = _checkpoints(args)
    scratch = not ckpts
    model = model or "R32_C10"
    ctx = prepare(args, argv, [model], train=scratch)
    base = args.base_ckpt
    if scratch:
        base, ckpts = train_methods(ctx, model)
    base = base or _base_of([identify(c, model) for c in ckpts], model)
    spec = get_spec(model)
    ks = k_grid(spec.num_blocks, args.ks or (2 if args.smoke else 5))
    seeds = args.seeds or ([0, 1] if args.smoke else [0, 1, 2])
    points = heuristic_points(ctx, model, base, ks, seeds)
    for ckpt in ckpts:
        points += checkpoint_points(ctx, model, ckpt, base, ks,
                                    args.thresholds or (2 if args.smoke else 7))
    evaluate_points(ctx, points)
    large = args.time_batch_large or (8 if args.smoke else 256)
    time_points(ctx, model, points, (1, large), ctx.evals.time_images, ctx.evals.repeats)
    flags = on_frontier([p.value("flops_mean") for p in points],
                        [p.value("accuracy") for p in points])
    for point, flag in zip(points, flags, strict=True):
        point.frontier = flag
    write_pareto(ctx, model, points, large)


def write_pareto(ctx: ReproContext, model: str, points: Sequence[Point], large: int) -> None:
    table = table_of(points, model, large)
    window, area = areas(points)
    notes = [f"Timing: {ctx.evals.time_images} test images, median of {ctx.evals.repeats} "
             f"interleaved repeats, device {ctx.evals.device}."]
    if window is not None:
        notes.append(f"Mean accuracy over the common FLOP window {window[0]:.3E}–{window[1]:.3E}"
                     " (area under each method's best-so-far accuracy–FLOPs curve / width): "
                     + "; ".join(f"{m} {a:.2f}%" if a is not None and math.isfinite(a)
                                 else f"{m} –" for m, a in area.items()))
    table.notes = notes
    md, csv = write_table(table, ctx.out, "pareto", preamble(ctx, ""))
    reported = reported_points(model)
    pngs = [save(flops_figure(points, reported, model), os.path.join(ctx.out, "pareto_flops.png")),
            save(time_figure(points, model, large), os.path.join(ctx.out, "pareto_time.png"))]
    ctx.say(table.markdown())
    ctx.say(f"wrote {md}, {csv}, {', '.join(pngs)}")
