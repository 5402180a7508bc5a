"""How stage results look in the Prefect UI: table and markdown artifacts."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from pathlib import Path

from PIL import Image
from prefect.artifacts import (
    Artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from lora_core.checks import stage_columns
from lora_core.dataset.buckets import BucketResult
from lora_core.dataset.captioning import CaptionResult
from lora_core.evaluation.charts import loss_figure, metric_figure, png_bytes
from lora_core.evaluation.epoch_files import RunFiles
from lora_core.evaluation.metric_grids import load_grid
from lora_core.evaluation.selection import METRICS
from lora_core.foundation.layout import SubjectLayout
from lora_core.training.sampling import SampleSpec, contact_sheet

_TABLE_COLUMNS = ("source", "status", "reason", "image", "width", "height", "resized", "exif_rotated")


def artifact_key(token: str, stage: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{token}-{stage}".lower()).strip("-")


def publish_ingest(token: str, rows: list[dict], summary: str) -> None:
    """Every input file with its status and reason, and a short summary."""
    table = [{column: row.get(column, "") for column in _TABLE_COLUMNS} for row in rows]
    create_table_artifact(
        key=artifact_key(token, "ingest"),
        table=table,
        description=f"Ingest of {token}: every input file with its status and reason",
    )
    create_markdown_artifact(key=artifact_key(token, "ingest-summary"), markdown=summary)


def ingest_summary(token: str, rows: list[dict], repeats: int | None, notes: list[str], error: str = "") -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("accepted", "rejected", "ignored")}
    lines = [f"# Ingest of `{token}`", ""]
    if error:
        lines += ["**Failed:** " + error.splitlines()[0], ""]
    lines += [
        f"- accepted: **{counts['accepted']}**",
        f"- rejected: {counts['rejected']}",
        f"- ignored: {counts['ignored']}",
    ]
    if repeats is not None:
        lines.append(f"- repeats per image: {repeats} (folder `training_images/{repeats}_{token}`)")
    resized = sum(bool(r.get("resized")) and r["status"] == "accepted" for r in rows)
    if resized:
        lines.append(f"- downscaled to the long-side limit: {resized}")
    lines += [f"- note: {note}" for note in notes]
    problems = [r for r in rows if r["status"] == "rejected"]
    if problems:
        lines += ["", "## Rejected", "", "| file | reason |", "|---|---|"]
        lines += [f"| `{r['source']}` | {r['reason']} |" for r in problems]
    return "\n".join(lines) + "\n"


def publish_buckets(token: str, result: BucketResult, batch_size: int) -> None:
    """Images per bucket as a table, and a note on buckets that cannot fill a batch."""
    create_table_artifact(
        key=artifact_key(token, "buckets"),
        table=[
            {"bucket": bucket, "images": n, "fills a batch": bucket not in result.short}
            for bucket, n in result.counts.items()
        ],
        description=f"Buckets of {token}: images per bucket (a batch never mixes buckets)",
    )
    lines = [f"# Buckets of `{token}`", "", f"- {sum(result.counts.values())} images in {len(result.counts)} buckets"]
    if result.short:
        short = ", ".join(f"{bucket} ({n})" for bucket, n in result.short.items())
        lines.append(f"- fewer images than a batch of {batch_size}, so their batches run short: {short}")
    if result.own_buckets:
        lines.append(f"- {result.own_buckets} image(s) too small for the shared buckets got their own (never upscaled)")
    if result.upscaled:
        lines.append(f"- {result.upscaled} image(s) enlarged to fill a bucket")
    create_markdown_artifact(key=artifact_key(token, "buckets-summary"), markdown="\n".join(lines) + "\n")


def thumbnail_uri(path: Path, size: int = 96) -> str:
    """A small JPEG as a data URI: the Prefect UI renders it inline in markdown."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def captions_markdown(token: str, result: CaptionResult, subject_dir: Path, caption_extension: str) -> str:
    """Every image beside its caption, for review; says which file to edit."""
    by_source = ", ".join(f"{n} {source}" for source, n in result.by_source.items() if n)
    lines = [
        f"# Captions of `{token}`",
        "",
        f"- {len(result.records)} captions ({by_source}); BLIP ran on {result.generated} image(s) this time",
        f"- to fix one, edit the `{caption_extension}` file beside the image and run again: an edited caption is kept",
        "",
        "| image | caption | source | removed from BLIP's words |",
        "|---|---|---|---|",
    ]
    for record in result.records:
        picture = f"![{record['image']}]({thumbnail_uri(subject_dir / record['image'])})<br>`{record['image']}`"
        lines.append(f"| {picture} | {_cell(record['caption'])} | {record['source']} | {_cell(record['removed'])} |")
    return "\n".join(lines) + "\n"


