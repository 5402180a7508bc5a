"""Checkpoint selection: each metric on constructed images, and the decision rules on synthetic series."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import ImageEnhance, ImageFilter

from lora_core.config.lora_config import LoraConfig
from lora_core.config.settings import SelectionSettings
from lora_core.evaluation.metrics import burn_score, copy_distance, diversity, fidelity, leave_one_out_ceiling
from lora_core.evaluation.selection import NO_SIGNAL, EpochMetrics, guards, resume_config, select, verdict_note
from tests.unit.test_crop import jpeg


def test_identical_samples_have_no_diversity_and_different_ones_do(portraits):
    image = portraits["astronaut"]
    assert diversity([image, image.copy(), image.copy()]) == 0.0
    varied = diversity([image, portraits["obama-1"], portraits["obama-2"]])
    assert varied > 0.1
    assert diversity([image, image.filter(ImageFilter.GaussianBlur(1))]) < varied


def test_a_cooked_sample_burns_and_the_base_itself_does_not(portraits):
    base = portraits["astronaut"]
    assert burn_score(base, base) == 0.0
    blurred = base.filter(ImageFilter.GaussianBlur(3))
    saturated = ImageEnhance.Color(base).enhance(2.5)
    blocky = jpeg(base, 8)
    for cooked in (blurred, saturated, blocky):
        assert burn_score(cooked, base) > 0.1
    cooked_base = jpeg(ImageEnhance.Color(blurred).enhance(2.5), 8)
    assert 0.0 <= burn_score(base, cooked_base) < 0.01, "cleaner than the base: no burn (a trace of clipping)"
    assert burn_score(ImageEnhance.Color(blurred).enhance(2.5), base) > burn_score(blurred, base)


def test_a_sample_that_is_a_training_photo_is_a_copy(portraits):
    photos = [portraits["obama-1"], portraits["obama-2"]]
    assert copy_distance([portraits["astronaut"], portraits["obama-2"].resize((313, 600))], photos) <= 6
    assert copy_distance([portraits["astronaut"]], photos) > 6


@given(seed=st.integers(0, 2**32 - 1), count=st.integers(3, 12), spread=st.floats(0.05, 1.0))
def test_fidelity_is_one_when_samples_are_like_the_photos_and_low_when_unrelated(seed, count, spread):
    rng = np.random.default_rng(seed)
    subject = rng.normal(size=128)
    photos = subject + rng.normal(size=(count, 128)) * spread
    ceiling = leave_one_out_ceiling(photos)
    assert 0 < ceiling <= 1
    like = fidelity(subject + rng.normal(size=(count, 128)) * spread, photos)
    unrelated = fidelity(rng.normal(size=(count, 128)), photos)
    assert unrelated < 0.5 < like


def fidelity_series(values: list[float], guards_at: dict[int, dict] | None = None) -> list[EpochMetrics]:
    guards_at = guards_at or {}
    return [EpochMetrics(epoch=i + 1, fidelity=v, **guards_at.get(i + 1, {})) for i, v in enumerate(values)]


increasing = st.lists(st.floats(0.05, 1.0), min_size=2, max_size=12, unique=True).map(sorted)


@given(values=increasing)
def test_monotone_fidelity_with_no_guard_picks_the_last_epoch(values):
    selection = select(fidelity_series(values))
    assert selection.chosen_epoch == len(values)
    assert selection.verdict in ("good", "undertrained")


@given(values=increasing, data=st.data())
def test_a_guard_firing_from_epoch_k_picks_an_epoch_before_k(values, data):
    assume(len(values) >= 2)
    k = data.draw(st.integers(2, len(values)))
    guard = data.draw(st.sampled_from([{"copy_distance": 2}, {"diversity": 0.2}, {"preservation": 0.5}, {"burn": 1.0}]))
    series = [EpochMetrics(epoch=i + 1, fidelity=v, **(guard if i + 1 >= k else {})) for i, v in enumerate(values)]
    selection = select(series)
    assert selection.chosen_epoch < k and selection.verdict == "overtrained"
    best = max(values[: k - 1])
    assert values[selection.chosen_epoch - 1] >= 0.95 * best, "within the band of the best before the guard"
    assert any(f"epoch {k}:" in reason for reason in selection.reasons)


@given(values=increasing)
def test_fidelity_still_rising_clearly_at_the_end_is_undertrained(values):
    assume(len(values) >= 2 and (values[-1] - values[-2]) / values[-1] > 0.02)
    selection = select(fidelity_series(values))
    assert selection.verdict == "undertrained" and selection.chosen_epoch == len(values)
    assert any("train more" in reason for reason in selection.reasons)


def test_a_plateau_is_good_and_a_decline_picks_the_peak():
    assert select(fidelity_series([0.5, 0.8, 0.9, 0.9])).verdict == "good"
    declining = select(fidelity_series([0.5, 0.9, 0.8, 0.7]))
    assert declining.chosen_epoch == 2 and declining.verdict == "good"


def test_the_band_prefers_the_earlier_epoch_before_a_guard():
    series = fidelity_series([0.5, 0.93, 0.96, 0.99, 1.0], {5: {"burn": 0.9}})
    selection = select(series)
    assert selection.chosen_epoch == 3  # 0.96 >= 0.95 * 0.99; 0.93 is not
    assert "samples look burnt" in " ".join(selection.reasons)


def test_the_demo_case_training_image_loss_alone_needs_review_and_never_resumes(tmp_path):
    """The demo: no face in any render, the loss on the training images still falling. It was called
    undertrained and resumed twice, towards overtraining; that loss cannot show either way."""
    series = [EpochMetrics(epoch=e, training_loss=loss) for e, loss in enumerate([0.30, 0.20, 0.15, 0.14], 1)]
    selection = select(series)
    assert selection.verdict == "needs_review" and selection.chosen_epoch == 4  # the same epoch as before
    assert NO_SIGNAL in selection.reasons and "contact sheets" in NO_SIGNAL
    assert {"fidelity", "heldout_loss"} <= set(selection.unavailable) and "training_loss" not in selection.unavailable
    config = LoraConfig()
    assert resume_config(config, selection.verdict, 1, tmp_path / "t-000004.safetensors") is None
    assert resume_config(config, "undertrained", 1, tmp_path / "t-000004.safetensors") is not None
    assert verdict_note(selection.verdict, 4, tmp_path / "t-000004.safetensors", 0, 2) is None


def test_with_nothing_measured_the_last_epoch_is_kept_for_review():
    selection = select([EpochMetrics(epoch=e) for e in (1, 2, 3)])
    assert selection.chosen_epoch == 3 and selection.verdict == "needs_review"
    assert len(selection.unavailable) == 7 and selection.metrics[0]["fidelity"] is None


def test_a_guard_without_fidelity_is_still_overtrained():
    """The guards need no subject embedding: a copy or a collapse is evidence, and never resumes anyway."""
    series = [EpochMetrics(epoch=e, training_loss=0.3 - 0.05 * e) for e in (1, 2, 3)]
    series[2] = EpochMetrics(epoch=3, training_loss=0.15, diversity=0.1)
    selection = select(series)
    assert selection.verdict == "overtrained" and selection.chosen_epoch < 3


def heldout_series(losses: list[float], training: float = 0.5, **guards_at: dict) -> list[EpochMetrics]:
    """Held-out losses per epoch; the training images' loss keeps falling meanwhile, as it always does."""
    return [
        EpochMetrics(epoch=e, heldout_loss=loss, training_loss=training / e, **guards_at.get(f"e{e}", {}))
        for e, loss in enumerate(losses, 1)
    ]


