"""Tables 3-4 and compare_gamma: find or train the finetuned models, evaluate, write the
table and Figure 3 (paper Sec. 4.2, supplement Tables 1-2)."""
from __future__ import annotations

import argparse
import glob
import os
from collections.abc import Sequence

import yaml

from models import MODEL_SPECS, get_spec
from scripts.repro import pipeline
from scripts.repro.context import ReproContext, model_list, preamble, prepare
from scripts.repro.gamma import (Evaluated, evaluate_finetuned, evaluate_full, figure3,
                                 gamma_table, network_name, notes)
from scripts.repro.released import (Finetuned, NotFoundError, base_checkpoint, parse_run_name,
                                    require_finetuned)
from scripts.repro.steps import newest_path
from utils.checkpoint import read_checkpoint
from utils.errors import UserError
from policies.policy_init import RANDOM, TORCHVISION, resolve_policy_init
from scripts.repro.plots import save
from scripts.repro.paper import paper_rows
from scripts.repro.report import write_table

SMOKE_GAMMAS = (2.0, 5.0)  # two γ: the tables and Figure 3 get more than one BlockDrop point


class ModelMismatchError(UserError, ValueError):
    """Checkpoints of different models were given to one comparison."""


def policy_init_problems(args: argparse.Namespace, default_models: Sequence[str]) -> list[str]:
    """From scratch, the curriculum's starting weights of the policy (``--policy_init``,
    else the torch hub cache for ImageNet models) must be there before any step runs."""
    value = args.policy_init or (RANDOM if args.smoke else None)
    if args.released or value == TORCHVISION:  # cl_training.py downloads them
        return []
    found = []
    for model in args.models or (default_models[:1] if args.smoke else default_models):
        if model in MODEL_SPECS:
            try:
                resolve_policy_init(get_spec(model), value)
            except UserError as err:
                found.append(str(err))
    return found


def train_all(ctx: ReproContext, models: Sequence[str], gammas: Sequence[float] | None,
              policy_init: str | None = None) -> tuple[list[Finetuned], dict[str, str]]:
    """From scratch: every training step per model; returns the finetuned models and bases."""
    plan = ctx.plan(policy_init)
    found, bases = [], {}
    for model in models:
        wanted = gammas or (SMOKE_GAMMAS if ctx.args.smoke else pipeline.default_gammas(model))
        if not wanted:
            raise NotFoundError(f"no γ for {model}: pass --gammas, or add "
                                f"configs/finetune/{model}_gamma<γ>.yaml")
        runs = pipeline.blockdrop(plan, model, wanted)
        bases[model] = runs["base"]
        found += [Finetuned(model, g, c) for g, c in runs["finetuned"].items()]
    return found, bases


def evaluate_all(ctx: ReproContext, found: Sequence[Finetuned], bases: dict[str, str | None]
                 ) -> tuple[list[Evaluated], dict[str, Evaluated | None], list[str]]:
    evals = [evaluate_finetuned(ctx.evals, f, bases.get(f.model)) for f in found]
    fulls, missing = {}, []
    for model, base in bases.items():
        fulls[model] = evaluate_full(ctx.evals, model, base) if base else None
        if base is None:
            missing.append(f"{network_name(model)}: no base ResNet found, so its accuracy is "
                           f"not shown (pass --base_ckpt or unpack cv/pretrained/{model}/)")
    return evals, fulls, missing


def write_results(ctx: ReproContext, name: str, title: str, paper_table: str | None,
                  models: Sequence[str], evals, fulls, extra_notes: Sequence[str]) -> None:
    table = gamma_table(title, models, evals, fulls, paper_table)
    table.notes = notes(ctx.evals, evals, ctx.args.smoke) + list(extra_notes)
    md, csv = write_table(table, ctx.out, name, preamble(ctx, paper_table))
    png = save(figure3(f"Figure 3: accuracy vs FLOPs ({', '.join(models)})", models, evals,
                       fulls, paper_table), os.path.join(ctx.out, f"{name}_figure3.png"))
    ctx.say(table.markdown())
    ctx.say(f"wrote {md}, {csv}, {png}")


