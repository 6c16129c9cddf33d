"""One plot style for the book and the few plot helpers the notebooks share."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib import ticker
import pandas as pd
import seaborn as sns

from .analysis.utilisation import DEAD_LOAD

# Colour-blind-safe hues (Okabe & Ito, and Tol's muted indigo, wine and teal for more arms); no yellow,
# no pastel. Arms that share a figure differ in colour or, where a hue repeats, in line style and marker.
BLUE, VERMILLION, GREEN, PURPLE, WINE = "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#882255"
ORANGE, SKY, INDIGO, TEAL, GREY, BLACK = "#E69F00", "#56B4E9", "#332288", "#44AA99", "#777777", "#000000"


def _style(color: str, linestyle: str, marker: str, key: bool = False) -> dict:
    """A line style for ax.plot; key arms (the ones a paper's headline claims are about) are drawn bold."""
    return {"color": color, "linestyle": linestyle, "marker": marker, **({"linewidth": 2.4} if key else {})}


# Equifinality: the five cosine variants solid, routing controls dashed, dense baselines black, and the
# static-expert and rank-16 versions of Wide and Deep dash-dotted and dotted.
EQUIFINALITY_STYLE = {
    "wide": _style(BLUE, "-", "o", key=True),
    "deep": _style(VERMILLION, "-", "s", key=True),
    "magnitude": _style(GREEN, "-", "^"),
    "asymmetric": _style(PURPLE, "-", "D"),
    "decoupled": _style(WINE, "-", "v"),
    "linear": _style(ORANGE, "--", "P"),
    "cosine_iso341": _style(SKY, "--", "X"),
    "rank2": _style(TEAL, "--", "<"),
    "hash": _style(GREY, "--", "x"),
    "random_fixed": _style(GREY, ":", "+"),
    "top1": _style(INDIGO, "--", ">"),
    "dense_iso_flop": _style(BLACK, ":", "h"),
    "dense_iso_param": _style(BLACK, "-.", "p"),
    "static_wide": _style(TEAL, "-.", "d"),
    "static_deep": _style(INDIGO, "-.", "*"),
    "rank16_wide": _style(BLUE, ":", "H"),
    "rank16_deep": _style(VERMILLION, ":", "8"),
}
# PathMoE: independent routers blue, PathB4 vermillion (dashed: with the balance loss), the other block
# sizes and the baselines one hue each; Indep, Indep without the loss and PathB4 (claims C1-C5) bold.
PATHMOE_STYLE = {
    "indep": _style(BLUE, "-", "o", key=True),
    "indep_nolbl": _style(SKY, "--", "v", key=True),
    "path_b4": _style(VERMILLION, "-", "s", key=True),
    "path_b4_lbl": _style(VERMILLION, "--", "d"),
    "path_b2": _style(ORANGE, "-.", "^"),
    "path_bL": _style(WINE, "-", "D"),
    "lowrank": _style(GREEN, "-", "P"),
    "monob4": _style(PURPLE, "-", "X"),
    "monob_L": _style(PURPLE, ":", "x"),
    "rand": _style(GREY, ":", "+"),
    "recurrent": _style(INDIGO, "-.", "<"),
    "xmoe": _style(TEAL, "--", ">"),
    "path_b4_xmoe": _style(TEAL, "-", "h"),
}
VARIANT_STYLE = {**EQUIFINALITY_STYLE, **PATHMOE_STYLE}  # every variant of moe_core/variants.yaml
OUTCOME_COLOR = {"agrees": BLUE, "disagrees": VERMILLION, "undecided": GREY}  # a verdict's colour


def use_theme() -> None:
    """The book's seaborn theme and figure defaults."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.figsize": (7.5, 4.2), "figure.dpi": 110, "savefig.bbox": "tight"})


def variant_style(variant: str, marker: bool = False) -> dict:
    """The variant's fixed colour and line style in every figure of the book, with its marker if asked
    (for lines with few points)."""
    return {k: v for k, v in VARIANT_STYLE[variant].items() if marker or k != "marker"}  # a copy: the mapping stays fixed


def variant_styles(variants: list[str], marker: bool = False) -> dict[str, dict]:
    """variant_style for each of `variants`, as loss_curves' `styles`."""
    return {v: variant_style(v, marker) for v in variants}


def block_label(router_block: int, n_layers: int) -> str:
    """A PathMoE router block size as every figure writes it: B=4, or B=L (8) when one router serves all layers."""
    return f"B=L ({n_layers})" if router_block == n_layers else f"B={router_block}"


def seed_styles(styles: dict[str, dict], seeds: list[int]) -> dict[str, dict]:
    """Styles for "<variant> s<seed>" labels: the variant's colour, one line style per seed."""
    lines = ["-", "--", ":", "-."]
    return {f"{v} s{seed}": {**style, "linestyle": lines[i % len(lines)]}
            for v, style in styles.items() for i, seed in enumerate(seeds)}


def smoothed(series: pd.Series, window: int) -> pd.Series:
    """A centred rolling mean, so noisy per-step training losses read as curves."""
    return series.rolling(window, min_periods=1, center=True).mean()


CROSS_ENTROPY_LABEL = {"loss": "training cross-entropy (nats/token)", "val_loss": "validation cross-entropy (nats/token)"}


def loss_curves(ax, logs: dict[str, pd.DataFrame], column: str = "loss", window: int = 9, styles: dict | None = None,
                finals: dict[str, float] | None = None, band: tuple[float, float, str] | None = None,
                outside: bool = False):
    """One smoothed curve per label; `logs` maps label -> a training log with `step` and `column`.
    `finals` (label -> the run's final validation loss) adds a dot in the curve's colour at its last step;
    `band` (low, high, label) shades a horizontal band, named in the legend; `outside` puts the legend
    right of the axes (for many lines)."""
    for label, log in logs.items():
        (line,) = ax.plot(log["step"], smoothed(log[column], window), label=label, **(styles or {}).get(label, {}))
        if finals is not None and label in finals:
            ax.plot(log["step"].iloc[-1], finals[label], "o", color=line.get_color(), markersize=5)
    if band is not None:
        low, high, label = band
        ax.axhspan(low, high, color="grey", alpha=0.2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(CROSS_ENTROPY_LABEL.get(column, column))
    if outside:
        legend_outside(ax)
    else:
        ax.legend(fontsize="small", ncol=2)
    return ax


def legend_outside(ax, **kwargs) -> None:
    """A legend to the right of the axes, for figures with many lines: it can never hide one."""
    ax.legend(**{"loc": "upper left", "bbox_to_anchor": (1.02, 1), "borderaxespad": 0, "fontsize": "small", **kwargs})


class _PlainLogFormatter(ticker.LogFormatterSciNotation):
    """Labels the ticks a log axis labels by default, written as plain numbers (3, 0.5), not as 3×10⁰."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def plain_log_ticks(axis) -> None:
    """Plain-number tick labels on a log `axis` (ax.yaxis, say), major and minor."""
    axis.set_major_formatter(_PlainLogFormatter())
    axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))


def load_reference_lines(ax) -> None:
    """On a load / uniform-load axis: the uniform load (1) and the dead-expert threshold, in the legend."""
    ax.axhline(1.0, color="black", lw=0.8, label="uniform load")
    ax.axhline(DEAD_LOAD, color="black", lw=0.8, ls=":", label=f"dead (< {DEAD_LOAD:g} × uniform)")


# ticks of a symlog percentage axis (linear within +-1): 0, +-0.5, then 1-2-5 steps both ways up to 50,000
PCT_TICKS = [0.0, -0.5, 0.5] + [sign * m * 10.0**e for e in range(5) for m in (1, 2, 5) for sign in (-1, 1)]


def halting_figure(curves: dict[str, tuple[pd.DataFrame, dict]], target_pct: float,
                   eps_marks: dict[str, float] | None = None):
    """The halting trade-off in two panels: (left) PPL change against MoE FLOPs saved, the target saving
    marked, the PPL axis linear within +-1% and logarithmic beyond; (right) mean hops executed against
    epsilon, on a log axis (eps = 0 left out), with a dotted line at each of `eps_marks` (label -> eps).
    `curves` maps a label to (a sweep table with columns eps, flop_saving_pct, delta_ppl_pct and mean_hops,
    ax.plot keywords). One legend below both panels, so it covers no line in either."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained")
    left.set_yscale("symlog", linthresh=1.0)  # linear within +-1%, where the claims live; large costs compressed
    left.set_ymargin(0.08)  # room above the largest cost for its whole marker
    right.set_xscale("log")  # both scales set before drawing, so the autoscale margins apply in their space
    for label, (table, style) in curves.items():
        left.plot(table.flop_saving_pct, table.delta_ppl_pct, label=label, **style)
        halted = table[table.eps > 0]
        right.plot(halted.eps, halted.mean_hops, **style)
    left.axvline(target_pct, color="grey", lw=0.8, ls="-.", label=f"target: {target_pct:g}% of MoE FLOPs saved")
    for label, eps in (eps_marks or {}).items():
        right.axvline(eps, color="grey", lw=1.2, ls=":", label=label)
    left.set_xlabel("MoE FLOPs saved (%)")
    left.yaxis.set_major_locator(ticker.FixedLocator(PCT_TICKS))
    left.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    left.set_ylabel("PPL change (%, linear within ±1)")
    right.set_xlabel("ε (halting threshold)")
    right.set_ylabel("mean hops executed")
    fig.legend(loc="outside lower center", ncol=min(len(curves) + 1 + len(eps_marks or {}), 4), fontsize="small")
    return fig
