"""figures.sh: per-image views of one finetuned model (paper Sec. 4.3, Figures 4-5).

The test set is evaluated with the engine's evaluation (``utils.engine.evaluate``, the
function test.py uses), which returns every image's greedy policy and whether it was
classified right; the figures are drawn from those arrays.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from models import get_spec
from scripts.repro import pipeline
from scripts.repro.context import ReproContext, preamble, prepare
from scripts.repro.gamma import depth
from scripts.repro.released import gamma_text
from scripts.repro.tables import NotFoundError, identify
from utils.data import get_dataset
from utils.engine import EvalResult, evaluate
from utils.networks import Request, load_for_eval
from utils.errors import UserError
from scripts.repro.plots import (accuracy_by_blocks, dominant_policies, fewest_most_blocks,
                           keep_rates, pick_classes, save, usage_histogram)
from models.flops import flop_table
from scripts.repro.paper import paper_row
from scripts.repro.report import Label, Metric, Table, write_table

SUMMARY = (Label("network", "network"), Label("gamma", "γ"),
           Metric("accuracy", "accuracy (%)", ".2f"), Metric("usage", "blocks", ".2f", std=True),
           Metric("flops", "FLOPs/img", ".2E", std=True),
           Metric("unique", "unique policies", ".0f"))
BY_BLOCKS = (Label("blocks", "blocks used"), Metric("images", "images", ".0f", paper=False),
             Metric("accuracy", "accuracy (%)", ".2f", paper=False))


def display_image(dataset, spec) -> Callable[[int], np.ndarray]:
    """Image ``i`` of the test set as the network sees it, normalisation undone (uint8 HWC)."""
    mean = torch.tensor(spec.mean).view(3, 1, 1) if spec.mean else None
    std = torch.tensor(spec.std).view(3, 1, 1) if spec.std else None

    def image(i: int) -> np.ndarray:
        x = dataset[i][0]
        if mean is not None:
            x = x * std + mean
        return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return image


def summary_table(model: str, gamma, result: EvalResult) -> Table:
    flops = np.asarray(result.flops, dtype=np.float64)
    s = result.stats
    table = Table(f"Per-image analysis of BlockDrop {model}" + (
        f" (γ={gamma_text(gamma)})" if gamma is not None else ""), SUMMARY)
    paper, printed = None, None
    if gamma is not None:
        paper = (paper_row("table3", model=model, gamma=gamma)
                 or paper_row("table4", model=model, gamma=gamma))
        printed = paper_row("readme_test_prints", model=model, gamma=gamma)
    table.add({"network": f"BlockDrop-{depth(model)}", "gamma": gamma_text(gamma)},
              {"accuracy": 100 * s.accuracy, "usage": s.block_usage,
               "usage_std": s.block_usage_std, "flops": flops.mean(), "flops_std": flops.std(),
               "unique": s.unique_policies},
              {**{k: (paper or {}).get(k) for k in ("accuracy", "usage", "usage_std", "flops",
                                                    "flops_std")},
               "unique": printed["unique_policies"] if printed else None})
    return table


def by_blocks_table(result: EvalResult) -> Table:
    usage = result.policies.sum(1).numpy()
    matches = result.matches.numpy()
    table = Table("Accuracy by the number of blocks used", BY_BLOCKS)
    for b in np.unique(usage):
        sel = usage == b
        table.add({"blocks": str(int(b))}, {"images": int(sel.sum()),
                                            "accuracy": 100 * matches[sel].mean()})
    return table


def check_classes(classes: Sequence[int] | None, model: str) -> None:
    """``--classes`` must be classes of the model (checked before the evaluation)."""
    count = get_spec(model).num_classes
    bad = [c for c in classes or [] if not 0 <= c < count]
    if bad:
        raise UserError(f"--classes {' '.join(map(str, bad))}: {model} has classes "
                        f"0..{count - 1}")


def run_figures(args: argparse.Namespace, argv: Sequence[str]) -> None:
    if args.smoke and not args.load:
        check_classes(args.classes, "R32_C10")
        ctx = prepare(args, argv, ["R32_C10"], train=True)
        runs = pipeline.blockdrop(ctx.plan(), "R32_C10", [5.0])
        item = identify(runs["finetuned"][5.0], None)
        base = runs["base"]
    else:
        if not args.load:
            raise NotFoundError("figures needs --load <finetuned checkpoint>")
        item = identify(args.load, args.model)
        check_classes(args.classes, item.model)
        ctx = prepare(args, argv, [item.model], train=False)
        base = args.base_ckpt
    draw(ctx, item.model, item.gamma, item.checkpoint, base)


def draw(ctx: ReproContext, model: str, gamma, checkpoint: str, base) -> None:
    spec = get_spec(model)
    args = ctx.args
    setup = load_for_eval(spec, Request(checkpoint, base))
    device = torch.device(args.device)
    rnet, source = setup.rnet.to(device), setup.source.to(device)
    testset = get_dataset(spec, ctx.data_dir, train=False)
    loader = DataLoader(testset, batch_size=args.batch_size, num_workers=ctx.workers)
    ctx.say(f"[eval] {model} {checkpoint}")
    result = evaluate(rnet, source, loader, device, flops=flop_table(model), progress=False)
    policies = result.policies.numpy()
    usage, matches = policies.sum(1), result.matches.numpy()
    labels = np.asarray(getattr(testset, "targets", [y for _x, y in testset]))
    names = list(getattr(testset, "classes", [])) or [str(c) for c in range(spec.num_classes)]
    classes = pick_classes(labels, args.num_classes, args.classes)
    image = display_image(testset, spec)
    tag = f"{model}" + (f", γ={gamma_text(gamma)}" if gamma is not None else "")
    K = spec.num_blocks
    figures = {
        "figures_usage_histogram": usage_histogram(usage, K, f"Blocks used per image ({tag})"),
        "figures_keep_rate": keep_rates(policies, spec.layers,
                                        f"How often each block is kept ({tag})"),
        "figures_accuracy_by_blocks": accuracy_by_blocks(
            usage, matches, K, f"Accuracy by blocks used ({tag})"),
        "figure4_dominant_policies": dominant_policies(
            image, labels, policies, names, classes, args.top, args.per_policy,
            f"Figure 4: dominant policies per class ({tag}; strip: dark = block kept)"),
        "figure5_fewest_most_blocks": fewest_most_blocks(
            image, labels, usage, names, classes, args.per_side,
            f"Figure 5: images using the fewest and the most blocks ({tag})"),
    }
    paths = [save(fig, os.path.join(ctx.out, f"{name}.png")) for name, fig in figures.items()]
    summary = summary_table(model, gamma, result)
    summary.notes = [f"From utils.engine.evaluate on {len(usage)} test images of "
                     f"{ctx.data_dir}; Δ = ours − paper (supplement tables; unique policies: "
                     f"the authors' README)."]
    blocks = by_blocks_table(result)
    md, csv = write_table(summary, ctx.out, "figures", preamble(ctx, ""))
    with open(md, "a", encoding="utf-8") as f:
        f.write(f"\n## {blocks.title}\n\n{blocks.markdown()}\n\n## Figures\n\n" +
                "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in paths) +
                "\n")
    write_table(blocks, ctx.out, "figures_by_blocks")
    ctx.say(summary.markdown())
    ctx.say(f"wrote {md}, {csv}, " + ", ".join(paths))
