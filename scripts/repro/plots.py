"""The paper's figures and per-image views of a learned policy (paper Sec. 4.2-4.3, Figs. 3-5).

Every function takes plain arrays (per-image policies, matches, FLOPs; images through a
callable) and returns a matplotlib :class:`~matplotlib.figure.Figure` built without
pyplot, so importing this module changes no global state; :func:`save` writes a PNG.

* :func:`usage_histogram`: blocks used per image;
* :func:`keep_rates`: the fraction of images that keep each block;
* :func:`accuracy_by_blocks`: accuracy of the images using each number of blocks;
* :func:`flops_vs_accuracy`: Figure 3, accuracy against FLOPs with per-image FLOPs std;
* :func:`dominant_policies`: Figure 4, per class the most frequent policies and their images;
* :func:`fewest_most_blocks`: Figure 5, per class the images using the fewest/most blocks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

ImageFn = Callable[[int], np.ndarray]  # image index -> (H, W, 3) uint8
STAGE_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3")
POINT_STYLES: dict[str, dict] = {  # Figure 3 markers by kind of point
    "ours": dict(marker="o", color="#1f77b4", markersize=7, capsize=4, linestyle="none"),
    "full": dict(marker="s", color="black", markersize=7, capsize=0, linestyle="none"),
    "paper": dict(marker="*", color="#d62728", markersize=11, capsize=3, linestyle="none",
                  alpha=0.8),
    "paper_full": dict(marker="X", color="#7f7f7f", markersize=9, capsize=0, linestyle="none"),
}


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str) -> str:
    """Write ``fig`` as a PNG (parent folders created); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def usage_histogram(usage: np.ndarray, num_blocks: int, title: str) -> Figure:
    """Histogram of the number of blocks each image uses."""
    usage = np.asarray(usage, dtype=np.int64)
    counts = np.bincount(usage, minlength=num_blocks + 1)
    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    ax.bar(np.arange(num_blocks + 1), counts, width=0.85, color=STAGE_COLOURS[0])
    ax.axvline(usage.mean(), color="black", linestyle="--",
               label=f"mean {usage.mean():.2f} ± {usage.std(ddof=1) if usage.size > 1 else 0:.2f}")
    ax.set(xlabel=f"blocks used (of {num_blocks})", ylabel="images", title=title,
           xlim=(-0.8, num_blocks + 0.8))
    ax.legend(loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def keep_rates(policies: np.ndarray, layers: Sequence[int], title: str) -> Figure:
    """Bar per block: the fraction of images whose policy keeps it, coloured by stage."""
    rates = np.asarray(policies, dtype=np.float64).mean(0)
    stage = np.repeat(np.arange(len(layers)), layers)
    fig = new_figure(max(7, 0.16 * len(rates) + 3), 4)
    ax = fig.add_subplot()
    for s in range(len(layers)):
        idx = np.flatnonzero(stage == s)
        ax.bar(idx, rates[idx], width=0.85, color=STAGE_COLOURS[s % len(STAGE_COLOURS)],
               label=f"stage {s + 1} ({layers[s]} blocks)")
    ax.set(xlabel="block (in execution order)", ylabel="fraction of images keeping it",
           title=title, ylim=(0, 1.05), xlim=(-0.8, len(rates) - 0.2))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def accuracy_by_blocks(usage: np.ndarray, matches: np.ndarray, num_blocks: int,
                       title: str) -> Figure:
    """Accuracy of the images grouped by the number of blocks they use, with their counts."""
    usage = np.asarray(usage, dtype=np.int64)
    matches = np.asarray(matches, dtype=np.float64)
    values = np.unique(usage)
    acc = np.array([matches[usage == v].mean() * 100 for v in values])
    count = np.array([(usage == v).sum() for v in values])
    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    ax.bar(values, count, width=0.85, color="#cccccc", label="images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel=f"blocks used (of {num_blocks})", ylabel="images", title=title,
           xlim=(-0.8, num_blocks + 0.8))
    ax2 = ax.twinx()
    ax2.plot(values, acc, "o-", color="#C44E52", label="accuracy")
    ax2.set(ylabel="accuracy (%)", ylim=(0, 105))
    ax2.axhline(matches.mean() * 100, color="#C44E52", linestyle=":",
                label=f"overall {matches.mean() * 100:.1f}%")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax2.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="lower right", fontsize=8)
    return fig


