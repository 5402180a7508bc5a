"""The samples and select stages: render each epoch's metric grid, measure, choose, show the choice."""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE
from pydantic import BaseModel

from lora_core.config.lora_config import LoraConfig
from lora_core.evaluation.embedders import subject_embedder
from lora_core.evaluation.epoch_files import RunFiles, SelectionError, find_run, publish_choice, write_selection
from lora_core.evaluation.metric_grids import (
    GridRenderer,
    grids_intact,
    metric_spec,
    render_grids,
    render_strengths,
    write_contact_sheets,
)
from lora_core.evaluation.metrics import measure_run
from lora_core.evaluation.selection import review_note, select, verdict_note
from lora_core.families.loading import load_base_model, model_identity
from lora_core.foundation.fs import sha256_file
from lora_core.foundation.lora_file import LoraFile, read_lora
from lora_core.training.sampling import SampleSpec, contact_sheet
from tasks.artifacts import publish_selection, publish_strengths
from tasks.caching import CodeVersion
from tasks.stage import stage, step
from tasks.train import lend_trainer

SELECT_CACHE = TASK_SOURCE + INPUTS + CodeVersion.of_task(__name__)

# The loaded base model with a LoRA network on it, shared by the samples and txt2img tasks of one run
# (keyed by its folder first): subjects running in one process never share or free each other's.
_RENDERERS: dict[str, GridRenderer] = {}


def release_renderers(folder: Path) -> None:
    """Free the renderers of the run in `folder`."""
    prefix = f"{Path(folder).resolve()}:"
    for key in [key for key in _RENDERERS if key.startswith(prefix)]:
        del _RENDERERS[key]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class SelectRequest(BaseModel):
    """A run folder to select in, and the settings that say how (the run's config)."""

    folder: Path  # a run folder as `lora_core.evaluation.epoch_files.find_run` reads it
    token: str
    config: LoraConfig
    photos: Path | None = None  # reference photos; default: the run's own training images
    epochs: list[int] | None = None  # the epochs trained so far in this flow run (None: every epoch file)
    device: str | None = None
    base_model_config: str | None = None

    def run(self) -> RunFiles:
        files = find_run(self.folder, self.token, self.photos)
        if self.epochs is None:
            return files
        missing = sorted(set(self.epochs) - set(files.epochs))
        if missing:
            raise SelectionError(f"{files.folder}: epoch file(s) {missing} are missing")
        return replace(files, epochs={e: p for e, p in files.epochs.items() if e in self.epochs})

    def spec(self) -> SampleSpec:
        config = self.config
        return metric_spec(
            config.selection, self.run().name, config.subject_type, config.resolution, sampler=config.sample_sampler
        )

    def base_identity(self) -> str:
        return model_identity(self.config.pretrained_model_name_or_path or "")

    def with_epochs(self, epochs: list[Any]) -> SelectRequest:
        """This request over the epochs trained so far that wrote a LoRA file."""
        return self.model_copy(update={"epochs": [e.epoch for e in epochs if e.lora]})

    def epoch_hashes(self) -> dict[int, str]:
        """The epoch files' bytes, so the stage's cache key follows them (not just their names)."""
        return {epoch: sha256_file(path) for epoch, path in self.run().epochs.items()}


def _renderer(request: SelectRequest, lora: LoraFile) -> GridRenderer:
    key = f"{request.folder.resolve()}:{request.base_identity()}:{lora.rank}"
    if key not in _RENDERERS:
        release_renderers(request.folder)  # this run's other renderer (another rank): one base model at a time
        config, layout = request.config, request.run().layout
        trainer = lend_trainer(layout, lora.rank) if layout is not None else None
        if trainer is not None:  # the run just trained in this process: its models, not a second copy
            _RENDERERS[key] = GridRenderer.on_trainer(trainer)
        else:
            base = load_base_model(
                config.pretrained_model_name_or_path,
                family=config.model_family,
                config_folder=request.base_model_config,
                parts=config.component_files,
            )
            _RENDERERS[key] = GridRenderer(base, config, lora, layout, request.device)
    return _RENDERERS[key]


class GridsResult(BaseModel):
    folder: Path
    epochs: list[int]
    rendered: list[int]  # 0: the base model


def _grids_intact(request: SelectRequest, epoch_hashes: dict[int, str]) -> bool:
    return grids_intact(request.run(), request.spec(), request.base_identity())


@stage("samples", SELECT_CACHE, outputs_intact=_grids_intact, gpu=True)
def render_metric_grids(request: SelectRequest, epoch_hashes: dict[int, str]) -> GridsResult:
    """The metric grid of the base model and of every epoch not rendered before (kept on disk)."""
    logger = get_run_logger()
    run, spec = request.run(), request.spec()
    started = time.monotonic()

    def on_grid(epoch: int | None, grid: list) -> None:
        logger.info("samples: %s grid rendered", "base model" if epoch is None else f"epoch {epoch}")

    rendered = render_grids(run, spec, request.base_identity(), lambda lora: _renderer(request, lora), on_grid)
    logger.info("samples: %d grid(s) rendered in %.1f s -> %s", len(rendered), time.monotonic() - started, run.grids)
    return GridsResult(folder=run.grids, epochs=sorted(run.epochs), rendered=rendered)


