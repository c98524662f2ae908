"""Table 2: time per image of the full ResNet, BlockDrop and BlockDrop-seq (paper Sec. 4.3).

The timing is the benchmark's own: ``python -m scripts.benchmark --parts seq`` runs in a
child process per model (the engine's forward paths, interleaved, median of ``--repeats``,
CUDA events on a GPU), at batch 1 (the paper's setting) and at ``--time_batch``; its JSON
and log are kept under ``<out>/logs/``. Both policies are calibrated to keep the blocks that the
paper's model of that depth keeps (``--keep``: Table 3's usage after finetuning).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any
from collections.abc import Sequence

import torch

from models import get_spec
from scripts.repro.bookkeeping import read_json, write_json
from scripts.repro.context import ReproContext, model_list, preamble, prepare
from scripts.repro.plots import ours_vs_paper_bars, save
from scripts.repro.paper import paper_row, table_meta
from scripts.repro.report import Label, Metric, Table, write_table
from scripts.repro.steps import ROOT, StepError, failure, run_python

METHODS = (("full", "Full ResNet"), ("blockdrop", "BlockDrop (single-step)"),
           ("seq", "BlockDrop-seq"))
COLUMNS = (Label("model", "model"), Label("batch", "batch"), Label("method", "method"),
           Metric("blocks", "blocks used", ".1f", paper=False),
           Metric("ms", "time (ms/img)", ".3f"), Metric("speedup", "speed-up (%)", ".1f"))


def parse_keep(items: Sequence[str]) -> dict[str, int]:
    """``--keep MODEL=N ...`` as ``{model: N}`` (checked first by :func:`keep_problems`)."""
    return {name: int(value) for name, _, value in (item.partition("=") for item in items)}


def keep_problems(items: Sequence[str]) -> list[str]:
    """Why ``--keep`` values are not ``MODEL=N`` with N in [1, K of the model]."""
    found = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            found.append(f"--keep expects MODEL=N, got {item!r}")
            continue
        try:
            blocks = get_spec(name).num_blocks
        except ValueError as err:
            found.append(f"--keep: {err}")
            continue
        if not 1 <= int(value) <= blocks:
            found.append(f"--keep {name}: N must be in [1, {blocks}] (K of {name}), got {value}")
    return found


def default_keep(model: str) -> int:
    """Blocks kept per image: the paper's finetuned usage for the model, rounded."""
    row = paper_row("table1", model=model, method="blockdrop")
    return max(1, round(row["k_ft"])) if row else 1


def timings(ctx: ReproContext, model: str, batches: Sequence[int], keep: int
            ) -> list[dict[str, Any]]:
    """The benchmark's BlockDrop-seq rows of ``model``, one per batch size."""
    args = ctx.args
    json_path = os.path.join(ctx.out, "logs", f"benchmark_{model}.json")
    log = os.path.join(ctx.out, "logs", f"benchmark_{model}.log")
    argv = ["-m", "scripts.benchmark", "--parts", "seq", "--seq-models", model,
            "--seq-batches", *map(str, batches), f"--keep={model}={keep}",
            f"--repeats={args.repeats}", "--warmup=1", "--min-time=0",
            f"--seq-images={args.time_images}", f"--device={args.device}",
            f"--threads={torch.get_num_threads()}", f"--out={json_path}"]
    error = run_python(argv, log)
    if error is not None:
        raise StepError(failure(f"timing of {model}", error, log,
                                f"PYTHONPATH={shlex.quote(ROOT)} "
                                + shlex.join([sys.executable, *argv])))
    return read_json(json_path, "rerun the command", lambda d: isinstance(d["seq"], list))["seq"]


def rows_of(result: dict[str, Any], model: str, batch: int) -> list[dict[str, Any]]:
    ms = result["ms_per_image"]
    used = result.get("blocks_used", {})
    out = []
    for key, label in METHODS:
        paper = paper_row("table2", model=model, method=key) if batch == 1 else None
        out.append({"labels": {"model": model, "batch": str(batch), "method": label},
                    "ours": {"blocks": used.get(key, result["num_blocks"] if key == "full"
                                                else None),
                             "ms": ms[key],
                             "speedup": None if key == "full" else
                             100.0 * (1.0 - ms[key] / ms["full"])},
                    "paper": {"ms": paper["ms"], "speedup": paper["speedup"]} if paper else {}})
    return out


def run_table2(args: argparse.Namespace, argv: Sequence[str]) -> None:
    models = model_list(args.models, ("R32_C10",) if args.smoke else ("R32_C10", "R110_C10"))
    if args.smoke:
        args.repeats = args.repeats or 1
        args.time_images = args.time_images or 2
    args.repeats = args.repeats or 5
    args.time_images = args.time_images or 64
    ctx = prepare(args, argv, [], train=False)
    batches = sorted({1, args.time_batch or (4 if args.smoke else 32)})
    table = Table(f"Table 2: time per image, {args.device}", COLUMNS)
    raw = []
    for model in models:
        keep = parse_keep(args.keep or []).get(model) or default_keep(model)
        ctx.say(f"[time] {model} batch {', '.join(map(str, batches))}, {keep} blocks kept")
        for result in timings(ctx, model, batches, keep):
            raw.append(result)
            for row in rows_of(result, model, result["batch"]):
                table.add(row["labels"], row["ours"], row["paper"])
    meta = table_meta("table2")
    table.notes = ([f"SMOKE RUN: {args.time_images} images, {args.repeats} repeat(s); timings "
                    f"are noise."] if args.smoke else []) + [
        f"Ours: {args.device}, {torch.get_num_threads()} CPU thread(s), median of "
        f"{args.repeats} interleaved rounds over {args.time_images} random images per batch "
        f"size (python -m scripts.benchmark --parts seq); policies of both variants "
        f"calibrated to keep about the paper's blocks per image (random weights: time, not "
        f"accuracy).",
        f"Paper: batch {meta.get('batch_size')}, {meta.get('device')}. Speed-up = 1 − time / "
        f"full-ResNet time (negative: slower). Δ = ours − paper."]
    md, csv = write_table(table, ctx.out, "table2", preamble(ctx, "table2"))
    write_json(os.path.join(ctx.out, "table2_raw.json"), raw)
    groups = [f"{r.labels['model']} b{r.labels['batch']}\n{r.labels['method']}"
              for r in table.rows]
    png = save(ours_vs_paper_bars(groups, [r.ours.get("ms") for r in table.rows],
                                  [r.paper.get("ms") for r in table.rows], "ms per image",
                                  f"Table 2: time per image ({args.device} vs the paper's "
                                  f"{meta.get('device')})"),
               os.path.join(ctx.out, "table2_times.png"))
    ctx.say(table.markdown())
    ctx.say(f"wrote {md}, {csv}, {png}")
