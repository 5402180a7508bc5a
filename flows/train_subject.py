"""Train a LoRA of one subject from a folder of photos: the seed's recipe as a Prefect flow.

The seed's author does these steps by hand; each is a cached, retryable stage:

1. ingest   - rename, convert to PNG, make the folder structure (`<token>/training_images/...`)
2. checks   - turn sideways photos upright; find mirrored selfies ("revise the orientation!!")
3. crop     - one whole, clear face per photo; blur, pixelation, upscaling, another person
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
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, flow
from pydantic import ValidationError

from lora_core.blip import BlipCaptioner, CaptionModelError
from lora_core.buckets import BucketPlan, buckets_intact
from lora_core.captioning import captions_intact
from lora_core.config import ConfigError, LoraConfig, preset_config
from lora_core.config_io import load_config, write_kohya_gui
from lora_core.faces import FaceModelError
from lora_core.fs import PathEscapeError, sha256_file
from lora_core.ingest import InputError, TooFewImagesError, ingest_stamp, layout_intact
from lora_core.layout import InvalidTokenError, SubjectLayout, validate_token
from lora_core.lora_io import LoraFileError, read_lora, read_metadata
from lora_core.memory import apply_steps
from lora_core.metric_grids import grids_intact
from lora_core.models import BaseModelError, model_identity, require_base_model
from lora_core.orientation import orientation_intact
from lora_core.precision import DeviceError, resolve_device, resolve_precision
from lora_core.quality import quality_intact
from lora_core.run_folder import SelectionError, find_run
from lora_core.run_state import (
    NonFiniteWeightsError,
    begin_run,
    epoch_done,
    publish_final,
    read_steps,
    run_info,
    run_key,
)
from lora_core.training import NonFiniteLossError
from tasks.buckets import bucket_images
from tasks.captions import caption_images
from tasks.checks import check_images, crop_images
from tasks.ingest import ingest_photos
from tasks.select import (
    SelectRequest,
    finish_selection,
    release_renderers,
    render_chosen,
    render_metric_grids,
    select_epoch,
)
from tasks.train import TrainRequest, release_trainers, train_epoch

STAGES = ("ingest", "checks", "crop", "buckets", "captions", "train", "samples", "select")


@flow(name="train-subject")
def train_subject(
    photos: Path,
    token: str,
    workdir: Path = Path("work"),
    config: LoraConfig | None = None,
    stop_after: str = STAGES[-1],
    base_model_config: str | None = None,
    device: str | None = None,
) -> dict:
    """Turn `photos` and a trigger `token` into the seed's layout, stage by stage.

    `device`: `cpu`, `cuda` or `cuda:N` (default: `cuda` when there is one, else the CPU in fp32).
    """
    if stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGES)}, got {stop_after!r}")
    config = config or preset_config()
    workdir = Path(workdir)
    layout = SubjectLayout(workdir, token)
    if STAGES.index(stop_after) >= STAGES.index("train"):
        require_base_model(config.pretrained_model_name_or_path)  # before any work, not after captioning
        resolve_device(device)

    cached: list[str] = []
    run = _stage_runner(layout.prefect_results.resolve(), cached)

    # 1. Ingest. Cached on the photos' content; redone if its output was damaged.
    stamp = ingest_stamp(Path(photos), layout, config.ingest, config.num_repeats)
    ingested = run(
        ingest_photos,
        not layout_intact(layout, stamp),
        Path(photos),
        token,
        workdir,
        config.ingest,
        config.num_repeats,
    )

    def export(config: LoraConfig) -> None:
        """The run's kohya_ss GUI JSON in result_current/ (the seed loads it in kohya_ss)."""
        paths = {"train_data_dir": layout.training_images.resolve(), "output_dir": layout.result_current.resolve()}
        write_kohya_gui(layout.result_current / "kohya_ss_config.json", config, output_name=token, **paths)

    if not any(layout.result_current.glob("*.safetensors")):  # never over a trained run's own JSON
        export(config)
    summary: dict = {"stage": "ingest", "cached": cached, "ingest": ingested.model_dump(mode="json", exclude={"rows"})}
    if stop_after == "ingest":
        return summary

    # 2. Checks: sideways photos turned upright, mirrored ones found (flagged, fixed or left out, by policy).
    checks = (config.checks, config.subject_type, config.ingest.min_images)
    checked = run(check_images, not orientation_intact(layout, ingested.rows, *checks), ingested, workdir, *checks)
    summary |= {"stage": "checks", "checks": checked.model_dump(mode="json", exclude={"rows"})}
    if stop_after == "checks":
        return summary

    # 3. Crop and quality: one whole, clear face of the subject per photo, no blur, pixelation or upscaling.
    cropped = run(crop_images, not quality_intact(layout, checked.rows, *checks), checked, workdir, *checks)
    summary |= {"stage": "crop", "crop": cropped.model_dump(mode="json", exclude={"rows"})}
    if stop_after == "crop":
        return summary

    # 4. Buckets, as kohya makes them; batches never mix buckets.
    plan = BucketPlan.from_config(config)
    bucketed = run(bucket_images, not buckets_intact(layout, plan), cropped, workdir, plan, config.train_batch_size)
    summary |= {"stage": "buckets", "buckets": bucketed.model_dump(mode="json", exclude={"rows"})}
    if stop_after == "buckets":
        return summary

    # 5. Captions. BLIP's words are cached per image; an edited caption file is kept.
    captioned = run(
        caption_images,
        not captions_intact(layout, config.caption_extension, config.captioning),
        cropped,
        workdir,
        config.captioning,
        config.caption_extension,
        BlipCaptioner(config.captioning.model).identity,
    )
    summary |= {"stage": "captions", "captions": captioned.model_dump(mode="json", exclude={"records"})}
    if stop_after == "captions":
        return summary

    # 6. Train, one task per epoch; a killed run continues at its first unfinished epoch.
    if config.network_weights:  # the seed's resume: start from a LoRA, at its rank and alpha
        source = read_lora(Path(config.network_weights))
        rank, alpha = source.rank, next(iter(source.modules.values()))[2]
        config = config.model_copy(update={"network_dim": rank, "network_alpha": alpha})
    identity = model_identity(config.pretrained_model_name_or_path or "")
    precision = resolve_precision(config.mixed_precision, device).name  # what will really be used
    key = run_key(config, identity, layout, precision=precision)
    start = begin_run(layout, key, config.network_weights)  # earlier results archived, never overwritten
    config = config.model_copy(update={"network_weights": start})

    def train(config: LoraConfig, key: str, first_epoch: int = 1) -> list[Any]:
        request = TrainRequest(
            token=token,
            workdir=workdir,
            config=config,
            run_key=key,
            base_model_config=base_model_config,
            first_epoch=first_epoch,
            device=device,
        )
        try:
            return [
                run(train_epoch, not epoch_done(layout, key, epoch), request, epoch)
                for epoch in range(first_epoch, first_epoch + config.max_train_epochs)
            ]
        finally:
            release_trainers()

    epochs = train(config, key)
    final = publish_final(layout, epochs[-1].epoch)
    trained = apply_steps(config, read_steps(layout, key))  # what the run really used, out-of-memory steps included
    trained = trained.model_copy(update={"network_weights": run_info(layout, key).get("network_weights") or None})
    export(trained)

    def train_summary() -> dict:
        return {"epochs": [e.model_dump(mode="json", exclude={"losses", "lrs"}) for e in epochs], "final": str(final)}

    summary |= {"stage": "train", "train": train_summary()}
    if stop_after == "train":
        return summary

    # 7-8. Samples and selection. Undertrained: continue from the last epoch's LoRA, as the seed does by
    # hand, `resume_epochs` more epochs at a time, at most `max_resumes` times; then select again.
    request = SelectRequest(
        folder=layout.result_current, token=token, config=config, base_model_config=base_model_config, device=device
    )
    rounds: list[dict] = []
    try:
        while True:
            request = request.model_copy(update={"epochs": [e.epoch for e in epochs if e.lora]})
            choice = choose_epoch(run, request, rounds, stop_after, summary)
            if choice is None:  # stopped after the samples
                return summary
            rounds = choice.rounds
            if choice.verdict != "undertrained" or len(rounds) > config.selection.max_resumes:
                break
            last = epochs[-1].epoch
            more = LoraConfig.model_validate(
                config.model_dump()
                | {"network_weights": str(layout.epoch_lora(last)), "max_train_epochs": config.selection.resume_epochs}
            )
            release_renderers()  # one copy of the base model in memory: the trainer's
            resumed = run_key(more, identity, layout, first_epoch=last + 1, precision=precision)
            start = begin_run(layout, resumed, more.network_weights, continues=key)
            key = resumed
            epochs += train(more.model_copy(update={"network_weights": start}), key, first_epoch=last + 1)
            summary["train"] = train_summary()
        finish(run, request, choice, summary, layout.txt2img_images, resuming=True)
    finally:
        release_renderers()
    summary["train"]["final"] = str(layout.final_lora)
    return summary


