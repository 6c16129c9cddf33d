"""One plot style for the book and the few plot helpers the notebooks share."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib import ticker
import pandas as pd
import seaborn as sns


def use_theme() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.figsize": (7.5, 4.2), "figure.dpi": 110, "savefig.bbox": "tight"})


def variant_styles(variants: list[str], dashed=()) -> dict[str, dict]:
    """Line styles for loss_curves: one colour per variant, in a fixed order, so a variant keeps its colour
    in every figure of a chapter; the `dashed` variants (controls, say) get dashed lines."""
    palette = (sns.color_palette("colorblind", 10) + sns.color_palette("pastel", 10)) * (1 + len(variants) // 20)
    return {v: {"color": c, **({"linestyle": "--"} if v in dashed else {})} for v, c in zip(variants, palette)}


def seed_styles(styles: dict[str, dict], seeds: list[int]) -> dict[str, dict]:
    """Styles for "<variant> s<seed>" labels: the variant's colour, one line style per seed."""
    lines = ["-", "--", ":", "-."]
    return {f"{v} s{seed}": {**style, "linestyle": lines[i % len(lines)]}
            for v, style in styles.items() for i, seed in enumerate(seeds)}


def smoothed(series: pd.Series, window: int) -> pd.Series:
    """A centred rolling mean, so noisy per-step training losses read as curves."""
    return series.rolling(window, min_periods=1, center=True).mean()


def loss_curves(ax, logs: dict[str, pd.DataFrame], column: str = "loss", window: int = 9, styles: dict | None = None,
                finals: dict[str, float] | None = None):
    """One smoothed curve per label; `logs` maps label -> a training log with `step` and `column`.
    `finals` (label -> the run's final validation loss) adds a dot in the curve's colour at its last step."""
    for label, log in logs.items():
        (line,) = ax.plot(log["step"], smoothed(log[column], window), label=label, **(styles or {}).get(label, {}))
        if finals is not None and label in finals:
            ax.plot(log["step"].iloc[-1], finals[label], "o", color=line.get_color(), markersize=5)
    ax.set_xlabel("step")
    ax.set_ylabel({"loss": "training cross-entropy", "val_loss": "validation cross-entropy"}.get(column, column))
    ax.legend(fontsize="small", ncol=2)
    return ax


def legend_outside(ax, **kwargs) -> None:
    """A legend to the right of the axes, for figures with many lines: it can never hide one."""
    ax.legend(**{"loc": "upper left", "bbox_to_anchor": (1.02, 1), "borderaxespad": 0, "fontsize": "small", **kwargs})


# ticks of a symlog percentage axis (linear within +-1): 0, +-0.5, then 1-2-5 steps both ways up to 50,000
PCT_TICKS = [0.0, -0.5, 0.5] + [sign * m * 10.0**e for e in range(5) for m in (1, 2, 5) for sign in (-1, 1)]


def halting_figure(curves: dict[str, tuple[pd.DataFrame, str]], target_pct: float):
    """The halting trade-off in two panels: (left) PPL change against MoE FLOPs saved, the target saving
    marked, the PPL axis linear within +-1% and logarithmic beyond; (right) mean hops executed against
    epsilon, on a log axis (eps = 0 left out). `curves` maps a label to (a sweep table with columns eps,
    flop_saving_pct, delta_ppl_pct and mean_hops, a line format). One legend below both panels, so it
    covers no line in either."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained")
    for label, (table, fmt) in curves.items():
        left.plot(table.flop_saving_pct, table.delta_ppl_pct, fmt, label=label)
        halted = table[table.eps > 0]
        right.plot(halted.eps, halted.mean_hops, fmt)
    left.axvline(target_pct, color="grey", lw=0.8, ls="-.", label=f"target: {target_pct:g}% of MoE FLOPs saved")
    left.set_xlabel("MoE FLOPs saved (%)")
    left.set_yscale("symlog", linthresh=1.0)  # linear within +-1%, where the claims live; large costs compressed
    left.yaxis.set_major_locator(ticker.FixedLocator(PCT_TICKS))
    left.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    left.set_ylabel("PPL change (%, linear within ±1)")
    right.set_xscale("log")
    right.set_xlabel("epsilon")
    right.set_ylabel("mean hops executed")
    fig.legend(loc="outside lower center", ncol=min(len(curves) + 1, 4), fontsize="small")
    return fig