def test_the_heldout_loss_still_falling_at_the_end_is_undertrained_and_resumes(tmp_path):
    selection = select(heldout_series([0.30, 0.25, 0.22, 0.20]))
    assert selection.verdict == "undertrained" and selection.chosen_epoch == 4  # 10% lower in the last epoch
    assert any("held-out loss still improved" in reason for reason in selection.reasons)
    assert resume_config(LoraConfig(), selection.verdict, 1, tmp_path / "t-000004.safetensors") is not None
    flat = select(heldout_series([0.30, 0.25, 0.22, 0.219]))
    assert flat.verdict == "good" and flat.chosen_epoch == 4


def test_the_heldout_minimum_starts_the_band_and_a_rise_out_of_it_is_overtrained():
    # Lowest at epoch 3; epoch 4 is within 95% of it, epoch 5 is not: the band is 3-4, the latest chosen.
    selection = select(heldout_series([0.30, 0.22, 0.20, 0.205, 0.24]))
    assert selection.chosen_epoch == 4 and selection.verdict == "overtrained"
    assert any("rose from 0.2000 (epoch 3) to 0.2400 (epoch 5)" in reason for reason in selection.reasons)
    settled = select(heldout_series([0.30, 0.22, 0.20, 0.205, 0.207]))
    assert settled.chosen_epoch == 5 and settled.verdict == "good"
    # The band ends at the first epoch out of it, even if a later one dips back in.
    assert select(heldout_series([0.30, 0.20, 0.25, 0.205])).chosen_epoch == 2


