"""Wall-clock benchmark of BlockDrop's execution paths (paper Sec. 4.3, Table 2).

    python -m scripts.benchmark --out bench.json

Four parts, every method timed in one run on the same inputs, interleaved,
median over repeats after warm-up:

* inference: time per image of the full ResNet (``forward_full``), and, with the
  policy network included, of the masked ``forward``, of the authors' loop of
  ``forward_single`` over one image at a time, and of ``forward_dynamic``; the
  speedup of each over the full ResNet and the FLOP-ratio bound
  ``full ResNet FLOPs / (policy FLOPs incl. the policy network)``. Policies keep
  a fixed number of blocks per image, chosen at random per image.
* evaluation: test.py's images/s, ``utils.engine.evaluate`` (batched, dynamic,
  analytic FLOPs) against the authors' loop (batch 1, ``forward_single``, FLOPs
  counted per layer with hooks), on the same in-memory images; both must print
  the same statistics.
* curriculum: steps/s of the engine's curriculum-learning step
  (``utils.engine.curriculum_train_step``, Alg. 1, every block decided) whose two
  no-gradient ResNet passes run masked (``forward`` twice, the authors' way) or
  through one ``forward_policies`` call; backward and Adam update included.
* seq (Table 2): time per image of the full ResNet, BlockDrop and BlockDrop-seq
  (supplement) at batch 1 and 32 on R32_C10 and R110_C10, through the policy
  sources' ``run`` (what evaluation uses); BlockDrop-seq also with masked and
  grouped execution forced, which is how its batch > 1 mode was chosen.

* onnx (``--parts onnx``, not in the default run; docs/export.md): time per image
  of the exported model (``models.export``) under ONNX Runtime on the CPU, the
  policy network included, against the exported full ResNet, at batch 1, 32 and
  256; the speedup against the FLOP bound, and where the time goes per operator
  type (ONNX Runtime's profiler).

CPU by default; ``--device cuda`` times with CUDA events. ``--channels-last``
puts both networks in channels_last layout for every method (measured on the CPU,
not yet on a GPU); ``--bf16`` autocast is CUDA-only and has not been measured.
"""
from __future__ import annotations

import argparse
import json
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from models import FlatResNet, PolicyNet, get_model, get_spec
from policies.registry import build_source, get_method, method_names
from policies.seq import MODES, SeqAgent, build_seq_agent, seq_pass
from models.export import FixedDecision, PolicyNetDecision, export_onnx, exportable
from models.fast import OFF, FastOptions, inference_copy
from policies.blockdrop import curriculum_train_step
from scripts.cli import OneLineParser, count_problem, file_problem, guarded, number_problem
from scripts.repro.bookkeeping import read_json, write_json, write_text
from utils.engine import evaluate
from models.flops import flop_counter, flop_table
from policies.rewards import greedy_policy
from utils.stats import format_eval_block, policy_stats
from utils.config import device_problems
from utils.errors import UserError
from utils.launch import describe
from utils.amp import autocast
from utils.onnx_eval import open_session
from utils.timing import Clock, time_interleaved

# blocks kept per image by the paper's models: R110 gamma=10 (16.9 of 54),
# R32 gamma=5 (6.9 of 15, Table 3), R101 gamma=5 (24.8 of 33, Table 4)
DEFAULT_KEEP = {"R110_C10": 17, "R32_C10": 7, "R101_ImgNet": 25}
# images timed one at a time (batch 1, and the forward_single loop): CIFAR, ImageNet
SINGLE_IMAGES, SINGLE_IMAGES_LARGE = 32, 8
DEFAULT_BATCHES = {"R110_C10": (1, 32, 256), "R32_C10": (1, 32, 256), "R101_ImgNet": (1, 32)}
PARTS = ("inference", "profile", "eval", "curriculum", "seq", "methods", "onnx")
DEFAULT_PARTS = ("inference", "profile", "eval", "curriculum", "seq", "methods")  # onnx: asked
METHODS = ("full_eager", "full", "masked", "single", "dynamic")
# the models.dynamic.section names the profile part collects (plus "stage <s> blocks")
SECTIONS = ("policy transfer", "stem", "shortcuts", "gather", "scatter", "head")


# -- inputs ------------------------------------------------------------------
def random_policies(batch: int, num_blocks: int, keep: int,
                    generator: torch.Generator) -> torch.Tensor:
    """(batch, K) float policies keeping exactly ``keep`` blocks per image, at random."""
    ranks = torch.rand(batch, num_blocks, generator=generator).argsort(1).argsort(1)
    return (ranks < keep).float()


def calibrate_agent(agent: PolicyNet, images: torch.Tensor, keep_fraction: float) -> None:
    """Set the bias of the policy's keep head so that its greedy policy keeps each block
    for about ``keep_fraction`` of ``images`` (a random policy net keeps ~half)."""
    get_method("blockdrop").calibrate(agent, None, images, keep_fraction, None)


def setup(name: str, device: torch.device, seed: int, fast: FastOptions = OFF):
    """``(spec, generator, (rnet, agent), (fast rnet, fast agent))``: randomly initialised
    models in eval mode on ``device`` as users build them, their inference copies with
    ``fast`` applied (models.fast), and a seeded generator for the inputs."""
    spec = get_spec(name)
    torch.manual_seed(seed)
    rnet, agent = get_model(name)
    rnet.to(device).eval()
    agent.to(device).eval()
    fast_nets = inference_copy(rnet, fast, device), inference_copy(agent, fast, device)
    return spec, torch.Generator().manual_seed(seed), (rnet, agent), fast_nets