def publish_captions(token: str, result: CaptionResult, subject_dir: Path, caption_extension: str) -> None:
    create_markdown_artifact(
        key=artifact_key(token, "captions"),
        markdown=captions_markdown(token, result, subject_dir, caption_extension),
        description=f"Captions of {token}, with thumbnails, for review",
    )


def _check_picture(layout: SubjectLayout, row: dict) -> str:
    """A thumbnail of the image as the checks left it (a rejected one from the image store)."""
    if row["image"]:
        path = layout.root / row["image"]
    elif re.fullmatch(r"[0-9a-f]{64}", row["checked_sha256"] or ""):
        path = layout.image_store / f"{row['checked_sha256']}.png"
    else:
        return ""
    return f"![{row['source']}]({thumbnail_uri(path)})" if path.is_file() else ""


def checks_markdown(layout: SubjectLayout, stage: str, rows: list[dict], notes: list[str]) -> str:
    """What to look at, in plain words, then every photo with its thumbnail, flags and decision."""
    checked = [row for row in rows if row.get("decision")]
    title = {"checks": "Orientation and mirroring", "crop": "Crop and quality"}[stage]
    lines = [f"# {title} of `{layout.token}`", ""]
    lines += [f"- {note}" for note in notes] or ["- nothing to look at: no photo was flagged"]
    lines += ["", "| photo | decision | flags | why |", "|---|---|---|---|"]
    for row in checked:
        picture = f"{_check_picture(layout, row)}<br>`{row['source']}`"
        lines.append(f"| {picture} | {row['decision']} | {row['flags'] or '-'} | {_cell(row['check_notes'] or '-')} |")
    return "\n".join(lines) + "\n"


def publish_checks(layout: SubjectLayout, stage: str, rows: list[dict], notes: list[str]) -> None:
    """A table of every photo's check scores and decision, and a markdown page with thumbnails."""
    shown = [column.name for column in stage_columns(stage) if column.in_table]  # each check declares its own
    columns = ("source", "image", *shown, "flags", "decision", "check_notes")
    table = [{c: ("" if row.get(c) is None else row[c]) for c in columns} for row in rows if row.get("decision")]
    create_table_artifact(
        key=artifact_key(layout.token, stage),
        table=table,
        description=f"{stage} of {layout.token}: every photo's scores, flags and decision",
    )
    create_markdown_artifact(
        key=artifact_key(layout.token, f"{stage}-summary"), markdown=checks_markdown(layout, stage, rows, notes)
    )


