"""Dynamic execution of a flat ResNet under per-image policies (paper Sec. 3.1, 4.3).

BlockDrop saves time only if a dropped block is not computed. The masked path
of :mod:`models.resnet` computes every block for the whole batch and selects;
the functions here compute each kept block only for the rows that keep it and
give the same result in eval mode (BatchNorm uses running statistics):

* :func:`forward_dynamic`: the policy is read in one host transfer. A batch with
  at most ``GROUP_MAX`` distinct policies (one image, or ImageNet's few dominant
  policies) is grouped by policy and each group runs its own chain of blocks.
  Otherwise, block by block, the rows that keep it are gathered, pushed through
  the block and written back; all others pass their residual on.
* :func:`forward_policies`: the same images under several policies (the greedy
  and the sampled policy of a training step) in one pass: the stem and the
  leading blocks on which all of an image's policies agree run once per image,
  the rest once per distinct (image, policy) pair.
* :func:`in_chunks`: on the CPU in eval mode, a batch is split into chunks whose
  widest activation (computed from the network's spec) fits a few MiB: large
  tensors fall out of the caches and, past glibc's mmap threshold, are
  page-faulted in anew at every allocation. Chunks compute the same function
  (float rounding may differ in the last bit, as between batch sizes).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
import torch
from torch.profiler import record_function

from .backbone import Backbone

# at most this many distinct policies in a batch: group the images by policy
GROUP_MAX = 4
_NO_SECTION = contextlib.nullcontext()


def section(name: str) -> AbstractContextManager:
    """A named range for ``torch.profiler`` (the benchmark's ``--parts profile``); free
    when no profiler runs (``record_function`` costs ~20 us even then)."""
    return record_function(name) if torch.autograd._profiler_enabled() else _NO_SECTION


# -- chunking ----------------------------------------------------------------
def chunk_size(rnet: Backbone, x: torch.Tensor, rows_per_image: float = 1.0) -> int:
    """Images per chunk for ``x``: the whole batch unless on CPU in eval mode.
    ``rows_per_image``: activation rows a block works on per image (several
    policies: one per policy; dynamic execution: the share that keeps a block)."""
    batch = x.shape[0]
    if batch <= 1 or rnet.training or x.device.type != "cpu" or rnet.cpu_chunk_bytes <= 0:
        return batch
    widest = rnet.spec.widest_activation(x.shape[-2], x.shape[-1])
    per_image = widest * x.element_size() * rows_per_image
    return max(1, min(batch, int(rnet.cpu_chunk_bytes // per_image)))


def in_chunks(rnet: Backbone, fn: Callable, x: torch.Tensor,
              rows: torch.Tensor | None = None, rows_per_image: float = 1.0):
    """``fn(x, rows)`` on chunks of ``chunk_size(rnet, x, rows_per_image)`` images (rows
    split alike), concatenated: a tensor, or a tuple of tensors concatenated each (e.g.
    logits and the policy a method took while it ran)."""
    size = chunk_size(rnet, x, rows_per_image)
    if size >= x.shape[0]:
        return fn(x, rows)
    outs = [fn(x[i:i + size], None if rows is None else rows[i:i + size])
            for i in range(0, x.shape[0], size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
    return torch.cat(outs)


# -- per-image execution -------------------------------------------------------
def forward_dynamic(rnet: Backbone, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Logits of ``x`` where each block runs only on the images whose (B, K) 0/1
    ``policy`` keeps it; equal to the masked ``rnet(x, policy)`` in eval mode."""
    with section("policy transfer"):
        keep = policy_on_host(policy, x.shape[0], rnet.num_blocks)
    if x.shape[0] == 1:  # one image: its chain of kept blocks, nothing to group or chunk
        return rnet.run_chain(x, keep[0].tolist())
    # a block's working set is the rows that keep it: chunks grow as usage falls
    usage = float(keep.float().mean()) if keep.numel() else 1.0
    return in_chunks(rnet, lambda xs, ks: _dynamic_pass(rnet, xs, ks), x, keep, max(usage, 0.25))


def _dynamic_pass(rnet: Backbone, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    with section("policy transfer"):
        groups = policy_groups(keep, GROUP_MAX)
    if groups is None:
        return rnet.head(run_blocks(rnet, rnet.stem(x), keep, 0, rnet.num_blocks))
    if len(groups) == 1:
        return rnet.run_chain(x, groups[0][0])
    out = None
    for vector, rows in groups:
        idx = rows.to(x.device, non_blocking=True)
        with section("gather"):
            xs = gather(x, idx)
        logits = rnet.run_chain(xs, vector)
        if out is None:
            out = logits.new_empty((x.shape[0],) + logits.shape[1:])
        with section("scatter"):
            out = write_rows(out, idx, logits)
    return out


def forward_policies(rnet: Backbone, x: torch.Tensor, policies: Sequence[torch.Tensor],
                     dynamic: bool = True) -> list[torch.Tensor]:
    """Logits (one (B, classes) tensor per policy) of the same images under several
    policies. ``dynamic=False`` runs the masked ``rnet(x, p)`` once per policy (the
    authors' way); ``dynamic=True`` one shared pass (module docstring)."""
    if not dynamic:
        return [rnet(x, p) for p in policies]
    if len(policies) == 0:
        return []
    keeps = [policy_on_host(p, x.shape[0], rnet.num_blocks) for p in policies]
    logits = in_chunks(rnet, lambda xs, ks: _policies_pass(rnet, xs, ks), x,
                       torch.stack(keeps, 1), len(keeps))
    return list(logits.unbind(1))


def _policies_pass(rnet: Backbone, x: torch.Tensor, keeps: torch.Tensor) -> torch.Tensor:
    """Logits (B, P, classes) of ``x`` under the (B, P, K) bool CPU policies ``keeps``."""
    batch, count = keeps.shape[:2]
    num_blocks = rnet.num_blocks
    differs = (keeps != keeps[:, :1]).any(0).any(0)  # (K,) some image's policies differ
    split = int(differs.to(torch.uint8).argmax()) if bool(differs.any()) else num_blocks
    # distinct (image, policy) rows; rows are ordered by image, then policy
    image = torch.arange(batch).repeat_interleave(count)
    pairs, inverse = torch.unique(torch.cat([image.unsqueeze(1), keeps.flatten(0, 1).long()], 1),
                                  dim=0, return_inverse=True)
    h = run_blocks(rnet, rnet.stem(x), keeps[:, 0], 0, split)
    if pairs.shape[0] != batch:
        h = gather(h, pairs[:, 0].to(h.device))
    h = run_blocks(rnet, h, pairs[:, 1:].bool(), split, num_blocks)
    return rnet.head(h).index_select(0, inverse.to(h.device)).view(batch, count, -1)


def run_blocks(rnet: Backbone, x: torch.Tensor, keep: torch.Tensor, start: int,
               stop: int) -> torch.Tensor:
    """Blocks ``start..stop-1`` on features ``x``; ``keep`` is a (B, K) bool CPU tensor
    of the rows of ``x``. Each block runs on the gathered rows that keep it."""
    batch = x.shape[0]
    if start >= stop:
        return x
    cols = keep[:, start:stop]
    counts = cols.sum(0).tolist()
    # the row indices of every block, moved to the device in one transfer
    rows = cols.t().nonzero()[:, 1].to(x.device, non_blocking=True).split(counts)
    for t in range(start, stop):
        n = counts[t - start]
        residual = rnet.residual(t, x)
        if n == 0:
            x = residual
        elif n == batch:
            x = rnet.run_block(t, x, residual)
        else:
            idx = rows[t - start]
            with section("gather"):
                xs = gather(x, idx)
                res = xs if residual is x else gather(residual, idx)
            out = rnet.run_block(t, xs, res)
            with section("scatter"):
                x = write_rows(residual, idx, out)
    return x


# -- policies and rows ---------------------------------------------------------
def run_on_rows(rnet: Backbone, t: int, h: torch.Tensor, residual: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
    """Block t on the rows of ``h`` whose (B,) ``keep`` is nonzero, written into
    ``residual`` (one host synchronisation): a block no row keeps is not computed, one
    every row keeps runs on the whole batch. The per-block step of the methods that
    decide while the network runs (BlockDrop-seq, SkipNet, ConvNet-AIG)."""
    rows = keep.detach().nonzero().view(-1)
    n = rows.numel()
    if n == 0:
        return residual
    if n == h.shape[0]:
        return rnet.run_block(t, h, residual)
    hs = gather(h, rows)
    res = hs if residual is h else gather(residual, rows)
    return write_rows(residual, rows, rnet.run_block(t, hs, res))


def check_policy(policy: torch.Tensor, batch: int, num_blocks: int, values: bool = True) -> None:
    """Raise ValueError unless ``policy`` is a (batch, K) tensor of zeros and ones.
    ``values=False`` checks type, shape and dtype only (no device computation)."""
    if not isinstance(policy, torch.Tensor):
        raise ValueError(f"policy must be a tensor of shape ({batch}, {num_blocks}), "
                         f"got {type(policy).__name__}")
    if policy.dim() != 2 or policy.shape[0] != batch or policy.shape[1] != num_blocks:
        raise ValueError(f"policy must have shape (batch={batch}, K={num_blocks}), "
                         f"got {tuple(policy.shape)}")
    if not (policy.dtype == torch.bool or policy.dtype.is_floating_point or policy.dtype in
            (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"policy must be a bool, integer or float tensor, got {policy.dtype}")
    if values and policy.dtype != torch.bool and bool(((policy != 0) & (policy != 1)).any()):
        raise ValueError("policy values must be 0 (drop) or 1 (keep)")


def policy_on_host(policy: torch.Tensor, batch: int, num_blocks: int) -> torch.Tensor:
    """Validate a (batch, K) policy and return it as a bool CPU tensor (one host sync)."""
    if isinstance(policy, torch.Tensor):
        check_policy(policy, batch, num_blocks, values=False)  # before any transfer
        policy = policy.detach().cpu()
    check_policy(policy, batch, num_blocks)
    return policy.bool()


def policy_groups(keep: torch.Tensor,
                  max_groups: int) -> list[tuple[list[bool], torch.Tensor]] | None:
    """``[(keep flags, row indices)]`` per distinct policy of ``keep`` (B, K), or None
    when there are more than ``max_groups`` distinct policies."""
    if keep.shape[0] == 0:
        return None
    if keep.shape[0] > max_groups:
        # cheap rejection: more distinct rows among the first few than allowed
        if torch.unique(keep[: 4 * max_groups], dim=0).shape[0] > max_groups:
            return None
    vectors, inverse = torch.unique(keep, dim=0, return_inverse=True)
    if vectors.shape[0] > max_groups:
        return None
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=vectors.shape[0]).tolist()
    return [(v.tolist(), rows) for v, rows in zip(vectors, order.split(counts), strict=True)]


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, idx)`` that keeps a channels_last layout channels_last."""
    if _is_nhwc(x):
        return x.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
    return x.index_select(0, idx)


def write_rows(base: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``base`` with ``rows`` written at ``idx`` along dim 0: in place when no gradient
    is built (``base`` is then an intermediate the caller owns), else a copy."""
    if torch.is_grad_enabled():
        return base.index_copy(0, idx, rows)
    if _is_nhwc(base) and _is_nhwc(rows):  # copy whole contiguous images
        base.permute(0, 2, 3, 1).index_copy_(0, idx, rows.permute(0, 2, 3, 1))
        return base
    return base.index_copy_(0, idx, rows)


def _is_nhwc(x: torch.Tensor) -> bool:
    """A 4-d tensor laid out channels_last (and not also plain contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)