# -- timing ------------------------------------------------------------------
def bf16_on(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked (utils.amp.autocast), else nothing."""
    return autocast("bf16" if bf16 and device.type == "cuda" else "none", device)


# -- part 1: inference -------------------------------------------------------
def bench_inference(name: str, batch: int, keep: int, repeats: int, warmup: int,
                    device: torch.device, seed: int = 0, single_images: int = 32,
                    fast: FastOptions = OFF, bf16: bool = False,
                    min_time: float = 0.0) -> dict:
    """Per-image times of every method on one model and batch size. ``full_eager`` is
    the full ResNet as users build it; every other method runs on the inference copies
    (``fast``), and speedups are against the full ResNet on those (``full``). Batch 1
    runs ``single_images`` images one at a time, each with its own policy, so that its
    ratio does not hang on one random policy."""
    spec, gen, (rnet, _), (frnet, fagent) = setup(name, device, seed, fast)
    images = single_images if batch == 1 else batch
    x = torch.rand(images, 3, spec.image_size, spec.image_size, generator=gen).to(device)
    policy = random_policies(images, rnet.num_blocks, keep, gen).to(device)
    n_single = min(images, single_images)
    # the (images, policies) of each call: one batch, or every image on its own at batch 1
    calls = [(x[i:i + batch], policy[i:i + batch]) for i in range(0, images, batch)]

    def single_loop():  # the authors' timing: one image at a time with its own policy
        for i in range(n_single):
            fagent(x[i:i + 1])
            frnet.forward_single(x[i:i + 1], policy[i])

    def each(fn):
        return lambda: [fn(xs, ps) for xs, ps in calls]

    fns = {
        "full_eager": each(lambda xs, _: rnet.forward_full(xs)),
        "full": each(lambda xs, _: frnet.forward_full(xs)),
        "masked": each(lambda xs, ps: (fagent(xs), frnet(xs, ps))),
        "single": single_loop,
        "dynamic": each(lambda xs, ps: (fagent(xs), frnet.forward_dynamic(xs, ps))),
    }
    with torch.inference_mode(), bf16_on(device, bf16):
        med = time_interleaved(fns, repeats, warmup, Clock(device), min_time)
    per_image = {m: med[m] / (n_single if m == "single" else images) for m in METHODS}
    table = flop_table(name)
    policy_flops = float(table.per_image(policy.cpu()).double().mean())
    bound = table.full_resnet / policy_flops
    return {
        "model": name, "batch": batch, "keep": keep, "num_blocks": rnet.num_blocks,
        "images": images,
        "ms_per_image": {m: 1e3 * t for m, t in per_image.items()},
        "speedup": {m: per_image["full"] / per_image[m] for m in METHODS},
        "flop_bound": bound,
        "share_of_bound": per_image["full"] / per_image["dynamic"] / bound,
        "single_images": n_single,
    }


def default_single_images(name: str) -> int:
    """Images timed one at a time by default: fewer for the large ImageNet models."""
    return SINGLE_IMAGES if get_spec(name).image_size <= 64 else SINGLE_IMAGES_LARGE


# -- part 1b: profile ----------------------------------------------------------
def stage_flops(name: str, policy: torch.Tensor) -> dict[str, float]:
    """Mean FLOPs per image of each stage's kept blocks under ``policy`` (B, K)."""
    table, spec = flop_table(name), get_spec(name)
    costs = torch.tensor(table.block_costs, dtype=torch.float64) * policy.double().mean(0)
    out, start = {}, 0
    for s, count in enumerate(spec.layers):
        out[f"stage {s + 1} blocks"] = float(costs[start:start + count].sum())
        start += count
    return out


def profile_sections(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Seconds per call of ``fn`` in each ``models.dynamic.section`` (torch.profiler),
    plus ``other`` (the rest) and ``total``, all measured under the profiler."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        total = (time.perf_counter() - start) / repeats
    sums: dict[str, float] = {}
    for ev in prof.events():
        if ev.name in SECTIONS or ev.name.startswith("stage "):
            sums[ev.name] = sums.get(ev.name, 0.0) + ev.cpu_time_total * 1e-6 / repeats
    sums["other"] = max(0.0, total - sum(sums.values()))
    sums["total"] = total
    return sums


def bench_profile(name: str, batch: int, keep: int, repeats: int, device: torch.device,
                  seed: int = 0, fast: FastOptions = OFF) -> dict:
    """Where the time of the full ResNet, of dynamic execution and of the policy network
    goes, per component (ms per image). Shares come from one profiled run; they are
    scaled to the unprofiled time of each path, timed interleaved."""
    spec, gen, _, (frnet, fagent) = setup(name, device, seed, fast)
    x = torch.rand(batch, 3, spec.image_size, spec.image_size, generator=gen).to(device)
    policy = random_policies(batch, frnet.num_blocks, keep, gen).to(device)
    fns = {"full": lambda: frnet.forward_full(x),
           "dynamic": lambda: frnet.forward_dynamic(x, policy),
           "policy network": lambda: fagent(x)}
    with torch.inference_mode():
        med = time_interleaved(fns, repeats, 1, Clock(device), 0.2)
        profiled = {path: profile_sections(fn, repeats) for path, fn in fns.items()}
    table = flop_table(name)
    flops = {"full": stage_flops(name, torch.ones_like(policy.cpu())),
             "dynamic": stage_flops(name, policy.cpu())}
    flops["policy network"] = {"total": float(table.policy)}
    paths = {}
    for path, parts in profiled.items():
        scale = med[path] / parts["total"] / batch
        ms = {k: 1e3 * v * scale for k, v in parts.items()}
        rate = {k: f / (ms[k] * 1e-3) / 1e9 for k, f in flops[path].items() if ms.get(k)}
        paths[path] = {"ms_per_image": ms, "gflop_per_s": rate}
    return {"model": name, "batch": batch, "keep": keep, "num_blocks": frnet.num_blocks,
            "paths": paths}


# -- part 2: test.py evaluation ----------------------------------------------
def authors_eval_loop(rnet: FlatResNet, agent: PolicyNet, dataset: TensorDataset,
                      device: torch.device):
    """The authors' test.py: one image at a time, ``forward_single`` with its greedy
    policy, FLOPs counted layer by layer with forward hooks. Returns
    ``(policies uint8 (N, K), matches (N,), flops (N,))``."""
    rnet.eval()
    agent.eval()
    policies, matches, flops = [], [], []
    with flop_counter(nn.ModuleDict({"rnet": rnet, "agent": agent})) as layer_flops:
        for image, target in DataLoader(dataset, batch_size=1):
            image, target = image.to(device), target.to(device)
            layer_flops.clear()
            probs, _ = agent(image)
            policy = greedy_policy(probs)
            preds = rnet.forward_single(image, policy[0])
            flops.append(sum(layer_flops.values()))
            policies.append(policy.to(torch.uint8).cpu())
            matches.append((preds.argmax(1) == target).float().cpu())
    return torch.cat(policies), torch.cat(matches), np.asarray(flops, dtype=np.int64)


def bench_eval(name: str, images: int, batch: int, keep: int, repeats: int,
               device: torch.device, seed: int = 0, fast: FastOptions = OFF) -> dict:
    """images/s of ``utils.engine.evaluate`` (test.py, with its inference copies ``fast``)
    and of the authors' batch-1 loop on the networks as built."""
    spec, gen, (rnet, agent), _ = setup(name, device, seed)
    x = torch.rand(images, 3, spec.image_size, spec.image_size, generator=gen)
    y = torch.randint(0, spec.num_classes, (images,), generator=gen)
    calibrate_agent(agent, x[:256].to(device), keep / rnet.num_blocks)
    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=batch)
    table = flop_table(name)
    results = {}

    def batched():
        source = build_source("blockdrop", spec, agent=agent)
        res = evaluate(rnet, source, loader, device, flops=table, progress=False, fast=fast)
        results["batched"] = format_eval_block(res.stats, res.flops)

    def authors():
        pol, mat, flops = authors_eval_loop(rnet, agent, dataset, device)
        results["authors"] = format_eval_block(policy_stats(pol, mat), flops)

    with torch.inference_mode():
        med = time_interleaved({"batched": batched, "authors": authors}, repeats, 0,
                               Clock(device))
    return {
        "model": name, "images": images, "batch": batch,
        "images_per_s": {k: images / t for k, t in med.items()},
        "speedup": med["authors"] / med["batched"],
        "same_statistics": results["batched"] == results["authors"],
        "printed": results["batched"],
    }


# -- part 3: curriculum step -------------------------------------------------
def bench_curriculum(name: str, batch: int, keep_fraction: float, repeats: int,
                     warmup: int, device: torch.device, seed: int = 0,
                     fast: FastOptions = OFF) -> dict:
    """steps/s of the engine's curriculum step (policy forward+backward+Adam included),
    every block decided: the authors' way (the ResNet as built, masked) and
    cl_training.py's (its inference copy ``fast``, one ``forward_policies`` pass)."""
    spec, gen, (rnet, agent), (frnet, _) = setup(name, device, seed, fast)
    x = torch.rand(batch, 3, spec.image_size, spec.image_size, generator=gen).to(device)
    y = torch.randint(0, spec.num_classes, (batch,), generator=gen).to(device)
    agent.train()  # the policy trains with batch statistics
    calibrate_agent(agent, x, keep_fraction)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-4)
    usage = {}

    def step(dynamic: bool):
        noise = torch.rand(batch, rnet.num_blocks, generator=gen).to(device)
        out = curriculum_train_step(frnet if dynamic else rnet, agent, x, y, noise, alpha=0.8,
                                    beta=0.1, penalty=-10.0, cl_step=rnet.num_blocks,
                                    dynamic=dynamic)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        usage["sampled"] = float(out.policy.sum(1).mean())

    with torch.no_grad():
        usage["greedy"] = float(greedy_policy(agent(x)[0]).sum(1).mean())
    med = time_interleaved({"masked": lambda: step(False), "dynamic": lambda: step(True)},
                           repeats, warmup, Clock(device))
    return {
        "model": name, "batch": batch, "cl_step": rnet.num_blocks,
        "greedy_blocks": usage["greedy"], "sampled_blocks": usage["sampled"],
        "steps_per_s": {k: 1.0 / t for k, t in med.items()},
        "speedup": med["masked"] / med["dynamic"],
    }


