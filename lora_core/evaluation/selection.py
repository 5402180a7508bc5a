"""Checkpoint selection: which epoch a careful person would pick, and whether the run needs more.

The recipe's author: "It's HARD TO PICK ONE!!! But must be done." Every epoch
gets a row of metrics, each a number with a definition, or None where it
cannot be computed (never 0 in its place):

- training_loss: the trainer's deterministic loss on the images it trains on
  (fixed timesteps, noise and seed). It falls while they are learned, whether
  the subject is being learned or the photos memorised, so it never decides a
  verdict: it only orders the epochs when nothing better is measured.
- heldout_loss: the same loss on the images held out of training
  (`validation_split`, as sd-scripts and OneTrainer offer it). Its minimum marks
  where the usable band starts.
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
  blockiness relative to the base model's samples at the same seed: the recipe's
  "pixelated made of clay").

`lora_core.evaluation.metrics` measures them; this module only judges. The decision
(`select`) is a few documented rules over these series, so it can be tested on
synthetic ones and explained in plain words; `charts.metric_figure` draws them. Its
verdict is one of `VERDICTS`; `needs_review` says nothing measured can tell, so
a person must look (and the run is never resumed on it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_core.config.lora_config import LoraConfig
from lora_core.config.settings import SelectionSettings

__all__ = [
    "METRICS",
    "NO_SIGNAL",
    "VERDICTS",
    "EpochMetrics",
    "Selection",
    "guards",
    "resume_config",
    "review_note",
    "select",
    "verdict_note",
]

VERDICTS = ("good", "undertrained", "overtrained", "needs_review")

# Every metric of an epoch's row, in the order reports show them.
METRICS = ("training_loss", "heldout_loss", "fidelity", "copy_distance", "diversity", "preservation", "burn")

# Why a run without fidelity and without a held-out loss needs a person's eyes.
NO_SIGNAL = (
    "nothing measured can tell over- from undertraining (no likeness, no held-out photos): "
    "judge the contact sheets by eye"
)
# The metrics as a person reads them.
PLAIN_NAMES = {
    "training_loss": "training-photo loss",
    "heldout_loss": "held-out-photo loss (validation_split)",
    "fidelity": "likeness (fidelity)",
    "copy_distance": "copy check",
    "diversity": "variety",
    "preservation": "prompts without the token (preservation)",
    "burn": "burn",
}


# --- Decision --------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch's numbers; None where a metric cannot be computed (reported unavailable, never 0)."""

    epoch: int
    training_loss: float | None = None
    heldout_loss: float | None = None
    fidelity: float | None = None
    copy_distance: int | None = None
    diversity: float | None = None  # relative to the base model's at the same seeds
    preservation: float | None = None  # class-prompt drift towards the subject, relative to the base model's
    burn: float | None = None


@dataclass
class Selection:
    """The verdict, the chosen epoch, and why, in plain words with the numbers."""

    verdict: str  # one of VERDICTS
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
            f"a near copy: a sample is almost a training photo (hash distance {metrics.copy_distance}, "
            f"limit {rules.copy_distance})"
        )
    if metrics.diversity is not None and metrics.diversity < rules.min_diversity:
        fired.append(
            f"samples look alike: {metrics.diversity:.0%} of the base model's variety across seeds "
            f"(limit {rules.min_diversity:.0%})"
        )
    if metrics.preservation is not None and metrics.preservation > rules.max_preservation:
        fired.append(
            f"the LoRA bleeds: prompts without the token drift to the subject by {metrics.preservation:.2f} "
            f"(limit {rules.max_preservation})"
        )
    if metrics.burn is not None and metrics.burn > rules.max_burn:
        fired.append(f"samples look burnt: burn {metrics.burn:.2f} (limit {rules.max_burn})")
    return fired


@dataclass(frozen=True)
class _Signal:
    """The series the choice is made on, higher better (minus a loss): its kind says what it may decide."""

    kind: str  # fidelity | heldout (may decide the verdict) | training (orders epochs only) | none
    values: dict[int, float]

    def describe(self, epoch: int) -> str:
        value = self.values.get(epoch)
        if value is None:
            return f"epoch {epoch}"
        if self.kind == "fidelity":
            return f"epoch {epoch} (fidelity {value:.3f})"
        return f"epoch {epoch} ({'held-out' if self.kind == 'heldout' else 'training'}-photo loss {-value:.4f})"


