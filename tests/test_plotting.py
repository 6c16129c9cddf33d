"""The shared plot helpers: legends that cover no data, and the halting figure's axes."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from moe_core import plotting


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


def test_halting_figure_marks_the_target_and_keeps_small_costs_linear():
    sweep = pd.DataFrame({"eps": [0.0, 0.01, 0.1], "flop_saving_pct": [0.0, 20.0, 60.0],
                          "delta_ppl_pct": [0.0, 0.3, 15.0], "mean_hops": [3.0, 2.0, 1.0]})
    fig = plotting.halting_figure({"ours": (sweep, "o-")}, target_pct=25.0)
    left, right = fig.axes
    assert left.get_yscale() == "symlog" and right.get_xscale() == "log"
    assert left.yaxis.get_transform().linthresh == 1.0
    assert list(right.lines[0].get_xdata()) == [0.01, 0.1]  # eps = 0 has no place on a log axis
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["ours", "target: 25% of MoE FLOPs saved"]
    fig.canvas.draw()  # the tick formatter copes with every tick in view
    assert "0.5" in [t.get_text() for t in left.get_yticklabels()]
    plt.close(fig)
