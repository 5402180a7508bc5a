"""The UI's charts say what they show: labelled axes, ticks, a legend, the epochs and the choice marked."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lora_core.evaluation.charts import loss_figure, metric_figure, png_bytes
from lora_core.evaluation.selection import METRICS


def _legend(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_the_loss_chart_has_step_and_loss_axes_a_learning_rate_axis_and_a_legend():
    losses, lrs = [1.0, 0.8, 0.9, 0.7, 0.75, 0.6], [1e-4, 2e-4, 3e-4, 3e-4, 2e-4, 1e-4]
    figure = loss_figure(losses, lrs, first_step=11, epoch_ends=[13], title="t0k3n, epoch 2")
    loss_axis, rate_axis = figure.axes
    assert loss_axis.get_xlabel() == "optimizer step" and loss_axis.get_ylabel() == "loss"
    assert rate_axis.get_ylabel() == "learning rate"
    assert _legend(loss_axis) == ["training loss (per step)", "learning rate", "end of an epoch"]
    steps = loss_axis.get_lines()[0].get_xdata()
    assert list(steps) == list(range(11, 17))  # the run's step numbers, not 0..n
    assert any(list(line.get_xdata()) == [13, 13] for line in loss_axis.get_lines())  # the epoch's end
    assert loss_axis.get_xticks().size > 1 and rate_axis.get_yticks().size > 1
    assert png_bytes(figure).startswith(b"\x89PNG")


def test_the_metric_chart_gives_each_metric_its_own_labelled_axis_and_marks_the_choice():
    metrics = [
        {"epoch": e, "training_loss": 1.0 / e, "heldout_loss": None, "fidelity": 0.2 * e, "burn": 0.01}
        for e in (1, 2, 3)
    ]
    figure = metric_figure(metrics, METRICS, chosen=2)
    assert [ax.get_ylabel() for ax in figure.axes] == ["training loss", "fidelity", "burn"]  # none: left out
    assert figure.axes[-1].get_xlabel() == "epoch"
    for ax in figure.axes:
        assert "chosen: epoch 2" in _legend(ax)
    assert png_bytes(figure).startswith(b"\x89PNG")


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(0.01, 10, allow_nan=False), min_size=1, max_size=40))
def test_any_loss_series_draws(losses):
    figure = loss_figure(losses, [1e-4] * len(losses))
    assert len(figure.axes[0].get_lines()[0].get_ydata()) == len(losses)
    assert png_bytes(figure, dpi=40).startswith(b"\x89PNG")