# -- part 4: Table 2, BlockDrop-seq -------------------------------------------
SEQ_MODELS = ("R32_C10", "R110_C10")
SEQ_BATCHES = (1, 32)
SEQ_METHODS = ("full", "blockdrop", "seq", "seq_masked", "seq_grouped")


def calibrate_seq_agent(rnet: FlatResNet, agent: SeqAgent, images: torch.Tensor,
                        keep_fraction: float, generator: torch.Generator) -> None:
    """Make BlockDrop-seq's gates look trained: gate t becomes a random projection of
    its standardised input, with the bias set so that it keeps block t for about
    ``keep_fraction`` of ``images`` (decisions then vary from image to image)."""
    get_method("seq").calibrate(agent, rnet, images, keep_fraction, generator)


def bench_seq(name: str, batch: int, keep: int, repeats: int, warmup: int,
              device: torch.device, seed: int = 0, min_time: float = 0.0,
              images: int = 32) -> dict:
    """Table 2: per-image time of the full ResNet, of BlockDrop (policy network, then
    dynamic execution; ``AgentSource.run``) and of BlockDrop-seq (``SeqSource.run``:
    its default execution, and masked and grouped forced), on the engine's own paths.
    Both policies are calibrated to keep about ``keep`` blocks per image; every method
    runs the same ``max(batch, images)`` images in batches of ``batch``, so that the
    blocks used are averaged over the same images."""
    spec, gen, (rnet, agent), _ = setup(name, device, seed)
    count = max(batch, images)
    x = torch.rand(count, 3, spec.image_size, spec.image_size, generator=gen).to(device)
    chunks = x.split(batch)
    calib = torch.rand(256, 3, spec.image_size, spec.image_size, generator=gen).to(device)
    fraction = keep / rnet.num_blocks
    calibrate_agent(agent, calib, fraction)
    seq_agent = build_seq_agent(spec).to(device).eval()
    calibrate_seq_agent(rnet, seq_agent, calib, fraction, gen)
    sources = {"blockdrop": build_source("blockdrop", spec, agent=agent),
               "seq": build_source("seq", spec, agent=seq_agent)}
    fns = {"full": lambda: [rnet.forward_full(c) for c in chunks]}
    for key, source in sources.items():
        fns[key] = lambda source=source: [source.run(rnet, c) for c in chunks]
    for mode in MODES:  # forced, also at batch 1
        fns[f"seq_{mode}"] = lambda mode=mode: [seq_pass(rnet, seq_agent, c, mode=mode)
                                                for c in chunks]
    with torch.inference_mode():
        med = time_interleaved(fns, repeats, warmup, Clock(device), min_time)
        usage = {key: float(torch.cat([p for _, p in fns[key]()]).sum(1).mean())
                 for key in sources}
    return {
        "model": name, "batch": batch, "images": count, "keep": keep,
        "num_blocks": rnet.num_blocks,
        "seq_batch_mode": "grouped" if batch == 1 else sources["seq"].batch_mode,
        "blocks_used": usage,
        "ms_per_image": {m: 1e3 * med[m] / count for m in SEQ_METHODS},
        "seq_vs_blockdrop": med["seq"] / med["blockdrop"],
    }


