"""Checkpoint selection: which epoch a careful person would pick, and whether the run needs more.

The seed's author: "It's HARD TO PICK ONE!!! But must be done." Every epoch
gets a row of metrics, each a number with a definition, or None where it
cannot be computed (never 0 in its place):

- validation_loss: the trainer's deterministic loss on the training images
  (fixed timesteps, noise and seed). Its minimum marks where the usable band
  starts, not the best epoch.
- fidelity: similarity of the samples' subject to the training photos, over
  the ceiling the photos themselves reach (their leave-one-out similarity to
  their own centroid), so 1.0 means "as alike as the photos are to each other".
- Guards against overtraining, because fidelity alone rewards it (DreamBooth's
  ablation: the overfit model scores higher on DINO/CLIP-I):
  copy (a sample nearly identical to one training photo: memorisation),
  diversity (the spread across seeds of one prompt, over the base model's: the
  seed's "the preview images after a while start to be all the same"),
  preservation (class-prompt samples without the token drifting towards the
  subject: the LoRA bleeds), burn (saturation, clipping, lost texture and
  blockiness relative to the base model's samples at the same seed: the seed's
  "pixelated made of clay").

`lora_core.metrics` measures them; this module only judges. The decision
(`select`) is a few documented rules over these series, so it can be tested on
synthetic ones and explained in plain words; `metric_chart` draws them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from lora_core.config import LoraConfig
from lora_core.settings import SelectionSettings

__all__ = ["EpochMetrics", "Selection", "guards", "metric_chart", "resume_config", "select", "verdict_note"]


# --- Decision --------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch's numbers; None where a metric cannot be computed (reported unavailable, never 0)."""

    epoch: int
    validation_loss: float | None = None
    fidelity: float | None = None
    copy_distance: int | None = None
    diversity: float | None = None  # relative to the base model's at the same seeds
    preservation: float | None = None  # class-prompt drift towards the subject, relative to the base model's
    burn: float | None = None


@dataclass
class Selection:
    """The verdict, the chosen epoch, and why, in plain words with the numbers."""

    verdict: str  # overtrained | undertrained | good
    chosen_epoch: int
    reasons: list[str]
    metrics: list[dict] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def guards(metrics: EpochMetrics, rules: SelectionSettings) -> list[str]:
    """The overtraining guards that fire for one epoch, each as a sentence with its number."""
    fired = []
    if metrics.copy_distance is not None and metrics.copy_distance <= rules.copy_distance:
        fired.append(
            f"COPY: a sample is a near copy of a training photo (hash distance {metrics.copy_distance}, "
            f"limit {rules.copy_distance})"
        )
    if metrics.diversity is not None and metrics.diversity < rules.min_diversity:
        fired.append(
            f"DIV: samples across seeds have {metrics.diversity:.0%} of the base model's variety "
            f"(limit {rules.min_diversity:.0%}): they start to look all the same"
        )
    if metrics.preservation is not None and metrics.preservation > rules.max_preservation:
        fired.append(
            f"PRES: prompts without the token drift towards the subject by {metrics.preservation:.2f} "
            f"(limit {rules.max_preservation}): the LoRA bleeds"
        )
    if metrics.burn is not None and metrics.burn > rules.max_burn:
        fired.append(f"BURN: samples look cooked (burn {metrics.burn:.2f}, limit {rules.max_burn})")
    return fired


def select(series: list[EpochMetrics], rules: SelectionSettings | None = None) -> Selection:
    """Pick an epoch and say whether the run is overtrained, undertrained or good.

    Rules, in order:

    1. The quality signal is fidelity where any epoch has it, else minus the
       validation loss (said in the reasons), else the last epoch is taken.
    2. If a guard fires from epoch k on, only epochs before k count, and the
       earliest one within `fidelity_band` of the best of them is chosen:
       fidelity alone rewards overtraining, so the margin goes to the earlier
       epoch. Verdict: overtrained (nothing before k: the earliest guard-free
       epoch, or epoch 1).
    3. If no guard fires, the best epoch by the signal is chosen; verdict
       undertrained if that is the last epoch and the signal still improved by
       more than `rising` of its value in the last epoch, or if the best
       fidelity is under `min_fidelity` (the subject is not learned yet), else good.
    """
    rules = rules or SelectionSettings()
    if not series:
        raise ValueError("no epochs to select from")
    series = sorted(series, key=lambda m: m.epoch)
    table = [asdict(m) for m in series]
    unavailable = [
        name
        for name in ("validation_loss", "fidelity", "copy_distance", "diversity", "preservation", "burn")
        if all(getattr(m, name) is None for m in series)
    ]
    reasons = []
    if unavailable:
        reasons.append("unavailable, so not used: " + ", ".join(unavailable))

    if any(m.fidelity is not None for m in series):
        signal = {m.epoch: m.fidelity for m in series if m.fidelity is not None}
        signal_name = "fidelity"
    elif any(m.validation_loss is not None for m in series):
        signal = {m.epoch: -m.validation_loss for m in series if m.validation_loss is not None}
        signal_name = "validation loss"
        reasons.append("no fidelity: the decision rests on the validation loss and the guards")
    else:
        signal, signal_name = {}, ""
        reasons.append("no fidelity and no validation loss: the decision rests on the guards alone")

    fired = {m.epoch: guards(m, rules) for m in series}
    first_bad = next((m.epoch for m in series if fired[m.epoch]), None)

    def describe(epoch: int) -> str:
        value = signal.get(epoch)
        if value is None:
            return f"epoch {epoch}"
        shown = f"{value:.3f}" if signal_name == "fidelity" else f"{-value:.4f}"
        return f"epoch {epoch} ({signal_name} {shown})"

    if first_bad is not None:
        reasons += [f"epoch {first_bad}: {sentence}" for sentence in fired[first_bad]]
        before = [m.epoch for m in series if m.epoch < first_bad and m.epoch in signal] or [
            m.epoch for m in series if m.epoch < first_bad
        ]
        if not before:
            chosen = series[0].epoch
            reasons.append(f"a guard fires from the first epoch: epoch {chosen} is the least trained there is")
        elif signal:
            scored = [e for e in before if e in signal]
            best = max(scored, key=lambda e: signal[e]) if scored else before[-1]
            chosen = _earliest_within(scored, signal, best, rules.fidelity_band) if scored else best
            reasons.append(
                f"chose {describe(chosen)}: the earliest before the guard within {rules.fidelity_band:.0%} "
                f"of the best, {describe(best)}"
            )
        else:
            chosen = before[-1]
            reasons.append(f"chose epoch {chosen}: the last before the guard fires")
        return Selection("overtrained", chosen, reasons, table, unavailable)

    if not signal:
        chosen = series[-1].epoch
        reasons.append(f"no guard fires: chose the last epoch, {chosen}")
        return Selection("good", chosen, reasons, table, unavailable)
    best = max(signal, key=lambda e: (signal[e], -e))
    reasons.append(f"no guard fires: chose the best, {describe(best)}")
    if signal_name == "fidelity" and signal[best] < rules.min_fidelity:
        reasons.append(
            f"the best fidelity, {signal[best]:.3f}, is under the {rules.min_fidelity} asked for "
            "(min_fidelity): the subject is not learned yet, train more"
        )
        return Selection("undertrained", best, reasons, table, unavailable)
    epochs = sorted(signal)
    if best == epochs[-1] and len(epochs) >= 2:
        last, previous = signal[epochs[-1]], signal[epochs[-2]]
        gain = (last - previous) / max(abs(last), 1e-12)
        if gain > rules.rising:
            reasons.append(
                f"{signal_name} still improved by {gain:.1%} in the last epoch (more than {rules.rising:.0%}): "
                "train more"
            )
            return Selection("undertrained", best, reasons, table, unavailable)
    return Selection("good", best, reasons, table, unavailable)