LABEL_HEIGHTS = (5, -13, 15, -23)  # points above (+) or below (-) a Figure 3 marker


@dataclass(frozen=True)
class Point:
    """A point of Figure 3: ``kind`` picks the marker (see POINT_STYLES)."""

    label: str
    flops: float
    accuracy: float  # percent
    flops_std: float = 0.0
    kind: str = "ours"


def flops_vs_accuracy(points: Sequence[Point], title: str) -> Figure:
    """Figure 3: accuracy against FLOPs per image, error bars = per-image FLOPs std."""
    fig = new_figure(8.5, 5)
    ax = fig.add_subplot()
    shown = set()
    # labels at four heights, by FLOPs order, so that neighbouring points' labels clear
    rank = {i: r for r, i in enumerate(sorted(range(len(points)), key=lambda i: points[i].flops))}
    for i, p in enumerate(points):
        style = dict(POINT_STYLES[p.kind])
        legend = {"ours": "ours", "full": "full ResNet (ours)", "paper": "paper",
                  "paper_full": "full ResNet (paper)"}[p.kind]
        ax.errorbar([p.flops], [p.accuracy], xerr=[p.flops_std] if p.flops_std else None,
                    label=None if legend in shown else legend, **style)
        shown.add(legend)
        ax.annotate(p.label, (p.flops, p.accuracy), textcoords="offset points",
                    xytext=(6, LABEL_HEIGHTS[rank[i] % len(LABEL_HEIGHTS)]), fontsize=8,
                    color=style["color"])
    ax.set(xlabel="FLOPs per image", ylabel="accuracy (%)", title=title)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    ax.margins(x=0.22, y=0.15)  # room for the labels of the rightmost points
    return fig


