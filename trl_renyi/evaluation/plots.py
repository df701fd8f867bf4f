"""Plots of ``trl-renyi eval``, ``trl-renyi audit`` and ``trl-renyi demo`` (matplotlib, Agg backend, PNG files).

* reliability diagram: accuracy against confidence in equal-width bins, one panel per model (the gap to the diagonal
  is the calibration error; the grey bars show how many answers fall in each bin);
* uncertainty histograms: an uncertainty score for right and for wrong answers (a useful score separates them);
* routing heatmap: the members' responsibilities for each item (members × items, items grouped by their top member),
  or for each named row of a routing table;
* signal bars: uncertainty signals per group of items (the demo's task families);
* selective accuracy: accuracy of the most certain answers as coverage grows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from trl_renyi.evaluation.metrics import reliability_bins, risk_coverage_curve


def _save(fig, path: str | os.PathLike) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def reliability_diagram(outcomes: Mapping[str, tuple], n_bins: int, path, eces: Mapping[str, float] | None = None) -> str:
    """``outcomes``: model name → ``(confidence, correct)``."""
    fig, axes = plt.subplots(1, len(outcomes), figsize=(3.6 * len(outcomes), 3.6), squeeze=False)
    for ax, (name, (confidence, correct)) in zip(axes[0], outcomes.items(), strict=True):
        bins = reliability_bins(confidence, correct, n_bins)
        centres = [(lo + hi) / 2 for lo, hi in zip(bins["lower"], bins["upper"], strict=True)]
        width = 1.0 / n_bins
        accuracy = [0.0 if math.isnan(a) else a for a in bins["accuracy"]]
        total = max(sum(bins["count"]), 1.0)
        ax.bar(centres, [c / total for c in bins["count"]], width=width, color="0.85", label="share of answers")
        ax.bar(centres, accuracy, width=width * 0.8, color="tab:blue", alpha=0.8, edgecolor="k", label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        title = name if eces is None or name not in eces else f"{name}  (ECE {eces[name]:.3f})"
        ax.set(title=title, xlabel="confidence (max probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    axes[0][0].legend(loc="upper left", fontsize=7)
    return _save(fig, path)


def uncertainty_histograms(panels: Sequence[tuple[str, Sequence[float], Sequence[bool]]], path) -> str:
    """``panels``: ``(title, uncertainty values, correct flags)`` each; right and wrong answers overlaid."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (title, values, correct) in zip(axes[0], panels, strict=True):
        values, correct = np.asarray(values, dtype=float), np.asarray(correct, dtype=bool)
        edges = np.linspace(values.min(), max(values.max(), values.min() + 1e-6), 21)
        ax.hist(values[correct], bins=edges, alpha=0.6, color="tab:green", label=f"right ({correct.sum()})")
        ax.hist(values[~correct], bins=edges, alpha=0.6, color="tab:red", label=f"wrong ({(~correct).sum()})")
        ax.set(title=title, xlabel="uncertainty (nats)", ylabel="answers")
        ax.legend(fontsize=7)
    return _save(fig, path)


def routing_heatmap(
    responsibilities,
    member_names: Sequence[str],
    path,
    title: str = "routing",
    xlabel: str = "item",
    item_labels: Sequence[str] | None = None,
) -> str:
    """``responsibilities`` ``(N, K)``, members as rows. Unlabelled items are grouped by their top member, then by its
    weight; with ``item_labels`` (e.g. ``family/convention`` rows of a routing table) the items keep their order, are
    named on the axis and each cell shows its value."""
    r = np.asarray(responsibilities, dtype=float).reshape(-1, len(member_names))
    if item_labels is None:
        order = np.lexsort((-r.max(1), r.argmax(1))) if len(r) else np.arange(0)
        width = min(12, 2 + 0.04 * len(r) + 4)
    else:
        order = np.arange(len(r))
        width = 1.1 * len(r) + 3
    fig, ax = plt.subplots(figsize=(width, 0.5 * len(member_names) + (3.0 if item_labels is not None else 1.6)))
    image = ax.imshow(r[order].T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(member_names)), list(member_names))
    if item_labels is None:
        ax.set(title=title, xlabel=f"{xlabel} (grouped by top member)")
    else:
        ax.set_xticks(range(len(r)), list(item_labels), rotation=30, ha="right")
        ax.set(title=title, xlabel=xlabel)
        for i, j in np.ndindex(r.shape):
            ax.text(i, j, f"{r[i, j]:.2f}", ha="center", va="center", color="w" if r[i, j] < 0.6 else "k")
    fig.colorbar(image, ax=ax, label="responsibility")
    return _save(fig, path)


def signal_bars(
    names: Sequence[str], signals: Mapping[str, Sequence[float]], highlight: Sequence[bool], path, title: str
) -> str:
    """One panel of bars per signal (label → a value per name); highlighted names in red, the others in blue."""
    fig, axes = plt.subplots(1, len(signals), figsize=(4 * len(signals), 3.2), squeeze=False)
    colours = ["tab:red" if flag else "tab:blue" for flag in highlight]
    for ax, (label, values) in zip(axes[0], signals.items(), strict=True):
        ax.bar(list(names), list(values), color=colours)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    return _save(fig, path)


def selective_accuracy_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[bool]]], path) -> str:
    """``curves``: label → ``(uncertainty, correct)``; accuracy of the most certain answers against coverage."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, (uncertainty, correct) in curves.items():
        curve = risk_coverage_curve(uncertainty, correct)
        ax.plot(curve["coverage"], curve["accuracy"], label=label)
    ax.set(xlabel="coverage (share of questions answered)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title("selective accuracy (answer the most certain first)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def score_histogram(values: Sequence[float], threshold: float | None, path, xlabel: str, title: str) -> str:
    """Distribution of an audit score, with the cut-off of the listed examples."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(np.asarray(values, dtype=float), bins=30, color="tab:blue", alpha=0.8)
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label="listed above this")
        ax.legend(fontsize=7)
    ax.set(xlabel=xlabel, ylabel="examples", title=title)
    return _save(fig, path)
