"""Train a LoRA of one subject from a folder of photos: the seed's recipe as a Prefect flow.

The seed's author does these steps by hand; each is a cached, retryable stage:

1. ingest   - rename, convert to PNG, make the folder structure (`<token>/training_images/...`)
2. checks   - turn sideways photos upright; find mirrored selfies ("revise the orientation!!")
3. crop     - one whole, clear face per photo; blur, pixelation, upscaling, another person
4. buckets  - put each image in an aspect-ratio bucket, as kohya does (`buckets.csv`)
5. captions - caption each image with BLIP, prefixed "<token>, " (a `.txt` beside it)
6. train    - train the LoRA one epoch per task: `result_current/<token>-000001.safetensors` ...

Later stages (samples, selection) plug in after these, each with its own
`--stop-after` name.

Run it with no server (Prefect's embedded default):

    python -m flows.train_subject PHOTOS --token TOKEN --workdir work
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from prefect import Task, flow
from pydantic import ValidationError

from lora_core.buckets import BucketPlan, buckets_intact
from lora_core.captioning import BlipCaptioner, CaptionModelError, captions_intact
from lora_core.config import ConfigError, LoraConfig, load_config, preset_config, write_kohya_gui
from lora_core.faces import FaceModelError
from lora_core.fs import PathEscapeError
from lora_core.ingest import InputError, TooFewImagesError, ingest_stamp, layout_intact
from lora_core.layout import InvalidTokenError, SubjectLayout, validate_token
from lora_core.lora_io import LoraFileError, read_lora
from lora_core.models import BaseModelError, model_identity, require_base_model
from lora_core.orientation import orientation_intact
from lora_core.quality import quality_intact
from lora_core.training import apply_steps, begin_run, epoch_done, publish_final, read_steps, run_info, run_key
from tasks.buckets import bucket_images
from tasks.captions import caption_images
from tasks.checks import check_images, crop_images
from tasks.ingest import ingest_photos
from tasks.train import TrainRequest, release_trainers, train_epoch

STAGES = ("ingest", "checks", "crop", "buckets", "captions", "train")


@flow(name="train-subject")
def train_subject(
    photos: Path,
    token: str,
    workdir: Path = Path("work"),
    config: LoraConfig | None = None,
    stop_after: str = STAGES[-1],
    base_model_config: str | None = None,
) -> dict:
    """Turn `photos` and a trigger `token` into the seed's layout, stage by stage."""
    if stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGES)}, got {stop_after!r}")
    config = config or preset_config()
    layout = SubjectLayout(Path(workdir), token)
    if STAGES.index(stop_after) >= STAGES.index("train"):
        require_base_model(config.pretrained_model_name_or_path)  # before any work, not after captioning

    storage = layout.prefect_results.resolve()

    cached: list[str] = []

    def run(task: Task, refresh: bool, *args: Any) -> Any:
        """Run a stage with its results under the subject folder; note when it came from the cache."""
        state = task.with_options(result_storage=storage, refresh_cache=refresh)(*args, return_state=True)
        if state.name == "Cached":
            cached.append(task.name)
        return state.result()

    # 1. Ingest. Cached on the photos' content; redone if its output was damaged.
    stamp = ingest_stamp(Path(photos), layout, config.ingest, config.num_repeats)
    ingested = run(
        ingest_photos,
        not layout_intact(layout, stamp),
        Path(photos),
        token,
        Path(workdir),
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
    workdir = Path(workdir)
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
        Path(workdir),
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
    key = run_key(config, model_identity(config.pretrained_model_name_or_path or ""), layout)
    start = begin_run(layout, key, config.network_weights)  # earlier results archived, never overwritten
    config = config.model_copy(update={"network_weights": start})
    request = TrainRequest(
        token=token, workdir=Path(workdir), config=config, run_key=key, base_model_config=base_model_config
    )
    try:
        epochs = [
            run(train_epoch, not epoch_done(layout, key, epoch), request, epoch)
            for epoch in range(1, config.max_train_epochs + 1)
        ]
    finally:
        release_trainers()
    final = publish_final(layout, epochs[-1].epoch)
    config = apply_steps(config, read_steps(layout, key))  # what the run really used, out-of-memory steps included
    config = config.model_copy(update={"network_weights": run_info(layout, key).get("network_weights") or None})
    export(config)
    summary |= {
        "stage": "train",
        "train": {
            "epochs": [e.model_dump(mode="json", exclude={"losses", "lrs"}) for e in epochs],
            "final": str(final),
        },
    }
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.train_subject",
        description="Train a Stable Diffusion LoRA of a subject from a folder of photos "
        "(the seed's recipe, automated). Runs locally on Prefect's embedded default; "
        "set PREFECT_API_URL to report to a Prefect server instead.",
    )
    parser.add_argument("photos", type=Path, help="folder of photos (searched recursively) or a .zip of them")
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
        "--network-weights",
        type=Path,
        help="start from this kohya-format LoRA (ours or kohya's): the seed's way to train an undertrained LoRA more",
    )
    parser.add_argument("--epochs", type=int, help="epochs to train (kohya: max_train_epochs; the seed starts with 6)")
    parser.add_argument(
        "--stop-after", choices=STAGES, default=STAGES[-1], help=f"stop after this stage (stages: {', '.join(STAGES)})"
    )
    return parser


def config_from_args(args: argparse.Namespace) -> LoraConfig:
    """The run's config: the preset, then the config file, then the command line's flags.

    Raises ConfigError or ValidationError naming the bad field; prints config warnings.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(args.config, args.preset) if args.config else preset_config(args.preset or "sd15")
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    updates = {
        "pretrained_model_name_or_path": args.base_model,
        "network_weights": str(args.network_weights) if args.network_weights else None,
        "max_train_epochs": args.epochs,
        "subject_type": args.subject_type,
    }
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
    except (ConfigError, InvalidTokenError, ValidationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = train_subject(
            photos=args.photos,
            token=args.token,
            workdir=args.workdir,
            config=config,
            stop_after=args.stop_after,
            base_model_config=args.base_model_config,
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
            print(f"{epoch_name(epoch)}: epoch {epoch['epoch']}: mean loss {epoch['mean_loss']:.4f} -> {epoch['lora']}")
        samples = [path for epoch in summary["train"]["epochs"] for path in epoch.get("samples", [])]
        if samples:
            print(f"train: {len(samples)} sample image(s) in {Path(samples[0]).parent}")
        print(f"train: final LoRA {summary['train']['final']}")


if __name__ == "__main__":
    sys.exit(main())