def _signal(series: list[EpochMetrics], reasons: list[str]) -> _Signal:
    """Fidelity where any epoch has it, else minus the held-out loss, else minus the training images' loss."""
    if any(m.fidelity is not None for m in series):
        return _Signal("fidelity", {m.epoch: m.fidelity for m in series if m.fidelity is not None})
    if any(m.heldout_loss is not None for m in series):
        reasons.append("no likeness measured: the choice rests on the held-out loss (validation_split)")
        return _Signal("heldout", {m.epoch: -m.heldout_loss for m in series if m.heldout_loss is not None})
    reasons.append(NO_SIGNAL)
    if any(m.training_loss is not None for m in series):
        return _Signal("training", {m.epoch: -m.training_loss for m in series if m.training_loss is not None})
    return _Signal("none", {})


def select(series: list[EpochMetrics], rules: SelectionSettings | None = None) -> Selection:
    """Pick an epoch and say whether the run is overtrained, undertrained, good, or needs review.

    Rules, in order:

    1. The quality signal is fidelity where any epoch has it, else the held-out
       loss (said in the reasons). Without either, the loss on the training
       images only orders the epochs (else the last is taken) and decides no
       verdict: nothing measured can show over- or undertraining.
    2. If a guard fires from epoch k on, only epochs before k count: by
       fidelity, the earliest one within `fidelity_band` of the best of them
       (fidelity alone rewards overtraining, so the margin goes to the earlier
       epoch); by the held-out loss, as in rule 4. Verdict: overtrained (nothing
       before k: epoch 1).
    3. Fidelity, no guard: the best epoch; undertrained if that is the last
       epoch and fidelity still improved by more than `rising` of its value in
       the last epoch, or if it is under `min_fidelity`, else good.
    4. Held-out loss, no guard: its minimum marks where the usable band starts;
       the latest epoch from there whose loss stays within `fidelity_band` of
       the minimum is chosen (it has learned the subject longest while the
       held-out images are still predicted as well). Undertrained if the
       minimum is the last epoch and the loss still fell by more than `rising`
       in it; overtrained if the last epoch's loss rose out of the band; else good.
    5. Neither, no guard: needs_review, never resumed; the lowest training-image
       loss (or the last epoch) is chosen meanwhile.
    """
    rules = rules or SelectionSettings()
    if not series:
        raise ValueError("no epochs to select from")
    series = sorted(series, key=lambda m: m.epoch)
    table = [asdict(m) for m in series]
    unavailable = [name for name in METRICS if all(getattr(m, name) is None for m in series)]
    reasons = ["not measured: " + ", ".join(PLAIN_NAMES[name] for name in unavailable)] if unavailable else []
    signal = _signal(series, reasons)

    def verdict(name: str, chosen: int) -> Selection:
        return Selection(name, chosen, reasons, table, unavailable)

    fired = {m.epoch: guards(m, rules) for m in series}
    first_bad = next((m.epoch for m in series if fired[m.epoch]), None)
    if first_bad is not None:
        reasons += [f"overtrained from epoch {first_bad}: {sentence}" for sentence in fired[first_bad]]
        return verdict("overtrained", _before_guard(series, signal, first_bad, rules, reasons))

    values = signal.values
    if signal.kind in ("training", "none"):
        chosen = max(values, key=lambda e: (values[e], -e)) if values else series[-1].epoch
        how = "the lowest" if values else "the last epoch"
        reasons.append(f"no sign of overtraining; kept until you look: {signal.describe(chosen)}, {how}")
        return verdict("needs_review", chosen)
    if signal.kind == "heldout":
        return verdict(*_by_heldout_loss(signal, rules, reasons))
    best = max(values, key=lambda e: (values[e], -e))
    reasons.append(f"no sign of overtraining: chose the best, {signal.describe(best)}")
    if values[best] < rules.min_fidelity:
        reasons.append(
            f"the best fidelity, {values[best]:.3f}, is under the {rules.min_fidelity} asked for "
            "(min_fidelity): the subject is not learned yet, train more"
        )
        return verdict("undertrained", best)
    if _still_improving(signal, best, rules, reasons):
        return verdict("undertrained", best)
    return verdict("good", best)


