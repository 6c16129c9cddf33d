"""The shared plot helpers: one fixed style per variant, legends that cover no data, and the axes of the
halting and loss figures."""
import colorsys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import to_rgb
import pandas as pd

from moe_core import plotting, variants


def test_every_variant_has_one_fixed_style():
    assert set(plotting.VARIANT_STYLE) == set(variants.variants())
    assert not set(plotting.EQUIFINALITY_STYLE) & set(plotting.PATHMOE_STYLE)


def test_arms_of_one_paper_differ_in_colour_or_line_style_and_in_marker():
    for styles in (plotting.EQUIFINALITY_STYLE, plotting.PATHMOE_STYLE):
        pairs = [(s["color"], s["linestyle"]) for s in styles.values()]
        markers = [s["marker"] for s in styles.values()]
        assert len(set(pairs)) == len(pairs) and len(set(markers)) == len(markers)


def test_no_yellow_and_no_pastel():
    for variant, style in plotting.VARIANT_STYLE.items():
        hue, lightness, saturation = colorsys.rgb_to_hls(*to_rgb(style["color"]))
        assert lightness < 0.7, variant  # pastels are light
        assert not (45 <= 360 * hue <= 70 and saturation > 0.3), variant  # yellow is unreadable on white


def test_variant_style_leaves_out_the_marker_unless_asked():
    assert "marker" not in plotting.variant_style("wide")
    assert plotting.variant_style("wide", marker=True)["marker"] == "o"
    assert plotting.variant_styles(["wide", "path_b4"])["path_b4"]["color"] == plotting.VERMILLION


def test_legend_outside_sits_right_of_the_axes():
    fig, ax = plt.subplots()
    for i in range(12):
        ax.plot([0, 1], [i, i + 1], label=f"line {i}")
    plotting.legend_outside(ax)
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 > ax.get_window_extent().x1  # wholly outside, whatever the data
    assert len(ax.get_legend().get_texts()) == 12
    plt.close(fig)


def test_loss_curves_name_the_band_and_the_unit():
    log = pd.DataFrame({"step": [1, 2, 3], "loss": [7.0, 6.5, 6.2]})
    fig, ax = plt.subplots()
    plotting.loss_curves(ax, {"wide": log}, styles=plotting.variant_styles(["wide"]), band=(6.1, 6.3, "band"))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["wide", "band"]
    assert ax.get_ylabel() == "training cross-entropy (nats/token)"
    assert ax.lines[0].get_color() == plotting.BLUE
    plt.close(fig)


def test_plain_log_ticks():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [2.5, 4.5])
    ax.set_yscale("log")
    plotting.plain_log_ticks(ax.yaxis)
    fig.canvas.draw()
    labels = {t.get_text() for t in ax.get_yticklabels(minor=True)} - {""}
    assert {"3", "4"} <= labels and not any("10" in label for label in labels)
    plt.close(fig)


def test_halting_figure_marks_the_target_and_keeps_small_costs_linear():
    sweep = pd.DataFrame({"eps": [0.0, 0.01, 0.1], "flop_saving_pct": [0.0, 20.0, 60.0],
                          "delta_ppl_pct": [0.0, 0.3, 15.0], "mean_hops": [3.0, 2.0, 1.0]})
    fig = plotting.halting_figure({"ours": (sweep, {"marker": "o"})}, target_pct=25.0, eps_marks={"paper cliff": 0.02})
    left, right = fig.axes
    assert left.get_yscale() == "symlog" and right.get_xscale() == "log"
    assert left.yaxis.get_transform().linthresh == 1.0
    assert list(right.lines[0].get_xdata()) == [0.01, 0.1]  # eps = 0 has no place on a log axis
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["ours", "target: 25% of MoE FLOPs saved", "paper cliff"]
    fig.canvas.draw()  # the tick formatter copes with every tick in view
    assert "0.5" in [t.get_text() for t in left.get_yticklabels()]
    top = left.transData.transform((60.0, 15.0))[1]  # the largest cost's marker lies wholly inside the axes
    assert left.get_window_extent().y1 - top > left.lines[0].get_markersize()
    plt.close(fig)
