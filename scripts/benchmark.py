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

CPU by default; ``--device cuda`` times with CUDA events. ``--channels-last``
puts both networks in channels_last layout for every method (measured on CPU;
UNMEASURED on a GPU); ``--bf16`` autocast is CUDA-only and UNMEASURED (no GPU
was available).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from models import FlatResNet, PolicyNet, get_model, get_spec
from models.seq import MODES, SeqAgent, SeqSource, build_seq_agent, seq_pass
from models.sources import build_source
from utils.engine import curriculum_train_step, evaluate
from utils.flops import flop_counter, flop_table
from utils.rewards import greedy_policy
from utils.stats import format_eval_block, policy_stats

# blocks kept per image by the paper's models: R110 gamma=10 (16.9 of 54),
# R32 gamma=5 (6.9 of 15, Table 3), R101 gamma=5 (24.8 of 33, Table 4)
DEFAULT_KEEP = {"R110_C10": 17, "R32_C10": 7, "R101_ImgNet": 25}
DEFAULT_BATCHES = {"R110_C10": (1, 32, 256), "R32_C10": (1, 32, 256), "R101_ImgNet": (1, 32)}
METHODS = ("full", "masked", "single", "dynamic")


# -- inputs ------------------------------------------------------------------
def random_policies(batch: int, num_blocks: int, keep: int,
                    generator: torch.Generator) -> torch.Tensor:
    """(batch, K) float policies keeping exactly ``keep`` blocks per image, at random."""
    ranks = torch.rand(batch, num_blocks, generator=generator).argsort(1).argsort(1)
    return (ranks < keep).float()


def calibrate_agent(agent: PolicyNet, images: torch.Tensor, keep_fraction: float) -> None:
    """Set the bias of the policy's keep head so that its greedy policy keeps each block
    for about ``keep_fraction`` of ``images`` (a random policy net keeps ~half)."""
    with torch.no_grad():
        probs, _ = agent(images)
        logits = torch.logit(probs.double().clamp(1e-12, 1 - 1e-12))
        cut = torch.quantile(logits, 1.0 - keep_fraction, dim=0)
        agent.logit.bias.sub_(cut.to(agent.logit.bias))


def setup(name: str, device: torch.device, seed: int, channels_last: bool = False):
    """``(spec, generator, rnet, agent)``: randomly initialised models in eval mode on
    ``device`` (channels_last layout if asked) and a seeded generator for the inputs."""
    spec = get_spec(name)
    torch.manual_seed(seed)
    rnet, agent = get_model(name)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    rnet.to(device, memory_format=layout).eval()
    agent.to(device, memory_format=layout).eval()
    return spec, torch.Generator().manual_seed(seed), rnet, agent