def _before_guard(
    series: list[EpochMetrics], signal: _Signal, first_bad: int, rules: SelectionSettings, reasons: list[str]
) -> int:
    """The epoch chosen when a guard fires from `first_bad` on (rule 2); says why in `reasons`."""
    values = signal.values
    before = [m.epoch for m in series if m.epoch < first_bad]
    scored = [e for e in before if e in values]
    if not before:
        reasons.append(f"overtrained from the first epoch: epoch {series[0].epoch} is the least trained there is")
        return series[0].epoch
    if not scored:
        reasons.append(f"chose epoch {before[-1]}: the last before overtraining shows")
        return before[-1]
    if signal.kind == "heldout":
        _, chosen = _band_from_minimum(scored, values, rules.fidelity_band)
        reasons.append(
            f"chose {signal.describe(chosen)}: the latest before overtraining within {rules.fidelity_band:.0%} "
            f"of the held-out minimum"
        )
        return chosen
    best = max(scored, key=lambda e: values[e])
    chosen = _earliest_within(scored, values, best, rules.fidelity_band)
    reasons.append(
        f"chose {signal.describe(chosen)}: the earliest before overtraining within {rules.fidelity_band:.0%} "
        f"of the best, epoch {best}"
    )
    return chosen


def _by_heldout_loss(signal: _Signal, rules: SelectionSettings, reasons: list[str]) -> tuple[str, int]:
    """The verdict and epoch by the held-out loss when no guard fires (rule 4)."""
    values = signal.values
    epochs = sorted(values)
    minimum, chosen = _band_from_minimum(epochs, values, rules.fidelity_band)
    reasons.append(
        f"no sign of overtraining; the held-out loss is lowest at epoch {minimum}: chose {signal.describe(chosen)}, "
        f"the latest within {rules.fidelity_band:.0%} of it"
    )
    if minimum == epochs[-1]:
        return ("undertrained" if _still_improving(signal, minimum, rules, reasons) else "good"), chosen
    if not _within(values[epochs[-1]], values[minimum], rules.fidelity_band):
        reasons.append(
            f"the held-out loss rose from {-values[minimum]:.4f} (epoch {minimum}) to {-values[epochs[-1]]:.4f} "
            f"(epoch {epochs[-1]}): the later epochs learn the training images at the expense of the subject"
        )
        return "overtrained", chosen
    return "good", chosen


def _still_improving(signal: _Signal, best: int, rules: SelectionSettings, reasons: list[str]) -> bool:
    """The best is the last epoch and the signal improved by more than `rising` in it: train more."""
    epochs = sorted(signal.values)
    if best != epochs[-1] or len(epochs) < 2:
        return False
    last, previous = signal.values[epochs[-1]], signal.values[epochs[-2]]
    gain = (last - previous) / max(abs(last), 1e-12)
    if gain <= rules.rising:
        return False
    name = "fidelity" if signal.kind == "fidelity" else "the held-out loss"
    reasons.append(f"{name} still improved by {gain:.1%} in the last epoch (more than {rules.rising:.0%}): train more")
    return True


def _within(value: float, top: float, band: float) -> bool:
    """`value` is within `band` of the best, `top` (higher is better; a negative signal is minus a loss)."""
    return value >= band * top if top >= 0 else value >= top / band


def _earliest_within(epochs: list[int], signal: dict[int, float], best: int, band: float) -> int:
    """The earliest of `epochs` whose signal is within `band` of the best's (fidelity-like: higher is better)."""
    return next((e for e in sorted(epochs) if _within(signal[e], signal[best], band)), best)


def _band_from_minimum(epochs: list[int], signal: dict[int, float], band: float) -> tuple[int, int]:
    """(the loss minimum, the latest epoch from it on whose loss has stayed within `band` of it)."""
    ordered = sorted(epochs)
    minimum = max(ordered, key=lambda e: (signal[e], -e))
    chosen = minimum
    for epoch in ordered[ordered.index(minimum) + 1 :]:
        if not _within(signal[epoch], signal[minimum], band):
            break
        chosen = epoch
    return minimum, chosen


# --- After the choice: train on, or finish --------------------------------------------


def resume_config(config: LoraConfig, verdict: str, rounds: int, last_lora: Path) -> LoraConfig | None:
    """The recipe's resume rule, automated: an undertrained run trains `resume_epochs` more epochs from its
    last epoch's LoRA, at most `max_resumes` times. None when it is done (not undertrained, or resumes
    used up): never on needs_review, which nothing measured says more training would help; `rounds`
    counts the selections made so far, this one included."""
    settings = config.selection
    if verdict != "undertrained" or rounds > settings.max_resumes:
        return None
    more = {"network_weights": str(last_lora), "max_train_epochs": settings.resume_epochs}
    return LoraConfig.model_validate(config.model_dump() | more)


def review_note(chosen_epoch: int, sheets: Path, final: Path) -> str:
    """Where a person looks when the verdict is needs_review, and what to do with what they see."""
    return (
        f"needs review: compare the contact sheets in {sheets}; epoch {chosen_epoch} is {final.name} until "
        f"you copy another {final.stem}-00000N.safetensors over it"
    )


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
