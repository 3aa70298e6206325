"""The shared plots: one setting highlighted over the others keeps every setting's color."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from reglab.plots import colors_for, plot_highlighted  # noqa: E402


def test_highlighted_setting_is_drawn_in_full_on_top_and_the_others_faded_in_their_own_colors():
    curves = {"a": [([0, 1], [1, 2]), ([0, 1], [1.5, 2.5])], "b": [([0, 1], [3, 4])]}
    colors = colors_for(curves)
    fig, ax = plt.subplots()
    plot_highlighted(ax, curves, "b", colors, legend="c = {}")
    lines = ax.get_lines()
    assert len(lines) == 3                                              # one line per seed
    a0, a1, b0 = lines
    assert a0.get_color() == a1.get_color() == colors["a"] and b0.get_color() == colors["b"]
    assert b0.get_alpha() == 1.0 and a0.get_alpha() < 0.5 and b0.get_linewidth() > a0.get_linewidth()
    assert b0.get_zorder() > a0.get_zorder()
    assert [line.get_label() for line in lines if not line.get_label().startswith("_")] == ["c = a", "c = b"]
    plt.close(fig)


def test_without_a_choice_every_setting_is_drawn_alike_and_legend_none_adds_no_entries():
    curves = {"a": [([0, 1], [1, 2])], "b": [([0, 1], [3, 4])]}
    fig, ax = plt.subplots()
    plot_highlighted(ax, curves, legend=None, lw=0.8)
    assert {(line.get_alpha(), line.get_linewidth()) for line in ax.get_lines()} == {(1.0, 0.8)}
    assert all(line.get_label().startswith("_") for line in ax.get_lines())
    plt.close(fig)