def _chart_uri(figure) -> str:
    """A chart as a 64-colour PNG at 72 dpi: lines and text stay sharp, a few KB each."""
    with Image.open(io.BytesIO(png_bytes(figure, dpi=72))) as chart:
        small = chart.convert("RGB").quantize(colors=64)
    buffer = io.BytesIO()
    small.save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def publish_epoch(
    token: str, epoch: int, losses: list[float], lrs: list[float], lora: Path | None, last_step: int | None = None
) -> None:
    """The epoch's loss curve and file, as a markdown artifact (the chart inline). `last_step`: the global
    step the epoch ended on (its steps are numbered as the run's)."""
    first = (last_step - len(losses) + 1) if last_step is not None else 1
    figure = loss_figure(losses, lrs, first_step=first, title=f"{token}, epoch {epoch}")
    mean = sum(losses) / max(1, len(losses))
    markdown = (
        f"# `{token}` epoch {epoch}\n\n"
        f"- {len(losses)} steps, mean training loss {mean:.4f} (the loss of each step's own random noise "
        f"and timestep: it jumps from step to step), last learning rate {lrs[-1] if lrs else 0:.2e}\n"
        f"- LoRA: {f'`{lora}`' if lora else 'none written this epoch (save_every_n_epochs)'}\n\n"
        f"![training loss and learning rate per step]({_chart_uri(figure)})\n"
    )
    create_markdown_artifact(key=artifact_key(token, f"epoch-{epoch}"), markdown=markdown)


class TrainingProgress:
    """A training round on the dashboard: a progress bar (epoch k of n) updated per epoch, and the round's
    loss chart once it ends (each epoch's own chart is its task's artifact)."""

    def __init__(self, token: str, first_epoch: int, last_epoch: int) -> None:
        self.token, self.first, self.last = token, first_epoch, last_epoch
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.epoch_ends: list[int] = []  # the round's step counts at each epoch's end
        self.artifact_id = create_progress_artifact(
            0.0,
            key=artifact_key(token, "training-progress"),
            description=self._words(first_epoch - 1),
        )

    def _words(self, done: int) -> str:
        return f"{self.token}: epoch {done} of {self.last} trained (this round: epochs {self.first}-{self.last})"

    def epoch_done(self, epoch: int, losses: list[float], lrs: list[float]) -> None:
        self.losses += losses
        self.lrs += lrs
        self.epoch_ends.append(len(self.losses))
        share = 100.0 * (epoch - self.first + 1) / max(1, self.last - self.first + 1)
        update_progress_artifact(self.artifact_id, progress=share, description=self._words(epoch))

    def round_done(self) -> None:
        """The round's loss chart. Drawn only when its numbers are new: a cached re-run publishes the chart
        the key already holds for this run too (drawing it took 0.7 s of a 15 s re-run, `bench.rerun`)."""
        if not self.losses:
            return
        key, span = artifact_key(self.token, "training-loss"), f"epochs {self.first}-{self.last}"
        numbers = json.dumps([self.losses, self.lrs, self.epoch_ends, self.token, span]).encode()
        drawing = Path(loss_figure.__code__.co_filename).read_bytes()  # a new chart style is drawn anew
        mark = f"<!-- numbers {hashlib.sha256(numbers + drawing).hexdigest()[:16]} -->"
        latest = Artifact.get(key)
        if latest is not None and isinstance(latest.data, str) and mark in latest.data:
            markdown = latest.data
        else:
            figure = loss_figure(self.losses, self.lrs, epoch_ends=self.epoch_ends[:-1], title=f"{self.token}, {span}")
            title = f"# `{self.token}`: loss of {span}"
            markdown = f"{title}\n\n![training loss and learning rate per step]({_chart_uri(figure)})\n{mark}\n"
        create_markdown_artifact(
            key=key, markdown=markdown, description=f"{self.token}: the loss of {span}, every step"
        )


def publish_samples(token: str, epoch: int, sheet: Image.Image) -> None:
    """The epoch's contact sheet (prompts x seeds), inline, so the UI shows the run's progress."""
    uri = _preview_uri(sheet)
    create_markdown_artifact(
        key=artifact_key(token, f"samples-epoch-{epoch}"),
        markdown=f"# `{token}` samples after epoch {epoch}\n\nThe same prompts and seeds every epoch.\n\n"
        f"![samples]({uri})\n",
        description=f"Samples of {token} after epoch {epoch}",
    )


# Pictures in artifacts are previews: JPEG, the longest side at most this, whatever the render size (the
# artifacts live in Prefect's database, which every run would otherwise grow by megabytes). The full
# images stay in the subject's folder.
PREVIEW_SIDE = 320