def _seq_line(r: dict) -> str:
    ms, used = r["ms_per_image"], r["blocks_used"]
    return (f"{r['model']:<12} {r['batch']:>5} | {used['blockdrop']:>10.1f} {used['seq']:>5.1f} |"
            f" {ms['full']:>14.3f} {ms['blockdrop']:>10.3f} {ms['seq']:>7.3f} "
            f"({ms['seq_masked']:>6.3f} {ms['seq_grouped']:>7.3f}) |"
            f" {r['seq_vs_blockdrop']:>5.2f}x")


def format_seq(rows: list[dict]) -> str:
    head = ("model        batch | blocks: BD   seq  | ms/image: full  BlockDrop  BD-seq "
            "(masked grouped) | seq/BD")
    return "\n".join([head, "-" * len(head)] + [_seq_line(r) for r in rows])


# -- part 6: every registered method ------------------------------------------------
METHOD_MODELS = ("R32_C10", "R110_C10")
METHOD_BATCHES = (1, 32)


def bench_methods(name: str, batch: int, keep: int, repeats: int, warmup: int,
                  device: torch.device, seed: int = 0, min_time: float = 0.0,
                  images: int = 32) -> dict:
    """Time per image of the full ResNet and of every registered learned method (its
    source's ``run``: what test.py runs, on inference copies), each calibrated on random
    weights to keep about ``keep`` blocks per image (``Method.calibrate``); all run the
    same ``max(batch, images)`` images in batches of ``batch``, interleaved."""
    spec, gen, (rnet, _), _ = setup(name, device, seed)
    count = max(batch, images)
    x = torch.rand(count, 3, spec.image_size, spec.image_size, generator=gen).to(device)
    chunks = x.split(batch)
    calib = torch.rand(64, 3, spec.image_size, spec.image_size, generator=gen).to(device)
    fast_rnet = inference_copy(rnet, device=device)
    fns = {"full": lambda: [fast_rnet.forward_full(c) for c in chunks]}
    sources, skipped = {}, []
    for method_name in method_names(learned=True):
        method = get_method(method_name)
        agent = method.build(spec).to(device).eval()
        try:
            method.calibrate(agent, rnet, calib, keep / rnet.num_blocks, gen)
        except NotImplementedError:
            skipped.append(method_name)
            continue
        source = method.source(spec, agent).eval().for_inference(device=device)
        sources[method_name] = source
        fns[method_name] = lambda source=source: [source.run(fast_rnet, c) for c in chunks]
    table = flop_table(name)
    with torch.inference_mode():
        med = time_interleaved(fns, repeats, warmup, Clock(device), min_time)
        policies = {m: torch.cat([p for _, p in fns[m]()]).cpu() for m in sources}
    flops = {m: float(table.per_image(p, include_policy=False).double().mean())
             + sources[m].policy_flops for m, p in policies.items()}
    ms = {m: 1e3 * med[m] / count for m in fns}
    return {
        "model": name, "batch": batch, "images": count, "keep": keep, "skipped": skipped,
        "blocks_used": {m: float(p.sum(1).mean()) for m, p in policies.items()},
        "ms_per_image": ms, "flops": flops,
        "of_flop_bound": {m: (ms["full"] / ms[m]) / (table.full_resnet / flops[m])
                          for m in sources},
    }


def _grid(models: Sequence[str], batches: Sequence[int], fmt: Callable[[list[dict]], str],
          bench: Callable[[str, int], dict]) -> list[dict]:
    """``bench(model, batch)`` for every model and batch size; each row's lines of ``fmt``
    (without the header) go to stderr as it is measured."""
    rows = []
    for name in models:
        for batch in batches:
            rows.append(bench(name, batch))
            print(fmt(rows[-1:]).split("\n", 2)[-1], file=sys.stderr, flush=True)
    return rows


def format_methods(rows: list[dict]) -> str:
    head = ("model        batch | method        blocks   FLOPs/img | ms/image   speed-up  "
            "of FLOP bound")
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = r["ms_per_image"]
        lines.append(f"{r['model']:<12} {r['batch']:>5} | {'full':<12} "
                     f"{'':>7} {'':>11} | {ms['full']:>8.3f}")
        for m in r["blocks_used"]:
            lines.append(f"{'':<12} {'':>5} | {m:<12} {r['blocks_used'][m]:>7.1f} "
                         f"{r['flops'][m]:>11.3E} | {ms[m]:>8.3f} {ms['full'] / ms[m]:>8.2f}x "
                         f"{100 * r['of_flop_bound'][m]:>8.0f}%")
        if r["skipped"]:
            lines.append(f"{'':<12} {'':>5} | not timed (no calibration): "
                         + ", ".join(r["skipped"]))
    return "\n".join(lines)


# -- part 5: ONNX Runtime --------------------------------------------------------
ONNX_MODELS = ("R110_C10",)
ONNX_BATCHES = (1, 32, 256)
ONNX_METHODS = ("full", "dynamic")