# -- timing ------------------------------------------------------------------
class Clock:
    """Seconds taken by a call: perf_counter on CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                     clock: Clock, min_time: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each function, the calls interleaved (the order
    rotates every round so that none always follows the same neighbour). A timed
    sample repeats a call that took less than ``min_time`` in warm-up enough times
    to last about ``min_time``, so that short calls are not timed one by one."""
    names = list(fns)
    inner = {name: 1 for name in names}
    for w in range(warmup):
        for name in names:
            took = clock(fns[name])
            if w == warmup - 1 and took < min_time:
                inner[name] = max(1, round(min_time / max(took, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn, n = fns[name], inner[name]
            times[name].append(clock(lambda fn=fn, n=n: [fn() for _ in range(n)]) / n)
    return {name: statistics.median(ts) for name, ts in times.items()}


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked (UNMEASURED: written without a GPU)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- part 1: inference -------------------------------------------------------
def bench_inference(name: str, batch: int, keep: int, repeats: int, warmup: int,
                    device: torch.device, seed: int = 0, single_images: int = 32,
                    channels_last: bool = False, bf16: bool = False,
                    min_time: float = 0.0) -> dict:
    """Per-image times of every method on one model and batch size."""
    spec, gen, rnet, agent = setup(name, device, seed, channels_last)
    x = torch.rand(batch, 3, spec.image_size, spec.image_size, generator=gen).to(device)
    policy = random_policies(batch, rnet.num_blocks, keep, gen).to(device)
    n_single = min(batch, single_images)

    def single_loop():  # the authors' timing: one image at a time with its own policy
        for i in range(n_single):
            agent(x[i:i + 1])
            rnet.forward_single(x[i:i + 1], policy[i])

    fns = {
        "full": lambda: rnet.forward_full(x),
        "masked": lambda: (agent(x), rnet(x, policy)),
        "single": single_loop,
        "dynamic": lambda: (agent(x), rnet.forward_dynamic(x, policy)),
    }
    with torch.inference_mode(), autocast(device, bf16):
        med = time_interleaved(fns, repeats, warmup, Clock(device), min_time)
    per_image = {m: med[m] / (n_single if m == "single" else batch) for m in METHODS}
    table = flop_table(name)
    policy_flops = float(table.per_image(policy.cpu()).double().mean())
    return {
        "model": name, "batch": batch, "keep": keep, "num_blocks": rnet.num_blocks,
        "ms_per_image": {m: 1e3 * t for m, t in per_image.items()},
        "speedup": {m: per_image["full"] / per_image[m] for m in METHODS},
        "flop_bound": table.full_resnet / policy_flops,
        "single_images": n_single,
    }


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
               device: torch.device, seed: int = 0, channels_last: bool = False) -> dict:
    """images/s of ``utils.engine.evaluate`` and of the authors' batch-1 loop."""
    spec, gen, rnet, agent = setup(name, device, seed, channels_last)
    x = torch.rand(images, 3, spec.image_size, spec.image_size, generator=gen)
    y = torch.randint(0, spec.num_classes, (images,), generator=gen)
    calibrate_agent(agent, x[:256].to(device), keep / rnet.num_blocks)
    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=batch)
    table = flop_table(name)
    results = {}

    def batched():
        res = evaluate(rnet, agent, loader, device, flops=table, progress=False)
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
                     channels_last: bool = False) -> dict:
    """steps/s of the curriculum step (policy forward+backward+Adam included),
    every block decided, with the masked and the dynamic ResNet passes."""
    spec, gen, rnet, agent = setup(name, device, seed, channels_last)
    x = torch.rand(batch, 3, spec.image_size, spec.image_size, generator=gen).to(device)
    y = torch.randint(0, spec.num_classes, (batch,), generator=gen).to(device)
    agent.train()  # the policy trains with batch statistics
    calibrate_agent(agent, x, keep_fraction)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-4)
    usage = {}

    def step(dynamic: bool):
        noise = torch.rand(batch, rnet.num_blocks, generator=gen).to(device)
        out = curriculum_train_step(rnet, agent, x, y, noise, alpha=0.8, beta=0.1,
                                    penalty=-10.0, cl_step=rnet.num_blocks, dynamic=dynamic)
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
    with torch.no_grad():
        h = rnet.stem(images)
        for t, gate in enumerate(agent.gates):
            pooled = h.mean((2, 3))
            sd = pooled.std(0) + 1e-6
            w = torch.randn(2, pooled.shape[1], generator=generator).to(pooled) / sd
            margin = pooled @ (w[1] - w[0])
            cut = torch.quantile(margin.double(), 1.0 - keep_fraction).to(margin)
            gate.weight.copy_(w)
            gate.bias.copy_(torch.stack([cut, torch.zeros_like(cut)]))
            keep = (gate(pooled).argmax(1) == 1).to(h.dtype).view(-1, 1, 1, 1)
            residual = rnet.residual(t, h)
            h = rnet.run_block(t, h, residual) * keep + residual * (1 - keep)


def bench_seq(name: str, batch: int, keep: int, repeats: int, warmup: int,
              device: torch.device, seed: int = 0, min_time: float = 0.0,
              images: int = 32) -> dict:
    """Table 2: per-image time of the full ResNet, of BlockDrop (policy network, then
    dynamic execution; ``AgentSource.run``) and of BlockDrop-seq (``SeqSource.run``:
    its default execution, and masked and grouped forced), on the engine's own paths.
    Both policies are calibrated to keep about ``keep`` blocks per image; every method
    runs the same ``max(batch, images)`` images in batches of ``batch``, so that the
    blocks used are averaged over the same images."""
    spec, gen, rnet, agent = setup(name, device, seed)
    count = max(batch, images)
    x = torch.rand(count, 3, spec.image_size, spec.image_size, generator=gen).to(device)
    chunks = x.split(batch)
    calib = torch.rand(256, 3, spec.image_size, spec.image_size, generator=gen).to(device)
    fraction = keep / rnet.num_blocks
    calibrate_agent(agent, calib, fraction)
    seq_agent = build_seq_agent(spec).to(device).eval()
    calibrate_seq_agent(rnet, seq_agent, calib, fraction, gen)
    sources = {"blockdrop": build_source("blockdrop", spec, agent=agent),
               "seq": SeqSource(seq_agent)}
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