def _preview_uri(image: Image.Image, side: int = PREVIEW_SIDE) -> str:
    preview = image.convert("RGB")
    preview.thumbnail((side, side))
    buffer = io.BytesIO()
    preview.save(buffer, "JPEG", quality=65)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_METRIC_COLUMNS = ("epoch", *METRICS)


def _number(value: object) -> str:
    if value is None:
        return "unavailable"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def selection_markdown(run: RunFiles, spec: SampleSpec, record: dict) -> str:
    """The verdict and its reasons, the metric table and chart, and the chosen epoch's grid beside its
    neighbours' (needs_review: every epoch's, since a person must judge them all)."""
    chosen = record["chosen_epoch"]
    lines = [
        f"# Verdict: {record['verdict']}, epoch {chosen} (selection of `{run.name}`)",
        "",
        f"- chosen file: `{record['chosen_file']}`, published as `{run.final.name}`",
        f"- fidelity measured with: {record['fidelity_model']}",
        *[f"- {reason}" for reason in record["reasons"]],
    ]
    if len(record["rounds"]) > 1:
        lines += ["", "## Rounds", ""]
        lines += [
            f"- round {r['round']}: epochs {r['epochs'][0]}-{r['epochs'][-1]}: "
            f"{r['verdict']}, epoch {r['chosen_epoch']}"
            for r in record["rounds"]
        ]
    lines += [
        "",
        "## Metrics per epoch",
        "",
        "| " + " | ".join(_METRIC_COLUMNS) + " |",
        "|---" * len(_METRIC_COLUMNS) + "|",
    ]
    for row in record["metrics"]:
        mark = " **(chosen)**" if row["epoch"] == chosen else ""
        lines.append("| " + " | ".join(_number(row.get(c)) for c in _METRIC_COLUMNS) + mark + " |")
    lines += ["", f"![metrics over epochs]({_chart_uri(metric_figure(record['metrics'], METRICS, chosen))})", ""]
    review = record["verdict"] == "needs_review"
    shown = sorted(run.epochs) if review else (chosen - 1, chosen, chosen + 1)
    heading = "every epoch, to judge by eye" if review else "the chosen epoch and its neighbours"
    lines += [f"## Grids: {heading}", "", "Same prompts and seeds; the last row has no token."]
    for epoch in shown:
        if epoch in run.epochs and (loaded := load_grid(run.grid_folder(epoch), None)) is not None:
            title = f"{run.name} epoch {epoch}" + (" (chosen)" if epoch == chosen else "")
            lines += [
                "",
                f"### Epoch {epoch}",
                "",
                f"![{title}]({_preview_uri(contact_sheet(loaded[0], spec, title, cell=128), side=256)})",
            ]
    return "\n".join(lines) + "\n"


def publish_selection(run: RunFiles, spec: SampleSpec, record: dict) -> None:
    """A markdown report (the verdict first, then reasons, chart, contact sheets) and a table of every
    epoch's metrics."""
    create_markdown_artifact(  # first: the verdict is what a user opens the run for
        key=artifact_key(run.name, "selection"),
        markdown=selection_markdown(run, spec, record),
        description=f"Verdict: {record['verdict']}, epoch {record['chosen_epoch']} (selection of {run.name})",
    )
    create_table_artifact(
        key=artifact_key(run.name, "selection-metrics"),
        table=[{c: _number(row.get(c)) for c in _METRIC_COLUMNS} for row in record["metrics"]],
        description=f"Metrics per epoch of {run.name}; unavailable where they cannot be measured",
    )


def publish_strengths(name: str, epoch: int, sheet: Image.Image) -> None:
    """The chosen epoch at each LoRA strength, the sample prompts and seeds, inline."""
    create_markdown_artifact(
        key=artifact_key(name, "txt2img"),
        markdown=f"# `{name}` epoch {epoch} at each strength\n\n![strengths]({_preview_uri(sheet)})\n",
        description=f"{name}: the chosen epoch rendered at several strengths",
    )