def _stage_runner(storage: Path, cached: list[str]) -> Any:
    """Run a stage with its results in `storage`, refreshed when asked; note when it came from the cache."""

    def run(task: Task, refresh: bool, *args: Any) -> Any:
        state = task.with_options(result_storage=storage, refresh_cache=refresh)(*args, return_state=True)
        if state.name == "Cached":
            cached.append(task.name)
        return state.result()

    return run


def choose_epoch(run: Any, request: SelectRequest, rounds: list[dict], stop_after: str, summary: dict) -> Any:
    """The samples and select stages once: every epoch's grid, then the choice (None: stopped after samples)."""
    files = request.run()
    intact = grids_intact(files, request.spec(), request.base_identity())
    grids = run(render_metric_grids, not intact, request, request.epoch_hashes())
    summary |= {"stage": "samples", "samples": grids.model_dump(mode="json")}
    if stop_after == "samples":
        return None
    choice = run(select_epoch, not files.selection_json.is_file(), request, request.epoch_hashes(), rounds)
    summary |= {"stage": "select", "select": choice.model_dump(mode="json", exclude={"metrics", "record"})}
    return choice


def finish(run: Any, request: SelectRequest, choice: Any, summary: dict, txt2img: Path, resuming: bool) -> None:
    """The choice becomes `<name>.safetensors`; render it at each strength into `txt2img`."""
    files = request.run()
    note = None
    if choice.verdict == "undertrained":
        last = files.epochs[max(files.epochs)]
        how = f"to train more, run again with --network-weights {last}"
        if resuming:
            resumes, most = len(choice.rounds) - 1, request.config.selection.max_resumes
            note = f"still undertrained after {resumes} resume(s) (max_resumes {most}): epoch "
            note += f"{choice.chosen_epoch} is the best so far; {how}"
        else:
            note = f"undertrained: epoch {choice.chosen_epoch} is the best so far; {how}"
    choice = finish_selection(request, choice, note)
    epoch = choice.chosen_epoch
    sha = sha256_file(files.epochs[epoch])
    done = list(txt2img.glob(f"{files.name}_e{epoch:06d}_w*.png"))
    paths = run(render_chosen, not done, request, epoch, sha, txt2img)
    summary["select"] = choice.model_dump(mode="json", exclude={"metrics", "record"}) | {
        "final": str(files.final),
        "txt2img": [str(p) for p in paths],
    }


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
    first = read_metadata(next(iter(files.epochs.values())))
    if not config.sdxl and first.get("ss_base_model_version", "").startswith("sdxl"):
        config = LoraConfig.model_validate(config.model_dump() | {"sdxl": True})  # kohya's files say so
    cached: list[str] = []
    run = _stage_runner((files.folder / ".prefect-results").resolve(), cached)
    request = SelectRequest(
        folder=files.folder,
        token=token,
        config=config,
        photos=photos,
        base_model_config=base_model_config,
        device=device,
    )
    summary: dict = {"cached": cached, "select_only": str(files.folder)}
    try:
        choice = choose_epoch(run, request, [], STAGES[-1], summary)
        txt2img = (files.layout.txt2img_images if files.layout else files.folder / "txt2img-images").resolve()
        finish(run, request, choice, summary, txt2img, resuming=False)
    finally:
        release_renderers()
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.train_subject",
        description="Train a Stable Diffusion LoRA of a subject from a folder of photos "
        "(the seed's recipe, automated). Runs locally on Prefect's embedded default; "
        "set PREFECT_API_URL to report to a Prefect server instead.",
    )
    parser.add_argument(
        "photos",
        type=Path,
        nargs="?",
        help="folder of photos (searched recursively) or a .zip of them; with --select-only, optional reference "
        "photos of the subject (default: the run's own training images)",
    )
    parser.add_argument(
        "--token", required=True, help="trigger token naming the subject, e.g. t0k3n: letters, digits, '_' or '-'"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("work"),
        help="work folder; the subject goes to WORKDIR/TOKEN/ (default: ./work)",
    )
    parser.add_argument(
        "--config", type=Path, help="kohya_ss GUI LoRA JSON or CivitAI training JSON; its values override the preset"
    )
    parser.add_argument(
        "--preset",
        choices=["sd15", "sdxl"],
        help="starting settings from the seed's recipe (default: sd15, or sdxl when the config file is SDXL)",
    )
    parser.add_argument(
        "--subject-type",
        choices=["person", "object", "style"],
        help="what the LoRA learns (default: person); face-based checks apply to a person only",
    )
    parser.add_argument(
        "--mirror-policy",
        choices=["flag", "fix", "reject"],
        help="photos that look mirrored: flag (report, keep; default), fix (flip back) or reject",
    )
    parser.add_argument(
        "--quality-policy",
        choices=["flag", "reject"],
        help="photos a quality check flags (faces, blur, pixelation, upscaling, another person): flag (default) "
        "or reject",
    )
    parser.add_argument(
        "--caption-model",
        help="BLIP captioning model: hub id, local folder, or builtin:tiny-blip (no download; nonsense words) "
        f"(default: {preset_config().captioning.model})",
    )
    parser.add_argument(
        "--recaption",
        action="store_true",
        help="caption with BLIP even photos that came with a caption (hand-edited caption files are always kept)",
    )
    parser.add_argument(
        "--base-model",
        help="base model: hub id, local diffusers folder, .safetensors checkpoint, "
        "or builtin:tiny-sd15 / builtin:tiny-sdxl (no download; for trying the pipeline)",
    )
    parser.add_argument(
        "--base-model-config",
        help="for a single-file checkpoint: a diffusers folder (or hub id) of the same architecture whose "
        "configs describe it; needed offline, as diffusers otherwise fetches them from the hub",
    )
    parser.add_argument(
        "--device",
        help="where to train and render: cpu, cuda or cuda:N (default: cuda when there is one, else the CPU in "
        "fp32); an explicit device trains in the config's mixed_precision, on the CPU too",
    )
    parser.add_argument(
        "--network-weights",
        type=Path,
        help="start from this kohya-format LoRA (ours or kohya's): the seed's way to train an undertrained LoRA more",
    )
    parser.add_argument("--epochs", type=int, help="epochs to train (kohya: max_train_epochs; the seed starts with 6)")
    parser.add_argument(
        "--stop-after", choices=STAGES, default=STAGES[-1], help=f"stop after this stage (stages: {', '.join(STAGES)})"
    )
    parser.add_argument(
        "--select-only",
        type=Path,
        metavar="RUN_FOLDER",
        help="no training: choose an epoch of an existing run, ours (WORKDIR/TOKEN) or a kohya output folder of "
        "<name>-000001.safetensors files; needs --base-model (or the run's kohya_ss_config.json)",
    )
    parser.add_argument(
        "--max-resumes",
        type=int,
        help="an undertrained run continues from its last epoch at most this often (default: 2; 0: never)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> LoraConfig:
    """The run's config: the preset, then the config file, then the command line's flags.

    Raises ConfigError or ValidationError naming the bad field; prints config warnings.
    """
    config_file = args.config
    if config_file is None and args.select_only is not None:  # the run's own settings, as we exported them
        for candidate in (
            args.select_only / "kohya_ss_config.json",
            args.select_only / "result_current" / "kohya_ss_config.json",
        ):
            config_file = candidate if candidate.is_file() else config_file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(config_file, args.preset) if config_file else preset_config(args.preset or "sd15")
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    updates = {
        "pretrained_model_name_or_path": args.base_model,
        "network_weights": str(args.network_weights) if args.network_weights else None,
        "max_train_epochs": args.epochs,
        "subject_type": args.subject_type,
    }
    if args.max_resumes is not None:
        updates["selection"] = config.selection.model_dump() | {"max_resumes": args.max_resumes}
    updates = {key: value for key, value in updates.items() if value is not None}
    checks = {"mirror_policy": args.mirror_policy, "quality_policy": args.quality_policy}
    if any(value is not None for value in checks.values()):
        updates["checks"] = config.checks.model_dump() | {k: v for k, v in checks.items() if v is not None}
    if args.caption_model or args.recaption:
        updates["captioning"] = config.captioning.model_dump() | {
            "model": args.caption_model or config.captioning.model,
            "recaption": args.recaption,
        }
    return LoraConfig.model_validate(config.model_dump() | updates) if updates else config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The embedded server has no network here or on most GPU boxes: don't try to phone home.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        validate_token(args.token)
        config = config_from_args(args)
        resolve_device(args.device)
    except (ConfigError, InvalidTokenError, ValidationError, DeviceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.select_only is None and args.photos is None:
        print(
            "error: name the photos folder (or --select-only RUN_FOLDER to choose an epoch of a run)", file=sys.stderr
        )
        return 2
    try:
        if args.select_only is not None:
            summary = select_only(
                folder=args.select_only,
                token=args.token,
                config=config,
                photos=args.photos,
                base_model_config=args.base_model_config,
                device=args.device,
            )
        else:
            summary = train_subject(
                photos=args.photos,
                token=args.token,
                workdir=args.workdir,
                config=config,
                stop_after=args.stop_after,
                base_model_config=args.base_model_config,
                device=args.device,
            )
    except (
        TooFewImagesError,
        InputError,
        PathEscapeError,
        InvalidTokenError,
        CaptionModelError,
        BaseModelError,
        LoraFileError,
        FaceModelError,
        SelectionError,
        DeviceError,
        NonFiniteLossError,
        NonFiniteWeightsError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    """One line per stage that ran, naming the files a user opens next."""

    def name(stage: str) -> str:
        return f"{stage} (cached)" if stage in summary["cached"] else stage

    def epoch_name(epoch: dict) -> str:
        cached = sum(1 for stage in summary["cached"] if stage == "train-epoch") >= epoch["epoch"]
        return "train (cached)" if cached else "train"

    if "select_only" in summary:
        print_selection(summary, name)
        return
    ingest = summary["ingest"]
    print(
        f"{name('ingest')}: {ingest['accepted']} accepted, {ingest['rejected']} rejected, {ingest['ignored']} ignored "
        f"-> {ingest['class_dir']} (manifest: {ingest['manifest']})"
    )
    if "checks" in summary:
        checks = summary["checks"]
        print(f"{name('checks')}: {checks['rotated']} turned upright, {checks['mirrored']} look mirrored")
        for note in checks["notes"]:
            print(f"checks: {note}")
    if "crop" in summary:
        crop = summary["crop"]
        framing = ", ".join(f"{n} {kind}" for kind, n in crop["framing"].items())
        print(f"{name('crop')}: {crop['kept']} kept, {crop['flagged']} flagged, {crop['rejected']} left out; {framing}")
        for note in [crop["guidance"], *crop["notes"]]:
            print(f"crop: {note}")
        print(f"crop: scores and decisions per photo in {summary['ingest']['manifest']}")
    if "buckets" in summary:
        buckets = summary["buckets"]
        counts = ", ".join(f"{bucket}: {n}" for bucket, n in buckets["counts"].items())
        print(f"{name('buckets')}: {counts} (buckets.csv: {buckets['buckets_csv']})")
        if buckets["short"]:
            print(f"buckets: fewer images than a batch in {', '.join(buckets['short'])}")
    if "captions" in summary:
        captions = summary["captions"]
        sources = ", ".join(f"{n} {source}" for source, n in captions["by_source"].items() if n)
        ran = "" if "captions" in summary["cached"] else f"; BLIP ran on {captions['generated']} image(s)"
        print(f"{name('captions')}: {sources}{ran} (captions.csv: {captions['captions_csv']})")
    if "train" in summary:
        for epoch in summary["train"]["epochs"]:
            lora = epoch["lora"] or "no file (save_every_n_epochs)"
            print(f"{epoch_name(epoch)}: epoch {epoch['epoch']}: mean loss {epoch['mean_loss']:.4f} -> {lora}")
        samples = [path for epoch in summary["train"]["epochs"] for path in epoch.get("samples", [])]
        if samples:
            print(f"train: {len(samples)} sample image(s) in {Path(samples[0]).parent}")
        print(f"train: final LoRA {summary['train']['final']}")
    print_selection(summary, name)


def print_selection(summary: dict, name: Callable[[str], str]) -> None:
    """The samples and select stages: what was rendered, the verdict with its reasons, the files."""
    if "samples" in summary:
        grids = summary["samples"]
        rendered = ", ".join("base" if e == 0 else str(e) for e in grids["rendered"]) or "none new"
        rendered = "" if "samples" in summary["cached"] else f" ({rendered} rendered)"
        print(f"{name('samples')}: metric grids of epochs {grids['epochs']} and the base model{rendered}")
        print(f"samples: grids in {grids['folder']}")
    if "select" in summary:
        choice = summary["select"]
        print(f"{name('select')}: {choice['verdict']}, epoch {choice['chosen_epoch']} -> {choice.get('final', '')}")
        for round_ in choice["rounds"][:-1]:
            print(f"select: round {round_['round']}: {round_['verdict']} after epoch {round_['epochs'][-1]}: resumed")
        for reason in choice["reasons"]:
            print(f"select: {reason}")
        print(f"select: metrics and reasons in {choice['selection_json']}")
        if choice.get("txt2img"):
            print(f"txt2img: {len(choice['txt2img'])} image(s) in {Path(choice['txt2img'][0]).parent}")


if __name__ == "__main__":
    sys.exit(main())