def bench_onnx(name: str, batches: Sequence[int], keep: int, repeats: int, warmup: int,
               seed: int = 0, single_images: int = 32, min_time: float = 0.0,
               level: str = "all") -> list[dict]:
    """Per-image times under ONNX Runtime (CPU, ``torch.get_num_threads()`` intra-op
    threads) of two exports of the same random networks: the full ResNet (every block,
    no policy) and BlockDrop (policy network calibrated to keep about ``keep`` blocks,
    rows gathered per block). One row per batch size; batch 1 runs ``single_images``
    images one at a time. The FLOP bound counts the policies the exported model took."""
    import tempfile


    spec, gen, (rnet, agent), _ = setup(name, torch.device("cpu"), seed)
    calib = torch.rand(256, 3, spec.image_size, spec.image_size, generator=gen)
    calibrate_agent(agent, calib, keep / rnet.num_blocks)
    threads = torch.get_num_threads()
    table = flop_table(name)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"full": f"{tmp}/full.onnx", "dynamic": f"{tmp}/dynamic.onnx"}
        export_onnx(exportable(rnet, FixedDecision("full", [1] * rnet.num_blocks)),
                    paths["full"], model=name, input_size=spec.image_size)
        export_onnx(exportable(rnet, PolicyNetDecision(agent)), paths["dynamic"], model=name,
                    input_size=spec.image_size)
        sessions = {m: open_session(paths[m], threads, level) for m in ONNX_METHODS}
        for batch in batches:
            images = single_images if batch == 1 else batch
            x = torch.rand(images, 3, spec.image_size, spec.image_size, generator=gen).numpy()
            chunks = [x[i:i + batch] for i in range(0, images, batch)]
            fns = {m: (lambda s=s, cs=chunks: [s.run(None, {"images": c}) for c in cs])
                   for m, s in sessions.items()}
            med = time_interleaved(fns, repeats, warmup, Clock(torch.device("cpu")), min_time)
            policy = torch.cat([torch.from_numpy(out[1]) for out in fns["dynamic"]()])
            bound = table.full_resnet / float(table.per_image(policy).double().mean())
            per_image = {m: med[m] / images for m in ONNX_METHODS}
            speedup = per_image["full"] / per_image["dynamic"]
            row = {"model": name, "batch": batch, "images": images, "keep": keep,
                   "num_blocks": rnet.num_blocks, "threads": threads, "level": level,
                   "blocks_used": float(policy.double().sum(1).mean()),
                   "ms_per_image": {m: 1e3 * t for m, t in per_image.items()},
                   "speedup": speedup, "flop_bound": bound, "share_of_bound": speedup / bound}
            if batch == 1:
                row["ops"] = {m: onnx_op_profile(paths[m], chunks, threads, level, tmp)
                              for m in ONNX_METHODS}
            rows.append(row)
            print(format_onnx(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    return rows


def onnx_op_profile(path: str, chunks: list, threads: int, level: str,
                    folder: str) -> dict:
    """Where ONNX Runtime spends the time of one pass over ``chunks``: kernel ms per
    image by operator type (its profiler), the nodes run per image, and the wall
    time per image under the profiler."""

    session = open_session(path, threads, level, profile_prefix=f"{folder}/profile")
    for c in chunks:  # a warm-up pass; its events are left out below
        session.run(None, {"images": c})
    start = time.perf_counter()
    for c in chunks:
        session.run(None, {"images": c})
    wall = time.perf_counter() - start
    with open(session.end_profiling()) as f:
        events = json.load(f)
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    warm_end = runs[len(chunks) - 1]["ts"] + runs[len(chunks) - 1]["dur"]
    ms: dict[str, float] = {}
    nodes = 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > warm_end:
            op = e["args"]["op_name"]
            ms[op] = ms.get(op, 0.0) + e["dur"] * 1e-3
            nodes += 1
    images = sum(c.shape[0] for c in chunks)
    return {"kernel_ms_per_image": {k: v / images for k, v in
                                    sorted(ms.items(), key=lambda kv: -kv[1])},
            "nodes_per_image": nodes / images, "wall_ms_per_image": 1e3 * wall / images}


def format_onnx(rows: list[dict]) -> str:
    head = ["model", "batch", "blocks used", "full ms/img", "BlockDrop ms/img", "speedup",
            "FLOP bound", "share of bound"]
    out = [[r["model"], str(r["batch"]), f"{r['blocks_used']:.1f}/{r['num_blocks']}",
            f"{r['ms_per_image']['full']:.3f}", f"{r['ms_per_image']['dynamic']:.3f}",
            f"{r['speedup']:.2f}x", f"{r['flop_bound']:.2f}x",
            f"{100 * r['share_of_bound']:.0f}%"] for r in rows]
    return _table(head, out)


def format_onnx_ops(r: dict, top: int = 8) -> str:
    """The profiler's view of a batch-1 row: kernel ms per image by operator type."""
    if "ops" not in r:
        return ""
    ops = r["ops"]
    names = list(dict.fromkeys(k for m in ONNX_METHODS
                               for k in list(ops[m]["kernel_ms_per_image"])[:top]))
    rows = [[n] + [f"{ops[m]['kernel_ms_per_image'].get(n, 0.0):.3f}" for m in ONNX_METHODS]
            for n in names]
    rows.append(["all kernels"] + [f"{sum(ops[m]['kernel_ms_per_image'].values()):.3f}"
                                   for m in ONNX_METHODS])
    rows.append(["wall (profiled)"] + [f"{ops[m]['wall_ms_per_image']:.3f}"
                                       for m in ONNX_METHODS])
    rows.append(["nodes run"] + [f"{ops[m]['nodes_per_image']:.0f}" for m in ONNX_METHODS])
    title = (f"{r['model']}, batch 1, ONNX Runtime profiler: kernel ms per image by "
             "operator type")
    return title + "\n\n" + _table(["operator", "full", "BlockDrop"], rows)


# -- command line ------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m scripts.benchmark", allow_abbrev=False,
                      description="BlockDrop execution-path benchmark")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_KEEP),
                   help="models of the inference part (default: %(default)s)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                   help="batch sizes for every model (default: 1 32 256; R101_ImgNet 1 32)")
    p.add_argument("--keep", nargs="+", default=[], metavar="MODEL=N",
                   help="blocks kept per image, e.g. R110_C10=17 (defaults: "
                        + ", ".join(f"{m}={k}" for m, k in DEFAULT_KEEP.items()) + ")")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per setting")
    p.add_argument("--min-time", type=float, default=0.2,
                   help="a timed inference sample repeats calls shorter than this (s)")
    p.add_argument("--single-images", type=int, default=None,
                   help="images of the batch timed with the batch-1 forward_single loop; "
                        "batch 1 runs this many images one at a time (default: "
                        f"{SINGLE_IMAGES} on CIFAR, {SINGLE_IMAGES_LARGE} on ImageNet)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", nargs="+", default=list(DEFAULT_PARTS), choices=PARTS,
                   help="what to time (default: %(default)s; onnx only when named)")
    p.add_argument("--onnx-models", nargs="+", default=list(ONNX_MODELS),
                   help="models of the onnx part (default: %(default)s)")
    p.add_argument("--onnx-batches", nargs="+", type=int, default=list(ONNX_BATCHES),
                   help="batch sizes of the onnx part (default: %(default)s)")
    p.add_argument("--onnx-level", default="all",
                   choices=("disable", "basic", "extended", "all"),
                   help="ONNX Runtime graph optimisation level (default: %(default)s)")
    p.add_argument("--profile-models", nargs="+", default=["R110_C10", "R32_C10"])
    p.add_argument("--profile-batches", nargs="+", type=int, default=[32, 256])
    p.add_argument("--seq-models", nargs="+", default=list(SEQ_MODELS),
                   help="models of the BlockDrop-seq part (Table 2; default: %(default)s)")
    p.add_argument("--seq-batches", nargs="+", type=int, default=list(SEQ_BATCHES),
                   help="batch sizes of the BlockDrop-seq part (default: %(default)s)")
    p.add_argument("--seq-images", type=int, default=32,
                   help="images each BlockDrop-seq setting runs (at least one batch)")
    p.add_argument("--method-models", nargs="+", default=list(METHOD_MODELS),
                   help="models of the methods part (every registered learned method; "
                        "default: %(default)s)")
    p.add_argument("--method-batches", nargs="+", type=int, default=list(METHOD_BATCHES),
                   help="batch sizes of the methods part (default: %(default)s)")
    p.add_argument("--eval-models", nargs="+", default=["R110_C10"])
    p.add_argument("--eval-images", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--eval-repeats", type=int, default=3)
    p.add_argument("--cl-model", default="R110_C10")
    p.add_argument("--cl-batch", type=int, default=512)
    p.add_argument("--cl-keep-fraction", type=float, default=1.0 / 3.0,
                   help="fraction of the blocks the greedy policy keeps")
    p.add_argument("--cl-repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 repeats, 1 warm-up, batch sizes 1 and 8, 32 eval "
                        "images, curriculum batch 32, BlockDrop-seq on R32_C10 with batches "
                        "1 and 4 (explicit flags still win)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="inference copies in channels_last layout (default: as test.py on "
                        "the device, i.e. on the CPU)")
    p.add_argument("--no-fold", action="store_true",
                   help="inference copies keep BatchNorm separate (default: folded, as test.py)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast inference, CUDA only "
                                                       "(not measured yet)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="print the markdown report of a benchmark JSON (measures nothing)")
    p.add_argument("--doc", default=None, metavar="MD",
                   help="with --render: write the report between the benchmark markers of "
                        "this page (docs/speed.md) instead of printing it")
    args = p.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for flag, dest, value in (("--repeats", "repeats", 3), ("--warmup", "warmup", 1),
                                  ("--batch-sizes", "batch_sizes", [1, 8]),
                                  ("--eval-images", "eval_images", 32),
                                  ("--eval-batch", "eval_batch", 16),
                                  ("--eval-repeats", "eval_repeats", 1),
                                  ("--cl-batch", "cl_batch", 32), ("--cl-repeats", "cl_repeats", 2),
                                  ("--min-time", "min_time", 0.0),
                                  ("--single-images", "single_images", 4),
                                  ("--seq-models", "seq_models", ["R32_C10"]),
                                  ("--seq-batches", "seq_batches", [1, 4]),
                                  ("--seq-images", "seq_images", 4),
                                  ("--profile-batches", "profile_batches", [8]),
                                  ("--onnx-models", "onnx_models", ["R32_C10"]),
                                  ("--method-models", "method_models", ["R32_C10"]),
                                  ("--method-batches", "method_batches", [1, 4]),
                                  ("--onnx-batches", "onnx_batches", [1, 4])):
            if flag not in given:
                setattr(args, dest, value)
    _validate(p, args)
    return args


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in args.models + args.eval_models + args.profile_models + [args.cl_model] + \
            args.seq_models + args.onnx_models + args.method_models:
        try:
            get_spec(name)
        except ValueError as err:
            p.error(str(err))
    keep = dict(DEFAULT_KEEP)
    for item in args.keep:
        name, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            p.error(f"--keep expects MODEL=N, got {item!r}")
        try:
            k = get_spec(name).num_blocks
        except ValueError as err:
            p.error(f"--keep: {err}")
        if not 0 <= int(value) <= k:
            p.error(f"--keep {name}: N must be in [0, {k}] (K of {name}), got {value}")
        keep[name] = int(value)
    for name in args.models + args.eval_models + args.seq_models + args.profile_models + \
            args.onnx_models + args.method_models:
        if name not in keep:
            p.error(f"no default keep count for {name}; pass --keep {name}=N")
    args.keep_counts = keep
    for flag in ("repeats", "eval_repeats", "cl_repeats", "single_images", "eval_images",
                 "eval_batch", "cl_batch", "seq_images"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.min_time < 0:
        p.error(f"--min-time must be >= 0, got {args.min_time}")
    if args.min_time > 0 and args.warmup < 1:
        p.error("--min-time needs at least one --warmup round to size the samples")
    if min(args.seq_batches) < 1:
        p.error(f"--seq-batches must be at least 1, got {args.seq_batches}")
    if args.batch_sizes is not None and min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes must be at least 1, got {args.batch_sizes}")
    if min(args.onnx_batches) < 1:
        p.error(f"--onnx-batches must be at least 1, got {args.onnx_batches}")
    if min(args.profile_batches) < 1:
        p.error(f"--profile-batches must be at least 1, got {args.profile_batches}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if not 0.0 < args.cl_keep_fraction < 1.0:
        p.error(f"--cl-keep-fraction must be in (0, 1), got {args.cl_keep_fraction}")
    for problem in device_problems(args.device):
        p.error(problem)
    if args.bf16 and torch.device(args.device).type != "cuda":
        p.error("--bf16 is a GPU option; it needs --device cuda")
    for problem in _size_problems(args) + _file_problems(args):
        p.error(problem)


def _size_problems(args: argparse.Namespace) -> list[str]:
    """Counts so large that the inputs would not fit in memory."""
    found = [count_problem(f"--{flag.replace('_', '-')}", getattr(args, flag))
             for flag in ("single_images", "eval_images", "eval_batch", "cl_batch",
                          "seq_images", "repeats", "eval_repeats", "cl_repeats")]
    found.append(count_problem("--warmup", args.warmup, 0))
    for flag in ("batch_sizes", "seq_batches", "profile_batches"):
        found += [count_problem(f"--{flag.replace('_', '-')}", b)
                  for b in getattr(args, flag) or []]
    found.append(count_problem("--threads", args.threads, 1, 4096))
    found.append(number_problem("--min-time", args.min_time, 0.0))
    found.append(count_problem("--seed", args.seed, 0, 2**32 - 1))
    return [f for f in found if f]


def _file_problems(args: argparse.Namespace) -> list[str]:
    """--out must be writable; --render must be a file, --doc a page with the markers."""
    found = [file_problem("--out", args.out) if args.out else None]
    if args.doc and not args.render:
        found.append("--doc needs --render")
    if args.render and not os.path.isfile(args.render):
        found.append(f"--render {args.render}: no such file")
    if args.doc:
        found.append(_doc_problem(args.doc))
    return [f for f in found if f]


def _doc_problem(doc: str) -> str | None:
    try:
        with open(doc, encoding="utf-8") as f:
            page = f.read()
    except OSError as err:
        return f"--doc {doc}: {describe(err)}"
    places = [(BEGIN, END), *(part_markers(p) for p in PARTS)]
    if not any(begin in page and end in page for begin, end in places):
        return f"--doc {doc} has no {BEGIN} ... {END} markers"
    return file_problem("--doc", doc)


def machine_info(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(),
            "cpu": _cpu_name(), "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- tables (markdown; printed and rendered into docs/speed.md) ---------------
def _table(head: Sequence[str], rows: list[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|:---|" + "|".join("---:" for _ in head[1:]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def format_inference(rows: list[dict]) -> str:
    head = ["model", "batch", "keep", "full eager ms/img", "full ms/img", "masked", "single",
            "dynamic", "dynamic vs full", "FLOP bound", "share of bound"]
    out = []
    for r in rows:
        ms, sp = r["ms_per_image"], r["speedup"]
        out.append([r["model"], str(r["batch"]), f"{r['keep']}/{r['num_blocks']}",
                    f"{ms['full_eager']:.3f}", f"{ms['full']:.3f}", f"{ms['masked']:.3f}",
                    f"{ms['single']:.3f}", f"{ms['dynamic']:.3f}", f"{sp['dynamic']:.2f}x",
                    f"{r['flop_bound']:.2f}x", f"{100 * r['share_of_bound']:.0f}%"])
    return _table(head, out)


def format_profile(r: dict) -> str:
    paths = r["paths"]
    names = list(dict.fromkeys(k for p in paths.values() for k in p["ms_per_image"]))
    names = [n for n in names if n not in ("other", "total")] + ["other", "total"]

    def cell(path: str, name: str) -> str:
        ms = paths[path]["ms_per_image"].get(name)
        if ms is None:
            return "-"
        rate = paths[path]["gflop_per_s"].get(name)
        return f"{ms:.3f}" + (f" ({rate:.1f})" if rate else "")

    rows = [[n] + [cell(p, n) for p in paths] for n in names]
    title = (f"{r['model']}, batch {r['batch']}, keep {r['keep']}/{r['num_blocks']}: "
             "ms per image (GFLOP/s)")
    return title + "\n\n" + _table(["component"] + list(paths), rows)


def format_eval(r: dict) -> str:
    ips = r["images_per_s"]
    return (f"test.py evaluation, {r['model']}, {r['images']} images, batch {r['batch']}: "
            f"{ips['batched']:.1f} images/s; the authors' batch-1 loop {ips['authors']:.1f} "
            f"images/s; speedup {r['speedup']:.2f}x; same printed statistics: "
            f"{r['same_statistics']}")


def format_curriculum(r: dict) -> str:
    sps = r["steps_per_s"]
    return (f"Curriculum step, {r['model']} batch {r['batch']}, cl_step {r['cl_step']}, "
            f"greedy keeps {r['greedy_blocks']:.1f} blocks, sampled {r['sampled_blocks']:.1f}: "
            f"masked {sps['masked']:.3f} steps/s, fast {sps['dynamic']:.3f} steps/s, "
            f"speedup {r['speedup']:.2f}x")


def render(result: dict) -> str:
    """The markdown report of a benchmark JSON (docs/speed.md's measured section)."""
    m, st = result["machine"], result["settings"]
    fast = result.get("fast", {})
    parts = [f"Measured {m['date'][:10]} on {m['cpu']} ({m['device']}, {m['threads']} "
             f"thread(s)), torch {m['torch']}, Python {m['python']}"
             + (f", GPU {m['gpu']}" if "gpu" in m else "") + ".",
             f"Command: `python -m scripts.benchmark {' '.join(result['argv'])}`; inference "
             f"copies: BatchNorm folded: {fast.get('fold_bn')}, channels_last: "
             f"{fast.get('channels_last')}; median of {st['repeats']} interleaved rounds."]
    if "inference" in result:
        parts.append("Inference, policy network included in masked/single/dynamic; speedups "
                     "against the full ResNet with the same inference copies (`full`); "
                     "`full eager` is the ResNet as built; batch 1 runs "
                     + ", ".join(f"{r.get('images', 1)} images ({r['model']})"
                                 for r in result["inference"] if r["batch"] == 1)
                     + " one at a time, each with its own policy:\n\n"
                     + format_inference(result["inference"]))
    for r in result.get("profile", []):
        parts.append(format_profile(r))
    for r in result.get("eval", []):
        parts.append(format_eval(r) + ":\n\n```\n" + r["printed"].strip("\n") + "\n```")
    if "curriculum" in result:
        parts.append(format_curriculum(result["curriculum"]))
    if result.get("onnx"):
        parts.append("ONNX Runtime on the CPU (`--parts onnx`, docs/export.md): the exported "
                     "BlockDrop model (policy network, rows gathered and scattered per block) "
                     "against the exported full ResNet; batch 1 runs "
                     + ", ".join(f"{r['images']} images ({r['model']})"
                                 for r in result["onnx"] if r["batch"] == 1)
                     + " one at a time:\n\n" + format_onnx(result["onnx"]))
        for r in result["onnx"]:
            if r["batch"] == 1:
                parts.append(format_onnx_ops(r))
    if result.get("seq"):
        parts.append("Table 2, BlockDrop vs BlockDrop-seq (networks as built):\n\n```\n"
                     + format_seq(result["seq"]) + "\n```")
    if result.get("methods"):
        parts.append("Every registered method on inference copies (`--parts methods`; random "
                     "weights calibrated to the same usage), speed-up over the full network and "
                     "its share of the FLOP bound:\n\n```\n" + format_methods(result["methods"])
                     + "\n```")
    return "\n\n".join(parts) + "\n"


BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"


def part_markers(part: str) -> tuple[str, str]:
    """The markers of the place a run of ``part`` alone has on a page (onnx, methods)."""
    return f"<!-- benchmark:{part}:begin -->", f"<!-- benchmark:{part}:end -->"



def render_into(json_path: str, doc: str | None) -> None:
    """Print the report of ``json_path``, or replace the part of ``doc`` between the
    BEGIN and END markers with it; a run of one part alone goes between that part's
    markers (:func:`part_markers`) where the page has them."""
    result = read_json(json_path, "pass a JSON written by python -m scripts.benchmark --out",
                       lambda d: {"machine", "settings", "argv"} <= set(d))
    text = render(result)
    if doc is None:
        print(text, end="")
        return
    with open(doc, encoding="utf-8") as f:
        page = f.read()
    parts = [p for p in PARTS if p in result]
    begin, end = BEGIN, END
    if len(parts) == 1 and part_markers(parts[0])[0] in page:
        begin, end = part_markers(parts[0])
    if begin not in page or end not in page:
        raise UserError(f"{doc} has no {begin} ... {end} markers")
    head, rest = page.split(begin, 1)
    write_text(doc, head + begin + "\n" + text + end + rest.split(end, 1)[1])


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse and check the flags, then measure (or render); returns the results."""
    args = parse_args(argv)
    result: dict = {}
    code = guarded("benchmark", lambda: result.update(run(args, argv)))
    if code:
        sys.exit(code)
    return result


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> dict:
    """Every part the flags ask for; the results are written to ``--out`` at the end."""
    if args.render:
        render_into(args.render, args.doc)
        return {}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fast = FastOptions(fold_bn=not args.no_fold, channels_last=args.channels_last)
    result = {"machine": machine_info(device),
              "argv": list(argv if argv is not None else sys.argv[1:]),
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "fast": {"fold_bn": fast.fold_bn, "channels_last": fast.layout_for(device)}}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}, "
          f"inference copies: {result['fast']}")
    if "inference" in args.parts:
        rows = []
        for name in args.models:
            for batch in args.batch_sizes or DEFAULT_BATCHES.get(name, (1, 32, 256)):
                rows.append(bench_inference(
                    name, batch, args.keep_counts[name], args.repeats, args.warmup, device,
                    args.seed, args.single_images or default_single_images(name), fast, args.bf16,
                    args.min_time))
                print(format_inference(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        result["inference"] = rows
        print("Inference (median of %d):\n%s\n" % (args.repeats, format_inference(rows)))
    if "profile" in args.parts:
        result["profile"] = []
        for name in args.profile_models:
            for batch in args.profile_batches:
                r = bench_profile(name, batch, args.keep_counts[name], args.repeats, device,
                                  args.seed, fast)
                result["profile"].append(r)
                print(format_profile(r) + "\n", flush=True)
    if "eval" in args.parts:
        result["eval"] = []
        for name in args.eval_models:
            r = bench_eval(name, args.eval_images, args.eval_batch, args.keep_counts[name],
                           args.eval_repeats, device, args.seed, fast)
            result["eval"].append(r)
            print(format_eval(r) + "\n" + r["printed"])
    if "curriculum" in args.parts:
        r = bench_curriculum(args.cl_model, args.cl_batch, args.cl_keep_fraction,
                             args.cl_repeats, 1, device, args.seed, fast)
        result["curriculum"] = r
        print(format_curriculum(r))
    if "seq" in args.parts:
        rows = _grid(args.seq_models, args.seq_batches, format_seq, lambda name, batch: bench_seq(
            name, batch, args.keep_counts[name], args.repeats, args.warmup, device, args.seed,
            args.min_time, args.seq_images))
        result["seq"] = rows
        print("Table 2, BlockDrop vs BlockDrop-seq, greedy decisions, networks included "
              f"(median of {args.repeats}):\n" + format_seq(rows) + "\n")
    if "methods" in args.parts:
        rows = _grid(args.method_models, args.method_batches, format_methods,
                     lambda name, batch: bench_methods(
                         name, batch, args.keep_counts[name], args.repeats, args.warmup, device,
                         args.seed, args.min_time, args.seq_images))
        result["methods"] = rows
        print("Every registered method, greedy decisions, deciding networks included "
              f"(median of {args.repeats}):\n" + format_methods(rows) + "\n")
    if "onnx" in args.parts:
        rows = []
        for name in args.onnx_models:
            rows += bench_onnx(name, args.onnx_batches, args.keep_counts[name], args.repeats,
                               args.warmup, args.seed, args.single_images
                               or default_single_images(name), args.min_time, args.onnx_level)
        result["onnx"] = rows
        print("ONNX Runtime (CPU), exported models, policy network included (median of "
              f"{args.repeats}):\n{format_onnx(rows)}\n")
        for r in rows:
            print(format_onnx_ops(r) + "\n")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