def run_gamma_table(args: argparse.Namespace, argv: Sequence[str], name: str,
                    default_models: Sequence[str]) -> None:
    """table3 / table4: released checkpoints (``--released``) or every training step from
    scratch."""
    models = model_list(args.models, default_models[:1] if args.smoke else default_models)
    ctx = prepare(args, argv, models, train=not args.released)
    if args.released:
        found = require_finetuned(args.released, models, args.gammas)
        models = [m for m in models if any(f.model == m for f in found)]
        bases = {m: base_checkpoint(args.released, m) for m in models}
    else:
        # cl_training.py's rule: torchvision weights from the hub cache by default;
        # smoke runs never download and start the policy at random
        init = args.policy_init or (RANDOM if args.smoke else None)
        found, bases = train_all(ctx, models, args.gammas, init)
    evals, fulls, missing = evaluate_all(ctx, found, bases)
    write_results(ctx, name, f"{name[:1].upper()}{name[1:-1]} {name[-1]}: BlockDrop per γ "
                  f"vs the full ResNet", name, models, evals, fulls, missing)


# -- compare_gamma --------------------------------------------------------------------------
def _run_config(folder: str) -> dict:
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """``(checkpoint, folder)`` of a checkpoint file or a run folder (its newest ckpt_E_*)."""
    if os.path.isdir(path):
        ckpt = newest_path(path)
        if ckpt is None:
            raise NotFoundError(f"{path}: no ckpt_E_*.t7 checkpoint in this folder")
        return ckpt, path
    if not os.path.isfile(path):
        raise NotFoundError(f"{path}: no such checkpoint file or run folder")
    return path, os.path.dirname(path)


def identify(path: str, flag_model: str | None) -> Finetuned:
    """Model and γ of a finetuned checkpoint: from the file's ``model`` entry, the run's
    config.yaml, or the ``<model>_gamma_<γ>`` folder name; else ``--model``."""
    ckpt, folder = resolve_checkpoint(path)
    config = _run_config(folder)
    named = parse_run_name(folder)
    stored = read_checkpoint(ckpt)
    model = (stored.get("model") if isinstance(stored, dict) else None) or config.get("model") \
        or (named[0] if named else None) or flag_model
    if model is None:
        raise ModelMismatchError(f"cannot tell which model {path} is; pass --model")
    gamma = named[1] if named else (-float(config["penalty"]) if "penalty" in config else None)
    return Finetuned(model, gamma, ckpt)


def run_compare_gamma(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """One table and Figure 3 for finetuned models of one network."""
    if args.smoke and not args.paths:
        models = ["R32_C10"]
    else:
        if not args.paths:
            raise NotFoundError("compare_gamma needs finetuned checkpoints or run folders "
                                "(CKPT_OR_RUN_DIR ...)")
        items = [identify(p, args.model) for p in args.paths]
        names = sorted({i.model for i in items} | ({args.model} if args.model else set()))
        if len(names) > 1:
            listed = ", ".join(f"{p} ({i.model})" for p, i in zip(args.paths, items, strict=False))
            raise ModelMismatchError(f"the checkpoints are of different models: {listed}"
                                     + (f"; --model {args.model}" if args.model else "")
                                     + ". Compare one model at a time")
        models = names
    ctx = prepare(args, argv, models, train=args.smoke and not args.paths)
    if args.smoke and not args.paths:
        found, bases = train_all(ctx, models, None)
        items = [identify(os.path.dirname(f.checkpoint), None) for f in found]
    model = models[0]
    base = args.base_ckpt or _base_of(items, model)
    if args.smoke and not args.paths:
        base = bases[model]
    evals, fulls, missing = evaluate_all(ctx, items, {model: base})
    paper = next((t for t in ("table3", "table4") if paper_rows(t, model=model)), None)
    write_results(ctx, "compare_gamma", f"BlockDrop {model}: accuracy, blocks and FLOPs per γ",
                  paper, models, evals, fulls, missing)


def _base_of(items: Sequence[Finetuned], model: str) -> str | None:
    """The base ResNet recorded in a run's config.yaml, else the model's default file."""
    for item in items:
        base = _run_config(os.path.dirname(item.checkpoint)).get("base_ckpt")
        if base and os.path.isfile(base):
            return base
    found = sorted(glob.glob(get_spec(model).base_checkpoint))  # the name may be a pattern
    return found[-1] if found else None