def _earliest_within(epochs: list[int], signal: dict[int, float], best: int, band: float) -> int:
    """The earliest of `epochs` whose signal is within `band` of the best's (fidelity-like: higher is better)."""
    top = signal[best]
    for epoch in sorted(epochs):
        value = signal[epoch]
        close = value >= band * top if top >= 0 else value >= top / band  # a negative signal (minus a loss)
        if close:
            return epoch
    return best


# --- Chart -----------------------------------------------------------------------------------

METRIC_COLOURS = {
    "validation_loss": (40, 90, 200),
    "fidelity": (30, 150, 60),
    "diversity": (230, 140, 30),
    "preservation": (150, 60, 170),
    "burn": (200, 40, 40),
    "copy_distance": (110, 110, 110),
}


def metric_chart(metrics: list[dict], chosen: int | None = None, size: tuple[int, int] = (560, 240)) -> Image.Image:
    """Each available metric over the epochs, scaled to its own range, with a legend; the chosen epoch marked."""
    width, height = size
    left, right, top, bottom = 16, 130, 10, 24
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((left, top, width - right, height - bottom), outline=(200, 200, 200))
    epochs = [row["epoch"] for row in metrics]
    if not epochs:
        return image
    span_e = (max(epochs) - min(epochs)) or 1

    def x(epoch: int) -> float:
        return left + (epoch - min(epochs)) / span_e * (width - right - left)

    for epoch in epochs:
        draw.text((x(epoch) - 3, height - bottom + 6), str(epoch), fill=(80, 80, 80))
    if chosen is not None and chosen in epochs:
        draw.line((x(chosen), top, x(chosen), height - bottom), fill=(0, 0, 0), width=1)
    legend = top
    for name, colour in METRIC_COLOURS.items():
        points = [(row["epoch"], row.get(name)) for row in metrics if row.get(name) is not None]
        if not points:
            continue
        values = [float(v) for _, v in points]
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        xy = [(x(e), height - bottom - (float(v) - low) / span * (height - bottom - top)) for e, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        draw.text((width - right + 8, legend), f"{name} {low:.3g}-{high:.3g}", fill=colour)
        legend += 14
    return image


# --- After the choice: train on, or finish --------------------------------------------


def resume_config(config: LoraConfig, verdict: str, rounds: int, last_lora: Path) -> LoraConfig | None:
    """The seed's resume rule, automated: an undertrained run trains `resume_epochs` more epochs from its
    last epoch's LoRA, at most `max_resumes` times. None when it is done (not undertrained, or resumes
    used up); `rounds` counts the selections made so far, this one included."""
    settings = config.selection
    if verdict != "undertrained" or rounds > settings.max_resumes:
        return None
    more = {"network_weights": str(last_lora), "max_train_epochs": settings.resume_epochs}
    return LoraConfig.model_validate(config.model_dump() | more)


def verdict_note(verdict: str, chosen_epoch: int, last_lora: Path, resumes: int | None, max_resumes: int) -> str | None:
    """The last word on an undertrained choice: how to train more by hand. `resumes`: the automatic
    resumes used (None where the run was only selected in, not trained)."""
    if verdict != "undertrained":
        return None
    how = f"to train more, run again with --network-weights {last_lora}"
    if resumes is None:
        return f"undertrained: epoch {chosen_epoch} is the best so far; {how}"
    return (
        f"still undertrained after {resumes} resume(s) (max_resumes {max_resumes}): epoch "
        f"{chosen_epoch} is the best so far; {how}"
    )