class SelectResult(BaseModel):
    verdict: str
    chosen_epoch: int
    reasons: list[str]
    selection_json: Path
    metrics: list[dict]
    rounds: list[dict]
    record: dict  # what selection.json holds


def _selection_intact(request: SelectRequest, epoch_hashes: dict[int, str], rounds: list[dict]) -> bool:
    return request.run().selection_json.is_file()


@stage("select", SELECT_CACHE, outputs_intact=_selection_intact)
def select_epoch(request: SelectRequest, epoch_hashes: dict[int, str], rounds: list[dict]) -> SelectResult:
    """Measure every epoch, choose one, write `selection.json` and each epoch's contact sheet, publish the report.

    `rounds` are the earlier rounds of this run (before each resume); this round is added to them.
    """
    run, spec, settings = request.run(), request.spec(), request.config.selection
    embed, why_not = subject_embedder(request.config)
    series, notes = measure_run(run, spec, request.base_identity(), embed)
    selection = select(series, settings)
    sheets = write_contact_sheets(run, spec)
    reasons = selection.reasons + ([why_not] if why_not else []) + notes
    if selection.verdict == "needs_review":
        reasons.append(review_note(selection.chosen_epoch, sheets, run.final))
    this_round = {
        "round": len(rounds) + 1,
        "epochs": sorted(run.epochs),
        "verdict": selection.verdict,
        "chosen_epoch": selection.chosen_epoch,
        "reasons": reasons,
    }
    record = {
        "verdict": selection.verdict,
        "chosen_epoch": selection.chosen_epoch,
        "chosen_file": str(run.epochs[selection.chosen_epoch]),
        "reasons": reasons,
        "metrics": selection.metrics,
        "unavailable": selection.unavailable,
        "rounds": [*rounds, this_round],
        "fidelity_model": embed.name if embed is not None else "none",
        "grid": {"prompts": [p.text for p in spec.prompts], "seeds": list(spec.seeds), "class_prompt_last": True},
        "thresholds": settings.model_dump(exclude={"prompts", "class_prompt", "seeds", "size", "steps", "strengths"}),
    }
    write_selection(run, record)
    publish_selection(run, spec, record)
    get_run_logger().info("select: %s, epoch %d: %s", selection.verdict, selection.chosen_epoch, "; ".join(reasons))
    return SelectResult(
        verdict=selection.verdict,
        chosen_epoch=selection.chosen_epoch,
        reasons=reasons,
        selection_json=run.selection_json,
        metrics=selection.metrics,
        rounds=record["rounds"],
        record=record,
    )


@step("publish-choice")
def publish_chosen(request: SelectRequest, result: SelectResult, resuming: bool) -> SelectResult:
    """The choice becomes `<name>.safetensors`; `selection.json` gets the last word (how to train an
    undertrained LoRA more; `resuming`: the flow trained on automatically, so say how often)."""
    run = request.run()
    resumes = len(result.rounds) - 1 if resuming else None
    last = run.epochs[max(run.epochs)]
    note = verdict_note(result.verdict, result.chosen_epoch, last, resumes, request.config.selection.max_resumes)
    record = copy.deepcopy(result.record)
    if note:
        record["reasons"].append(note)
        record["rounds"][-1]["reasons"].append(note)
    # Written again from the result: a cached round must not leave an earlier round's file behind.
    write_selection(run, record)
    result = result.model_copy(update={"reasons": record["reasons"], "rounds": record["rounds"], "record": record})
    publish_choice(run, result.chosen_epoch)
    return result


def _chosen_intact(request: SelectRequest, epoch: int, lora_sha: str, txt2img: Path) -> bool:
    return any(Path(txt2img).glob(f"{request.run().name}_e{epoch:06d}_w*.png"))


@stage("txt2img", SELECT_CACHE, outputs_intact=_chosen_intact, gpu=True)
def render_chosen(request: SelectRequest, epoch: int, lora_sha: str, txt2img: Path) -> list[Path]:
    """The chosen epoch at each strength (`selection.strengths`), the sample prompts, into `txt2img-images/`."""
    run, config = request.run(), request.config
    lora = read_lora(run.epochs[epoch])
    spec = SampleSpec.from_config(config, run.name)
    paths, rows = render_strengths(
        _renderer(request, lora), spec, lora, epoch, config.selection.strengths, txt2img, run.name
    )
    labels = SampleSpec(
        tuple(
            replace(prompt, text=f"w {strength:g}: {prompt.text}")
            for strength in config.selection.strengths
            for prompt in spec.prompts
        )
    )
    publish_strengths(run.name, epoch, contact_sheet(rows, labels, title=f"{run.name} epoch {epoch}"))
    get_run_logger().info("txt2img: %d image(s) -> %s", len(paths), txt2img)
    return paths
