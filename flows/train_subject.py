"""Train a LoRA of one subject from a folder of photos: the recipe as a Prefect flow.

The recipe's author does these steps by hand; each is a cached, retryable stage:

1. ingest   - rename, convert to PNG, make the folder structure (`<token>/training_images/...`)
2. checks   - turn sideways photos upright; find mirrored selfies ("revise the orientation!!")
3. crop     - one whole, clear face per photo; blur, pixelation, upscaling, another person; variety of the set
4. buckets  - put each image in an aspect-ratio bucket, as kohya does (`buckets.csv`)
5. captions - caption each image with BLIP, prefixed "<token>, " (a `.txt` beside it)
6. train    - train the LoRA one epoch per task: `result_current/<token>-000001.safetensors` ...
7. samples  - render one fixed grid per epoch, and once for the base model, at the same seeds
8. select   - measure every epoch, choose one (`selection.json`), make it `<token>.safetensors`, render it
              at a few strengths in `txt2img-images/`; undertrained: train on from the last epoch, select again

Run it with no server (Prefect's embedded default):

    python -m flows.train_subject PHOTOS --token TOKEN --workdir work

or select an epoch of a finished run (ours or kohya's) without training:

    python -m flows.train_subject --select-only work/TOKEN --token TOKEN --base-model MODEL

The command line itself (flags, the summary it prints) is `flows.cli`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the command line checks its flags before torch, diffusers and Prefect load
    from flows.cli import main

    sys.exit(main())

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.orphans import crash_orphaned_runs
from flows.report import STAGES, Report, StageName
from lora_core.checks import MirrorPolicy, QualityPolicy
from lora_core.config.lora_config import LoraConfig
from lora_core.config.settings import SubjectType
from lora_core.dataset.blip import BlipCaptioner
from lora_core.dataset.buckets import BucketPlan
from lora_core.evaluation.epoch_files import config_for_run, find_run
from lora_core.evaluation.selection import resume_config
from lora_core.families import Preset
from lora_core.families.loading import require_base_model
from lora_core.foundation.fs import remove_stale_temps, sha256_file
from lora_core.foundation.layout import BOOKKEEPING, SubjectLayout
from lora_core.foundation.lock import subject_lock
from lora_core.foundation.origin import COMMAND_LINE, FORM, Origin
from lora_core.setup.preflight import preflight
from lora_core.setup.resolve import subject_config
from tasks.artifacts import TrainingProgress
from tasks.buckets import bucket_images
from tasks.captions import caption_images
from tasks.checks import check_images
from tasks.crop import crop_images
from tasks.gpu import share_cpu
from tasks.ingest import ingest_photos
from tasks.run import export_settings, publish_run, start_run
from tasks.select import (
    SelectRequest,
    SelectResult,
    publish_chosen,
    release_renderers,
    render_chosen,
    render_metric_grids,
    select_epoch,
)
from tasks.stage import stage_results
from tasks.train import EpochResult, TrainRequest, release_subject, release_trainers, train_epoch

__all__ = ["STAGES", "select_only", "train_subject"]


@flow(name="train-subject", flow_run_name="{token}")
def train_subject(
    photos: Path,
    token: str,
    workdir: Path = Path("work"),
    preset: Preset | None = None,
    config_file: Path | None = None,
    base_model: str | None = None,
    caption_model: str | None = None,
    subject_type: SubjectType | None = None,
    mirror_policy: MirrorPolicy | None = None,
    quality_policy: QualityPolicy | None = None,
    overrides: dict[str, Any] | None = None,
    stop_after: StageName = STAGES[-1],
    base_model_config: str | None = None,
    device: str | None = None,
    config: LoraConfig | None = None,
) -> dict:
    """Turn `photos` and a trigger `token` into the recipe's layout, stage by stage (see the module's list).

    The settings resolve as on the command line (`lora_core.setup.resolve.subject_config`): `preset`, then the
    kohya_ss/CivitAI `config_file`, then `overrides` (LoraConfig fields, nested sections as mappings), then
    the named ones. `config`: a ready LoraConfig instead (Python callers). `device`: `cpu`, `cuda` or `cuda:N`
    (default: `cuda` when there is one, else the CPU in fp32).
    """
    named = {"base_model": base_model, "caption_model": caption_model, "subject_type": subject_type}
    named |= {"mirror_policy": mirror_policy, "quality_policy": quality_policy}
    origin = COMMAND_LINE if config else _form_or_batch(token)  # errors name flags, form fields or batch keys
    config = config or subject_config(preset, config_file, overrides, **named, origin=str(FORM))
    workdir, report = Path(workdir), Report(stop_after)
    share_cpu()  # several subjects on this worker: each its share of the cores
    stages = {"captions": report.reaches("captions"), "training": report.reaches("train")}
    preflight(config, device, origin, photos=Path(photos), workdir=workdir, **stages)  # now, not after captions
    layout = SubjectLayout(workdir, token)
    with subject_lock(layout.lock, layout.root), stage_results(layout.prefect_results, report.cached):
        layout.move_old_bookkeeping()  # a folder from before `.pipeline/` keeps its caches
        remove_stale_temps(layout.root)  # killed writes' temp files: none is live, we hold the lock
        if crashed := crash_orphaned_runs(layout):  # killed runs' records: not running, we hold the lock
            get_run_logger().info("%d earlier run(s) of %s, left marked running by a kill: now Crashed", crashed, token)
        ingested = ingest_photos(Path(photos), layout, config.ingest, config.num_repeats)
        export_settings(layout, config)
        if report.add("ingest", ingested):
            return report.summary
        checks = (config.checks, config.subject_type, config.ingest.min_images)
        checked = check_images(ingested, layout, *checks)
        if report.add("checks", checked):
            return report.summary
        cropped = crop_images(checked, layout, *checks)
        if report.add("crop", cropped):
            return report.summary
        plan = BucketPlan.from_config(config)
        if report.add("buckets", bucket_images(cropped, layout, plan, config.train_batch_size)):
            return report.summary
        blip = BlipCaptioner(config.captioning.model).identity
        captioned = caption_images(cropped, layout, config.captioning, config.caption_extension, blip)
        if report.add("captions", captioned):
            return report.summary
        train_and_select(start_run(layout, config, device, base_model_config), report)
    return report.summary


def _form_or_batch(token: str) -> Origin:
    """A run from the UI's form or a deployment's parameters; or, started by a train-batch run (a subflow of
    it), that batch file's entry for `token`."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    started_by_a_batch = context is not None and context.flow_run.parent_task_run_id is not None
    return Origin.batch(f"the batch file's entry for {token}") if started_by_a_batch else FORM


