"""Exported BlockDrop models under ONNX Runtime (docs/export.md).

:func:`evaluate_onnx` runs an exported model (``python -m scripts.export``) over a
DataLoader and returns what ``utils.engine.evaluate`` collects (policies,
matches) plus the logits, so that ``utils.stats.policy_stats`` and
``format_eval_block`` print the block of test.py for it. The file's metadata is
checked first: a file that is not an ONNX model, or one exported for another
model or input size, stops with one line naming the file and the mismatch.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from models.export import INPUT_NAME, ExportError, check_metadata
from utils.errors import UserError

OPT_LEVELS = ("disable", "basic", "extended", "all")


class OnnxModelError(UserError, ValueError):
    """An ONNX file that cannot be used: not ONNX, another model, or refused by the runtime."""


def check_onnx(path: str, spec) -> dict[str, str]:
    """The metadata of ``path`` once it is known to be an export of ``spec``'s model
    and input size; OnnxModelError otherwise."""
    try:
        return check_metadata(path, spec.name, spec.image_size)
    except ExportError as err:
        raise OnnxModelError(str(err)) from None


def open_session(path: str, threads: int | None = None, level: str = "all",
                 profile_prefix: str | None = None):
    """An ONNX Runtime CPU session on ``path``: ``threads`` intra-op threads (None: the
    runtime's default), one inter-op thread, graph optimisation ``level`` (one of
    OPT_LEVELS), profiling into ``profile_prefix*.json`` when given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - the runtime raises its own exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OnnxModelError(f"{path}: ONNX Runtime cannot load it ({first})") from None


def run_batch(session, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, policy)`` of one batch of images (N, 3, H, W) float32."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    logits, policy = session.run(None, {INPUT_NAME: np.ascontiguousarray(images, np.float32)})
    return logits, policy


def evaluate_onnx(path: str, spec, loader: Iterable,
                  threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the exported model ``path`` of ``spec`` over ``loader`` (batches of
    ``(images, targets)``) with ONNX Runtime on the CPU. Returns ``(policies uint8
    (N, K), matches float (N,), logits float (N, classes))``, after checking the
    file's metadata (OnnxModelError naming the file and the mismatch)."""
    check_onnx(path, spec)
    session = open_session(path, threads)
    policies, matches, logits = [], [], []
    for images, targets in loader:
        out, policy = run_batch(session, images)
        out = torch.from_numpy(out)
        logits.append(out)
        policies.append(torch.from_numpy(policy).to(torch.uint8))
        matches.append((out.argmax(1) == torch.as_tensor(targets).reshape(-1)).float())
    if not logits:
        return (torch.zeros(0, spec.num_blocks, dtype=torch.uint8), torch.zeros(0),
                torch.zeros(0, spec.num_classes))
    return torch.cat(policies), torch.cat(matches), torch.cat(logits)


def per_image_flops(meta: dict[str, str], table, policies: torch.Tensor) -> np.ndarray:
    """FLOPs of each image as test.py counts them: the ResNet under its policy
    (``table``: ``utils.flops.flop_table``) plus what deciding costs: the cost of
    each block the image ran where the file records one (``blockdrop.block_decision_flops``,
    ACT's halting units), else ``blockdrop.policy_flops`` of the file's metadata."""
    per_block = meta.get("blockdrop.block_decision_flops")
    if per_block is not None:
        costs = torch.tensor([int(v) for v in per_block.split(",")], dtype=torch.int64)
        decide = policies.to(torch.int64) @ costs
    else:
        decide = int(meta.get("blockdrop.policy_flops", "0"))
    return (table.per_image(policies, include_policy=False) + decide).numpy()
