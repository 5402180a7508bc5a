"""Train a LoRA of one subject from a folder of photos: the seed's recipe as a Prefect flow.

The seed's author does these steps by hand; each is a cached, retryable stage:

1. ingest   - rename, convert to PNG, make the folder structure (`<token>/training_images/...`)

Later stages (orientation checks, crop, buckets, captions, training, samples,
selection) plug in after ingest, each with its own `--stop-after` name.

Run it with no server (Prefect's embedded default):

    python -m flows.train_subject PHOTOS --token TOKEN --workdir work
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from prefect import flow

from lora_core.config import ConfigError, LoraConfig, load_config, preset_config, write_kohya_gui
from lora_core.fs import PathEscapeError
from lora_core.ingest import InputError, TooFewImagesError, layout_intact
from lora_core.layout import InvalidTokenError, SubjectLayout, validate_token
from tasks.ingest import ingest_photos

STAGES = ("ingest",)


@flow(name="train-subject")
def train_subject(
    photos: Path,
    token: str,
    workdir: Path = Path("work"),
    config: LoraConfig | None = None,
    stop_after: str = STAGES[-1],
) -> dict:
    """Turn `photos` and a trigger `token` into the seed's layout, stage by stage."""
    if stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGES)}, got {stop_after!r}")
    config = config or preset_config()
    layout = SubjectLayout(Path(workdir), token)

    # 1. Ingest. Cached on the photos' content; redone if its output was damaged.
    ingested = ingest_photos.with_options(
        result_storage=layout.prefect_results.resolve(),
        refresh_cache=not layout_intact(layout),
    )(Path(photos), token, Path(workdir), config.ingest, config.num_repeats)
    write_kohya_gui(
        layout.result_current / "kohya_ss_config.json",
        config,
        train_data_dir=layout.training_images.resolve(),
        output_dir=layout.result_current.resolve(),
        output_name=token,
    )
    summary = {"stage": "ingest", "ingest": ingested.model_dump(mode="json", exclude={"rows"})}
    # Later stages go here, each followed by `if stop_after == "<stage>": return summary`.
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
        "--stop-after", choices=STAGES, default=STAGES[-1], help=f"stop after this stage (stages: {', '.join(STAGES)})"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The embedded server has no network here or on most GPU boxes: don't try to phone home.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        validate_token(args.token)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = load_config(args.config, args.preset) if args.config else preset_config(args.preset or "sd15")
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
    except (ConfigError, InvalidTokenError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = train_subject(
            photos=args.photos, token=args.token, workdir=args.workdir, config=config, stop_after=args.stop_after
        )
    except (TooFewImagesError, InputError, PathEscapeError, InvalidTokenError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    ingest = summary["ingest"]
    print(
        f"ingest: {ingest['accepted']} accepted, {ingest['rejected']} rejected, {ingest['ignored']} ignored "
        f"-> {ingest['class_dir']} (manifest: {ingest['manifest']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