def train_and_select(run: TrainRequest, report: Report) -> None:
    """Train the run, then samples and select on the same loaded models (`tasks.train.lend_trainer`: no second
    copy of the base model); whatever is still loaded is freed at the end (a worker process lives on)."""
    try:
        epochs = train_run(run)
        if report.add_training(epochs, publish_run(run, epochs)):
            return
        select_and_resume(run, epochs, report)
    finally:
        release_subject(run.layout)


def train_run(run: TrainRequest) -> list[EpochResult]:
    """Every epoch of `run`, one task each (a killed run continues at its first unfinished epoch); the models
    stay loaded for the samples and select stages, unless an epoch failed."""
    progress, epochs = TrainingProgress(run.token, run.first_epoch, run.last_epoch), []
    try:
        for epoch in run.epochs():
            epochs.append(train_epoch(run, epoch))
            progress.epoch_done(epoch, epochs[-1].losses, epochs[-1].lrs)
    except BaseException:
        release_trainers(run.run_key)
        raise
    progress.round_done()
    return epochs


def select_and_resume(run: TrainRequest, epochs: list[EpochResult], report: Report) -> None:
    """Samples and select; undertrained: train on from the last epoch's LoRA, as the recipe does by hand
    (`lora_core.evaluation.selection.resume_config`), and select again; then publish and render the choice."""
    layout = run.layout
    request = SelectRequest(
        folder=layout.result_current,
        token=run.token,
        config=run.config,
        base_model_config=run.base_model_config,
        device=run.device,
    )
    rounds: list[dict] = []
    try:
        while (choice := choose_epoch(request.with_epochs(epochs), rounds, report)) is not None:
            rounds, last = choice.rounds, epochs[-1].epoch
            more = resume_config(request.config, choice.verdict, len(rounds), layout.epoch_lora(last))
            if more is None:
                finish(request.with_epochs(epochs), choice, report, layout.txt2img_images, resuming=True)
                return
            release_renderers(request.folder)  # one copy of the base model in memory: the trainer's
            run = start_run(layout, more, run.device, run.base_model_config, last + 1, run.run_key)
            epochs += train_run(run)
            report.add_training(epochs, layout.final_lora)
    finally:
        release_renderers(request.folder)


def choose_epoch(request: SelectRequest, rounds: list[dict], report: Report) -> SelectResult | None:
    """The samples and select stages once: every epoch's grid, then the choice (None: stopped after samples)."""
    hashes = request.epoch_hashes()
    if report.add("samples", render_metric_grids(request, hashes)):
        return None
    choice = select_epoch(request, hashes, rounds)
    report.add("select", choice)
    return choice


def finish(request: SelectRequest, choice: SelectResult, report: Report, txt2img: Path, resuming: bool) -> None:
    """The choice becomes `<name>.safetensors`, then is rendered at each strength into `txt2img`."""
    choice = publish_chosen(request, choice, resuming)
    files = request.run()
    paths = render_chosen(request, choice.chosen_epoch, sha256_file(files.epochs[choice.chosen_epoch]), txt2img)
    report.add("select", choice)
    report.summary["select"] |= {"final": str(files.final), "txt2img": [str(p) for p in paths]}


@flow(name="select-epoch")
def select_only(
    folder: Path,
    token: str,
    config: LoraConfig,
    photos: Path | None = None,
    base_model_config: str | None = None,
    device: str | None = None,
) -> dict:
    """Select an epoch of a finished run (ours, or a kohya output folder of epoch files) without training."""
    files = find_run(Path(folder), token, photos)
    require_base_model(config.pretrained_model_name_or_path)
    config = config_for_run(config, files)
    request = SelectRequest(
        folder=files.folder,
        token=token,
        config=config,
        photos=photos,
        base_model_config=base_model_config,
        device=device,
    )
    report = Report()
    report.summary["select_only"] = str(files.folder)
    kept = files.folder / BOOKKEEPING
    with subject_lock(kept / "lock", files.folder), stage_results(kept / "prefect-results", report.cached):
        try:
            if (choice := choose_epoch(request, [], report)) is not None:  # always, unless stopped after samples
                finish(request, choice, report, files.txt2img, resuming=False)
        finally:
            release_renderers(files.folder)
    return report.summary