def _montage(images: list[np.ndarray], cols: int, pad: int = 2) -> np.ndarray:
    """Images (same size) in a grid of ``cols`` columns on a white background."""
    h, w = images[0].shape[:2]
    rows = max(1, -(-len(images) // cols))
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = img
    return out


def _policy_groups(policies: np.ndarray, members: np.ndarray, top: int):
    """The ``top`` most frequent policies among ``members``: (policy, member indices)."""
    uniq, inverse, counts = np.unique(policies[members], axis=0, return_inverse=True,
                                      return_counts=True)
    inverse = np.asarray(inverse).reshape(-1)
    order = np.argsort(-counts, kind="stable")[:top]
    return [(uniq[o], members[inverse == o]) for o in order]


def dominant_policies(image: ImageFn, labels: np.ndarray, policies: np.ndarray,
                      class_names: Sequence[str], classes: Sequence[int], top: int = 3,
                      per_policy: int = 8, title: str = "") -> Figure:
    """Figure 4: for each class, its ``top`` most frequent policies, each drawn as a strip
    (dark = block kept) above a grid of images that take it."""
    policies = np.asarray(policies)
    cols = min(4, per_policy)
    fig = new_figure(3.2 * top, 2.4 * len(classes) + 0.6)
    grid = fig.add_gridspec(2 * len(classes), top, height_ratios=[1, 8] * len(classes),
                            hspace=0.25, wspace=0.15)
    for row, cls in enumerate(classes):
        members = np.flatnonzero(np.asarray(labels) == cls)
        groups = _policy_groups(policies, members, top) if members.size else []
        for col in range(top):
            strip = fig.add_subplot(grid[2 * row, col])
            ax = fig.add_subplot(grid[2 * row + 1, col])
            for a in (strip, ax):
                a.set_xticks([])
                a.set_yticks([])
            if col == 0:
                ax.set_ylabel(class_names[cls], fontsize=10)
            if col >= len(groups):
                ax.axis("off")
                strip.axis("off")
                continue
            policy, idx = groups[col]
            strip.imshow(policy[None, :].astype(float), cmap="Greys", vmin=0, vmax=1,
                         aspect="auto")
            strip.set_title(f"policy {col + 1}: {plural(len(idx), 'image')}, "
                            f"{int(policy.sum())}/{policy.size} blocks kept", fontsize=8)
            ax.imshow(_montage([image(int(i)) for i in idx[:per_policy]], cols))
            ax.set_anchor("N")
    fig.suptitle(title or "Dominant policies per class (strip: dark = block kept)")
    return fig


def fewest_most_blocks(image: ImageFn, labels: np.ndarray, usage: np.ndarray,
                       class_names: Sequence[str], classes: Sequence[int], n: int = 4,
                       title: str = "") -> Figure:
    """Figure 5: per class, the ``n`` images using the fewest blocks and the ``n`` using
    the most, each titled with its block count."""
    usage = np.asarray(usage)
    fig = new_figure(1.3 * (2 * n + 1), 1.45 * len(classes) + 0.8)
    grid = fig.add_gridspec(len(classes), 2 * n + 1, width_ratios=[1] * n + [0.3] + [1] * n,
                            hspace=0.5, wspace=0.1)
    for row, cls in enumerate(classes):
        members = np.flatnonzero(np.asarray(labels) == cls)
        order = members[np.argsort(usage[members], kind="stable")]
        few = order[:min(n, -(-len(order) // 2))]  # a small class splits its images
        picks = [few, order[::-1][:min(n, len(order) - len(few))]]
        for side, chosen in enumerate(picks):
            for j in range(n):
                ax = fig.add_subplot(grid[row, j + side * (n + 1)])
                ax.set_xticks([])
                ax.set_yticks([])
                if side == 0 and j == 0:
                    ax.set_ylabel(class_names[cls], fontsize=9)
                if j >= len(chosen):
                    ax.axis("off")
                    continue
                ax.imshow(image(int(chosen[j])))
                ax.set_title(plural(int(usage[chosen[j]]), "block"), fontsize=8)
    fig.text(0.28, 0.995, "fewest blocks", ha="center", va="top", fontsize=11)
    fig.text(0.76, 0.995, "most blocks", ha="center", va="top", fontsize=11)
    fig.suptitle(title or "Images using the fewest and the most blocks per class", y=1.04)
    return fig


def pick_classes(labels: np.ndarray, limit: int, wanted: Sequence[int] | None = None
                 ) -> list[int]:
    """``wanted`` classes, or the first ``limit`` classes present in ``labels``."""
    present = [int(c) for c in np.unique(np.asarray(labels))]
    if wanted:
        return [int(c) for c in wanted]
    return present[:limit]


def ours_vs_paper_bars(groups: Sequence[str], ours: Sequence[float | None],
                       paper: Sequence[float | None], ylabel: str, title: str,
                       ours_err: Sequence[float | None] | None = None) -> Figure:
    """Paired bars per group (a table row): our value beside the paper's (hatched)."""
    x = np.arange(len(groups))
    nan = float("nan")

    def clean(values):
        return [nan if v is None else float(v) for v in values]
    err = None if ours_err is None else [0.0 if e is None else float(e) for e in ours_err]
    fig = new_figure(max(6.5, 0.75 * len(groups) + 2), 4.5)
    ax = fig.add_subplot()
    ax.bar(x - 0.2, clean(ours), 0.4, yerr=err, capsize=3, color="#4C72B0", label="ours")
    ax.bar(x + 0.2, clean(paper), 0.4, color="white", edgecolor="#C44E52", hatch="//",
           label="paper")
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