# -- command line ------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.benchmark", allow_abbrev=False,
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
    p.add_argument("--single-images", type=int, default=32,
                   help="images of the batch timed with the batch-1 forward_single loop")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", nargs="+", default=["inference", "eval", "curriculum", "seq"],
                   choices=["inference", "eval", "curriculum", "seq"])
    p.add_argument("--seq-models", nargs="+", default=list(SEQ_MODELS),
                   help="models of the BlockDrop-seq part (Table 2; default: %(default)s)")
    p.add_argument("--seq-batches", nargs="+", type=int, default=list(SEQ_BATCHES),
                   help="batch sizes of the BlockDrop-seq part (default: %(default)s)")
    p.add_argument("--seq-images", type=int, default=32,
                   help="images each BlockDrop-seq setting runs (at least one batch)")
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
    p.add_argument("--channels-last", action="store_true",
                   help="both networks in channels_last layout, for every method (on a "
                        "GPU: UNMEASURED)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast inference, CUDA only "
                                                       "(UNMEASURED)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
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
                                  ("--seq-images", "seq_images", 4)):
            if flag not in given:
                setattr(args, dest, value)
    _validate(p, args)
    return args


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in args.models + args.eval_models + [args.cl_model] + args.seq_models:
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
    for name in args.models + args.eval_models + args.seq_models:
        if name not in keep:
            p.error(f"no default keep count for {name}; pass --keep {name}=N")
    args.keep_counts = keep
    for flag in ("repeats", "eval_repeats", "cl_repeats", "single_images", "eval_images",
                 "eval_batch", "cl_batch", "seq_images"):
        if getattr(args, flag) < 1:
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
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if not 0.0 < args.cl_keep_fraction < 1.0:
        p.error(f"--cl-keep-fraction must be in (0, 1), got {args.cl_keep_fraction}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        p.error(f"--device: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.bf16 and device.type != "cuda":
        p.error("--bf16 is a GPU option; it needs --device cuda")


def machine_info(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_inference(rows: list[dict]) -> str:
    head = ("model        batch keep  | ms/image: full  masked  single dynamic | speedup: "
            "masked single dynamic | FLOP bound")
    lines = [head, "-" * len(head)]
    for r in rows:
        ms, sp = r["ms_per_image"], r["speedup"]
        lines.append(f"{r['model']:<12} {r['batch']:>5} {r['keep']:>2}/{r['num_blocks']:<2} |"
                     f" {ms['full']:>13.3f} {ms['masked']:>7.3f} {ms['single']:>7.3f}"
                     f" {ms['dynamic']:>7.3f} | {sp['masked']:>15.2f}x {sp['single']:>5.2f}x"
                     f" {sp['dynamic']:>6.2f}x | {r['flop_bound']:>9.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {"machine": machine_info(device),
              "argv": list(argv if argv is not None else sys.argv[1:]),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}, "
          f"layout {'channels_last' if args.channels_last else 'NCHW'}")
    if "inference" in args.parts:
        rows = []
        for name in args.models:
            batches = args.batch_sizes or DEFAULT_BATCHES.get(name, (1, 32, 256))
            for batch in batches:
                rows.append(bench_inference(
                    name, batch, args.keep_counts[name], args.repeats, args.warmup, device,
                    args.seed, args.single_images, args.channels_last, args.bf16,
                    args.min_time))
                print(format_inference(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        result["inference"] = rows
        print("Inference, policy network included in masked/single/dynamic "
              f"(median of {args.repeats}):\n" + format_inference(rows) + "\n")
    if "eval" in args.parts:
        result["eval"] = []
        for name in args.eval_models:
            r = bench_eval(name, args.eval_images, args.eval_batch, args.keep_counts[name],
                           args.eval_repeats, device, args.seed, args.channels_last)
            result["eval"].append(r)
            ips = r["images_per_s"]
            print(f"test.py evaluation, {name}, {r['images']} images: batched dynamic "
                  f"{ips['batched']:.1f} img/s, authors' batch-1 loop {ips['authors']:.1f} "
                  f"img/s, speedup {r['speedup']:.2f}x, same statistics: "
                  f"{r['same_statistics']}{r['printed'].rstrip()}\n")
    if "curriculum" in args.parts:
        r = bench_curriculum(args.cl_model, args.cl_batch, args.cl_keep_fraction,
                             args.cl_repeats, 1, device, args.seed, args.channels_last)
        result["curriculum"] = r
        sps = r["steps_per_s"]
        print(f"Curriculum step, {r['model']} batch {r['batch']}, cl_step {r['cl_step']}, "
              f"greedy keeps {r['greedy_blocks']:.1f} blocks, sampled {r['sampled_blocks']:.1f}:"
              f" masked {sps['masked']:.3f} steps/s, forward_policies {sps['dynamic']:.3f} "
              f"steps/s, speedup {r['speedup']:.2f}x")
    if "seq" in args.parts:
        rows = []
        for name in args.seq_models:
            for batch in args.seq_batches:
                rows.append(bench_seq(name, batch, args.keep_counts[name], args.repeats,
                                      args.warmup, device, args.seed, args.min_time,
                                      args.seq_images))
                print(format_seq(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        result["seq"] = rows
        print("Table 2, BlockDrop vs BlockDrop-seq, greedy decisions, networks included "
              f"(median of {args.repeats}):\n" + format_seq(rows) + "\n")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
