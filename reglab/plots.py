"""Core: the plots the labs share, where the same setting gets the same color everywhere in a notebook."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

# Matplotlib's colorblind-friendly cycle; a sweep's settings take colors in the order they are listed.
PALETTE = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def colors_for(labels) -> dict:
    """{label: color}, fixed by the order of labels (so p=0 is the same blue in every plot of a lab)."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def plot_eval_curves(ax, results: dict, key: str, colors: dict | None = None, style: str = "-",
                     label_suffix: str = ""):
    """Plot an evaluated quantity (e.g. 'val_loss') against step: the mean over seeds as a line and
    the min-max band over seeds as a shaded area. results maps a label to a list of Histories."""
    colors = colors or colors_for(results)
    for label, histories in results.items():
        steps = histories[0].series(key)[0]
        values = np.array([h.series(key)[1] for h in histories], dtype=float)   # (seeds, evals)
        ax.plot(steps, values.mean(0), style, color=colors[label], label=f"{label}{label_suffix}")
        if len(histories) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=colors[label], alpha=0.2)
    ax.set_xlabel("step")
    return ax


def plot_highlighted(ax, curves: dict, chosen=None, colors: dict | None = None, style: str = "-",
                     legend: str | None = "{}", lw: float = 1.5):
    """Every setting's curves, one line per seed; with `chosen`, that setting in full color and width on
    top and every other faded in its own color, so one setting reads against the rest (the labs' sliders).

    curves maps a label to a list of (x, y), one per seed. The first seed's line carries the legend
    entry legend.format(label) (legend None: no entries). lw: line width when nothing is chosen.
    """
    colors = colors or colors_for(curves)
    for label, per_seed in curves.items():
        if chosen is None:
            width, alpha, zorder = lw, 1.0, 2
        else:
            width, alpha, zorder = (2.0, 1.0, 3) if label == chosen else (1.0, 0.25, 1)
        for i, (x, y) in enumerate(per_seed):
            name = legend.format(label) if i == 0 and legend is not None else None
            ax.plot(x, y, style, color=colors[label], lw=width, alpha=alpha, zorder=zorder, label=name)
    return ax
