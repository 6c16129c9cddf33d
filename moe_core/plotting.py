"""One plot style for the book and the few plot helpers the notebooks share."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns


def use_theme() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.figsize": (7.5, 4.2), "figure.dpi": 110, "savefig.bbox": "tight"})


def smoothed(series: pd.Series, window: int) -> pd.Series:
    """A centred rolling mean, so noisy per-step training losses read as curves."""
    return series.rolling(window, min_periods=1, center=True).mean()


def loss_curves(ax, logs: dict[str, pd.DataFrame], column: str = "loss", window: int = 9, styles: dict | None = None):
    """One smoothed curve per label; `logs` maps label -> a training log with `step` and `column`."""
    for label, log in logs.items():
        ax.plot(log["step"], smoothed(log[column], window), label=label, **(styles or {}).get(label, {}))
    ax.set_xlabel("step")
    ax.set_ylabel({"loss": "training cross-entropy", "val_loss": "validation cross-entropy"}.get(column, column))
    ax.legend(fontsize="small", ncol=2)
    return ax