def test_a_guard_bounds_the_heldout_band():
    selection = select(heldout_series([0.30, 0.20, 0.205, 0.206], e4={"burn": 0.9}))
    assert selection.verdict == "overtrained" and selection.chosen_epoch == 3
    assert "samples look burnt" in " ".join(selection.reasons)


def test_fidelity_outranks_the_heldout_loss_and_the_heldout_loss_outranks_the_training_images():
    both = [
        EpochMetrics(epoch=m.epoch, heldout_loss=m.heldout_loss, fidelity=f)
        for m, f in zip(heldout_series([0.30, 0.25, 0.20]), [0.5, 0.9, 0.8], strict=True)
    ]
    assert select(both).chosen_epoch == 2 and select(both).verdict == "good"
    rising = select(heldout_series([0.20, 0.25, 0.30]))  # the training images' loss falls all along
    assert rising.verdict == "overtrained" and rising.chosen_epoch == 1
    assert any("held-out loss" in reason for reason in rising.reasons)


@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=10))
def test_the_heldout_loss_never_leaves_a_run_for_review_and_chooses_within_the_band(losses):
    selection = select(heldout_series(losses))
    assert selection.verdict in ("good", "undertrained", "overtrained")
    lowest = min(losses)
    minimum = losses.index(lowest) + 1
    assert selection.chosen_epoch >= minimum and losses[selection.chosen_epoch - 1] <= lowest / 0.95 * (1 + 1e-9)


def test_a_guard_from_the_first_epoch_picks_epoch_one():
    selection = select(fidelity_series([0.5, 0.6], {1: {"diversity": 0.1}}))
    assert selection.chosen_epoch == 1 and selection.verdict == "overtrained"


@pytest.mark.parametrize(
    ("metrics", "name"),
    [
        ({"copy_distance": 6}, "a near copy"),
        ({"diversity": 0.49}, "samples look alike"),
        ({"preservation": 0.11}, "the LoRA bleeds"),
        ({"burn": 0.26}, "samples look burnt"),
    ],
)
def test_each_guard_fires_at_its_threshold_and_not_below(metrics, name):
    rules = SelectionSettings()
    (sentence,) = guards(EpochMetrics(epoch=1, **metrics), rules)
    assert sentence.startswith(f"{name}:")
    key, value = next(iter(metrics.items()))
    safe = {"copy_distance": 7, "diversity": 0.5, "preservation": 0.1, "burn": 0.25}[key]
    assert guards(EpochMetrics(epoch=1, **{key: safe}), rules) == []
    assert value != safe
