"""Export a BlockDrop model to ONNX: decisions and dynamic execution in one graph.

    python -m scripts.export --model R110_C10 --load cv/finetuned/R110_C10_gamma_10/ckpt_....t7 \
        --out r110.onnx --check
    python -m scripts.export --model R110_C10 --policy distributek --k 17 \
        --base_ckpt cv/pretrained/R110_C10/pk_E_130_A_0.932.t7 --out r110_d17.onnx

``--policy`` (default: the checkpoint's agent type, else ``blockdrop``) picks the
decision part (``models.export``): ``blockdrop``, the policy network of
``--load`` (without ``--load`` it keeps every block, as test.py); ``seq``, the
BlockDrop-seq gates of ``--load``; ``firstk``/``randomk``/``distributek`` with
``--k``, a constant policy (the dropped blocks are left out of the graph). The
ResNet is the ``resnet`` of ``--load`` if it holds one, else ``--base_ckpt``
(default: the model's path under cv/pretrained/), as test.py pairs them.

``--check`` runs the file with ONNX Runtime on the CPU right after the export,
at batch 1 and at batch ``--check_images``, on random images or on the first
test images of ``--data_dir``, and compares with PyTorch (test.py's inference
copies): identical policies, identical argmax predictions, the largest logit
difference. Expected failures print one line ``scripts.export: error: <what>``.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from models import FlatResNet, get_spec
from models.export import DEFAULT_OPSET, export_onnx, exportable
from models.fast import inference_copy
from policies.registry import method_names
from utils.data import get_dataset
from utils.networks import Request, load_for_eval
from utils.errors import UserError
from utils.launch import error_path
from utils.onnx_eval import open_session, run_batch

PROG = "scripts.export"


class ExportArgsError(UserError, ValueError):
    """A bad flag of scripts.export."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", allow_abbrev=False,
                                description="Export a BlockDrop model to ONNX")
    p.add_argument("--model", required=True, help="model name, e.g. R110_C10")
    p.add_argument("--load", default=None,
                   help="BlockDrop checkpoint ('agent', optionally 'resnet')")
    p.add_argument("--base_ckpt", default=None,
                   help="pretrained base ResNet, used when --load holds no 'resnet'")
    p.add_argument("--policy", default=None, choices=method_names(),
                   help="the method that decides (default: the one the checkpoint records, "
                        "else blockdrop); a fixed policy exports as the static sub-network")
    p.add_argument("--k", type=int, default=None, help="blocks kept by a fixed policy, 1..K")
    p.add_argument("--seed", type=int, default=None, help="which random draw randomk keeps")
    p.add_argument("--threshold", type=float, default=None,
                   help="a learned method's keep threshold, moved from its default")
    p.add_argument("--out", required=True, help="the ONNX file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help="ONNX opset (default: %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="run the file with ONNX Runtime and compare with PyTorch")
    p.add_argument("--check_images", type=int, default=64,
                   help="images --check compares (default: %(default)s)")
    p.add_argument("--data_dir", default=None,
                   help="with --check: compare on the first test images of this dataset "
                        "(default: random images)")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    return p.parse_args(argv)


def validate(args: argparse.Namespace):
    """The model's spec, once the flags make sense (ExportArgsError otherwise)."""
    try:
        spec = get_spec(args.model)
    except ValueError as err:
        raise ExportArgsError(str(err)) from None
    if os.path.exists(args.out) and not args.force:
        raise ExportArgsError(f"--out {args.out} exists; pass --force to overwrite it")
    if os.path.isdir(args.out):
        raise ExportArgsError(f"--out {args.out} is a directory")
    for flag in ("load", "base_ckpt"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise ExportArgsError(f"--{flag} {path}: no such checkpoint file")
    if not 7 <= args.opset <= 23:
        raise ExportArgsError(f"--opset must be between 7 and 23, got {args.opset}")
    if args.check_images < 1:
        raise ExportArgsError(f"--check_images must be at least 1, got {args.check_images}")
    return spec


def load_models(spec, args: argparse.Namespace, log=print):
    """``(rnet, decision, source, policy FLOPs)``: the ResNet, the export's decision part
    (from the method the checkpoint records, or ``--policy``), the PyTorch policy source
    that computes the same decisions, and what deciding costs per image."""
    setup = load_for_eval(spec, Request(args.load, args.base_ckpt, args.policy, args.k,
                                        args.seed, args.threshold), log=log, say=log)
    decision = setup.method.export_decision(spec, setup.agent, setup.source)
    return setup.rnet.eval(), decision, setup.source.eval(), setup.source.policy_flops


def check_images(spec, args: argparse.Namespace) -> torch.Tensor:
    """The images ``--check`` compares on: the first test images of ``--data_dir``, or
    random ones (uniform pixels, normalised like the data when the model expects it)."""
    n = args.check_images
    if args.data_dir is not None:
        testset = get_dataset(spec, args.data_dir, train=False, download=False)
        n = min(n, len(testset))
        return torch.stack([testset[i][0] for i in range(n)])
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, spec.image_size, spec.image_size, generator=generator)
    if spec.mean is not None:
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


def check_export(path: str, rnet: FlatResNet, source, images: torch.Tensor) -> dict:
    """Run ``path`` with ONNX Runtime at batch 1 (the first images) and at the batch of
    all ``images`` and compare with PyTorch (test.py's inference copies). Returns
    ``{images, same_policies, same_predictions, max_logit_diff, max_logit}``."""
    fast_rnet = inference_copy(rnet, device=torch.device("cpu"))
    fast_source = source.eval().for_inference(device=torch.device("cpu"))
    session = open_session(path)
    singles = images[: min(8, images.shape[0])]
    torch_logits, torch_policy, ort_logits, ort_policy = [], [], [], []
    with torch.no_grad():
        for batch in [singles[i:i + 1] for i in range(singles.shape[0])] + [images]:
            logits, policy = fast_source.run(fast_rnet, batch)
            torch_logits.append(logits)
            torch_policy.append(policy.to(torch.uint8))
            out, pol = run_batch(session, batch)
            ort_logits.append(torch.from_numpy(out))
            ort_policy.append(torch.from_numpy(pol).to(torch.uint8))
    tl, ol = torch.cat(torch_logits), torch.cat(ort_logits)
    return {
        "images": int(images.shape[0]),
        "same_policies": bool(torch.equal(torch.cat(torch_policy), torch.cat(ort_policy))),
        "same_predictions": bool(torch.equal(tl.argmax(1), ol.argmax(1))),
        "max_logit_diff": float((tl - ol).abs().max()) if tl.numel() else 0.0,
        "max_logit": float(tl.abs().max()) if tl.numel() else 0.0,
        "mean_blocks": float(torch.cat(ort_policy).float().sum(1).mean()),
    }


def export_model(args: argparse.Namespace, log=print) -> dict:
    """Load, export and (``--check``) compare; returns the file's metadata and the check."""
    spec = validate(args)
    rnet, decision, source, policy_flops = load_models(spec, args, log)
    module = exportable(rnet, decision)
    meta = export_onnx(module, args.out, model=spec.name, input_size=spec.image_size,
                       opset=args.opset, mean=spec.mean, std=spec.std,
                       extra={"blockdrop.policy_flops": str(int(policy_flops))})
    log(f"wrote {args.out}: {spec.name}, method {meta['blockdrop.method']}, "
        f"K={meta['blockdrop.num_blocks']}, opset {args.opset}, "
        f"{os.path.getsize(args.out) / 2**20:.1f} MiB")
    result = {"metadata": meta}
    if args.check:
        check = check_export(args.out, rnet, source, check_images(spec, args))
        result["check"] = check
        ok = check["same_policies"] and check["same_predictions"]
        log(f"check ({check['images']} images, batch 1 and {check['images']}; ONNX Runtime "
            f"CPU vs PyTorch): policies identical: {check['same_policies']}, predictions "
            f"identical: {check['same_predictions']}, largest logit difference "
            f"{check['max_logit_diff']:.3g} (logits up to {check['max_logit']:.3g}), "
            f"{check['mean_blocks']:.2f} blocks per image")
        if not ok:
            raise ExportCheckError(f"{args.out}: ONNX Runtime disagrees with PyTorch "
                                   f"(policies identical: {check['same_policies']}, "
                                   f"predictions identical: {check['same_predictions']})")
    return result


class ExportCheckError(UserError, RuntimeError):
    """--check found the exported file disagreeing with PyTorch."""


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    with error_path(PROG, args.debug):
        return export_model(args)
    return {}


if __name__ == "__main__":
    main(sys.argv[1:])
