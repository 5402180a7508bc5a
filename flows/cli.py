"""The command line: `python -m flows.train_subject PHOTOS --token TOKEN` (flags, settings, the printed summary).

Errors follow `lora_core.foundation.errors`: a `UserError` (bad input, unreachable model,
bad setting) prints its message and exits 2, a `RunFailure` (a NaN loss)
exits 1, anything else is a bug and keeps its traceback. A stage's error names
the stage, with no traceback on the terminal (`flows.console`). Ctrl-C stops
within seconds with exit 130, a second one at once (`flows.console`).

What can be checked without the heavy libraries is checked first (the flags,
the photos path, the token, the config), so `--help` and a typo answer at
once: torch, diffusers and Prefect load only once the run is going to start.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows import console
from flows.report import STAGES, Report
from lora_core.families import DEFAULT_PRESET, FAMILIES, PRESETS
from lora_core.foundation.errors import EXIT_USER_ERROR, RunFailure, UserError, exit_code
from lora_core.foundation.layout import SubjectLayout, validate_token

if TYPE_CHECKING:
    from lora_core.config.lora_config import LoraConfig

PROG = "python -m flows.train_subject"
_Option = tuple[tuple[str, ...], dict[str, Any]]

OPTIONS: tuple[_Option, ...] = (
    (
        ("photos",),
        {
            "type": Path,
            "nargs": "?",
            "help": "folder of photos (searched recursively) or a .zip of them; with --select-only, optional "
            "reference photos of the subject (default: the run's own training images)",
        },
    ),
    (
        ("--token",),
        {"required": True, "help": "trigger token naming the subject, e.g. t0k3n: letters, digits, '_' or '-'"},
    ),
    (
        ("--workdir",),
        {
            "type": Path,
            "default": Path("work"),
            "help": "work folder; the subject goes to WORKDIR/TOKEN/ (default: ./work)",
        },
    ),
    (
        ("--config",),
        {"type": Path, "help": "kohya_ss GUI LoRA JSON or CivitAI training JSON; its values override the preset"},
    ),
    (
        ("--preset",),
        {
            "choices": list(PRESETS),
            "help": f"starting settings from the recipe (default: {DEFAULT_PRESET}, or the first preset of the "
            "family a config file names, e.g. sdxl for kohya's sdxl: true)",
        },
    ),
    (
        ("--subject-type",),
        {
            "choices": ["person", "object", "style"],
            "help": "what the LoRA learns (default: person); face-based checks apply to a person only",
        },
    ),
    (
        ("--mirror-policy",),
        {
            "choices": ["flag", "fix", "reject"],
            "help": "photos that look mirrored: flag (report, keep; default), fix (flip back) or reject",
        },
    ),
    (
        ("--quality-policy",),
        {
            "choices": ["flag", "reject"],
            "help": "photos a quality check flags (faces, blur, pixelation, upscaling, another person): flag "
            "(default) or reject",
        },
    ),
    (
        ("--caption-model",),
        {
            "help": "BLIP captioning model: hub id, local folder, or builtin:tiny-blip (no download; nonsense "
            "words) (default: Salesforce/blip-image-captioning-large)"
        },
    ),
    (
        ("--recaption",),
        {
            "action": "store_true",
            "default": None,
            "help": "caption with BLIP even photos that came with a caption (hand-edited caption files are "
            "always kept)",
        },
    ),
    (
        ("--base-model",),
        {
            "help": "base model: hub id, local diffusers folder, .safetensors checkpoint, or "
            + " / ".join(f.builtin for f in FAMILIES.values() if f.builtin)
            + " (no download; for trying the pipeline)"
        },
    ),
    (
        ("--base-model-config",),
        {
            "help": "for a single-file checkpoint: a diffusers folder (or hub id) of the same architecture whose "
            "configs describe it; needed offline, as diffusers otherwise fetches them from the hub"
        },
    ),
    (
        ("--device",),
        {
            "help": "where to train and render: cpu, cuda or cuda:N (default: cuda when there is one, else the "
            "CPU in fp32); an explicit device trains in the config's mixed_precision, on the CPU too"
        },
    ),
    (
        ("--network-weights",),
        {
            "type": Path,
            "help": "start from this kohya-format LoRA (ours or kohya's): the recipe's way to train an "
            "undertrained LoRA more",
        },
    ),
    (
        ("--epochs",),
        {"type": int, "help": "epochs to train (kohya: max_train_epochs; the recipe starts with 6)"},
    ),
    (
        ("--stop-after",),
        {
            "choices": STAGES,
            "default": STAGES[-1],
            "help": f"stop after this stage (stages: {', '.join(STAGES)})",
        },
    ),
    (
        ("--select-only",),
        {
            "type": Path,
            "metavar": "RUN_FOLDER",
            "help": "no training: choose an epoch of an existing run, ours (WORKDIR/TOKEN) or a kohya output "
            "folder of <name>-000001.safetensors files; needs --base-model (or the run's kohya_ss_config.json)",
        },
    ),
    (
        ("--verbose",),
        {
            "action": "store_true",
            "help": "also show other libraries' warnings and progress bars (transformers, diffusers, torch, ...)",
        },
    ),
    (
        ("--max-resumes",),
        {
            "type": int,
            "help": "an undertrained run continues from its last epoch at most this often (default: 2; 0: never)",
        },
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train a Stable Diffusion LoRA of a subject from a folder of photos "
        "(the recipe, automated). Runs locally on Prefect's embedded default; "
        "set PREFECT_API_URL to report to a Prefect server instead.",
    )
    for names, options in OPTIONS:
        parser.add_argument(*names, **options)
    return parser


def config_from_args(args: argparse.Namespace) -> LoraConfig:
    """The run's config: the preset, then the config file, then the command line's flags
    (`lora_core.setup.resolve.subject_config`). Raises `ConfigError` naming the file or flag and the field."""
    from lora_core.setup.resolve import subject_config

    config_file = args.config
    if config_file is None and args.select_only is not None:  # the run's own settings, as we exported them
        for candidate in (args.select_only / "result_current", args.select_only):
            if (candidate / "kohya_ss_config.json").is_file():
                config_file = candidate / "kohya_ss_config.json"
    return subject_config(
        args.preset,
        config_file,
        base_model=args.base_model,
        caption_model=args.caption_model,
        subject_type=args.subject_type,
        mirror_policy=args.mirror_policy,
        quality_policy=args.quality_policy,
        network_weights=args.network_weights,
        epochs=args.epochs,
        max_resumes=args.max_resumes,
        recaption=args.recaption,
        origin="the command line",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.prefect_defaults()
    with console.quiet_libraries(args.verbose):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    if args.select_only is None and args.photos is None:
        return _fail("name the photos folder (or --select-only RUN_FOLDER to choose an epoch of a run)")
    try:
        config = check_args(args)
        with console.guard():
            summary = _run(args, config)
    except console.Stopped as stop:
        return _fail(str(stop), console.EXIT_INTERRUPTED)
    except (UserError, RunFailure) as err:
        return _fail(console.stage_message(err), exit_code(err) or EXIT_USER_ERROR)
    except console.ServerStartError as err:
        return _fail(str(err), console.EXIT_SERVER)
    print_summary(summary)
    for warning in args.config_warnings:  # said first, and again here, where the run's last lines are read
        print(f"warning: {warning}")
    return 0


def check_args(args: argparse.Namespace) -> LoraConfig:
    """Everything that can be said before the run starts: the token, the photos, the subject folder
    not in use, the config, the device, the base model. Raises `UserError` with the reason."""
    validate_token(args.token)
    if args.select_only is None:
        console.check_photos(args.photos, 1, exclude=args.workdir)  # a wrong path: answered before the config loads
        console.check_not_busy(SubjectLayout(args.workdir, args.token))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = config_from_args(args)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    # A config file's unknown keys, repeated at the end of the run's summary (the first say scrolls away).
    args.config_warnings = [str(w.message) for w in caught if type(w.message).__name__ == "ConfigWarning"]
    if args.select_only is None:
        console.check_photos(args.photos, config.ingest.min_images, exclude=args.workdir)
    from lora_core.setup.preflight import preflight  # torch loads here, once the cheap checks passed

    if args.select_only is None:  # a missing model, a starting LoRA that is not one: now, before any work
        stages = Report(args.stop_after)
        preflight(
            config,
            args.device,
            photos=args.photos,
            workdir=args.workdir,
            captions=stages.reaches("captions"),
            training=stages.reaches("train"),
        )
    else:
        from lora_core.training.precision import resolve_device

        resolve_device(args.device)
    return config


def _fail(message: str, code: int = EXIT_USER_ERROR) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace, config: LoraConfig) -> dict:
    from flows.train_subject import select_only, train_subject  # Prefect loads only once the flags are good

    console.quiet_user_errors()
    if args.select_only is not None or Report(args.stop_after).reaches("captions"):  # models load from here on
        console.quiet_library_bars(args.verbose)

    common = {"token": args.token, "config": config, "base_model_config": args.base_model_config}
    if args.select_only is not None:
        return select_only(folder=args.select_only, photos=args.photos, device=args.device, **common)
    return train_subject(
        photos=args.photos, workdir=args.workdir, stop_after=args.stop_after, device=args.device, **common
    )


# --- The summary -------------------------------------------------------------------


def print_summary(summary: dict) -> None:
    """One line per stage that ran, naming the files a user opens next."""

    def name(stage: str) -> str:
        return f"{stage} (cached)" if stage in summary["cached"] else stage

    if "select_only" not in summary:
        for stage, printer in _PRINTERS.items():
            if stage in summary:
                printer(summary, name)
    _print_selection(summary, name)


def _print_ingest(summary: dict, name: Callable[[str], str]) -> None:
    ingest = summary["ingest"]
    print(
        f"{name('ingest')}: {ingest['accepted']} accepted, {ingest['rejected']} rejected, {ingest['ignored']} ignored "
        f"-> {ingest['class_dir']} (manifest: {ingest['manifest']})"
    )


def _print_checks(summary: dict, name: Callable[[str], str]) -> None:
    checks = summary["checks"]
    print(f"{name('checks')}: {checks['rotated']} turned upright, {checks['mirrored']} look mirrored")
    for note in checks["notes"]:
        print(f"checks: {note}")


def _print_crop(summary: dict, name: Callable[[str], str]) -> None:
    crop = summary["crop"]
    framing = ", ".join(f"{n} {kind}" for kind, n in crop["framing"].items())
    print(f"{name('crop')}: {crop['kept']} kept, {crop['flagged']} flagged, {crop['rejected']} left out; {framing}")
    for note in [crop["guidance"], *crop["notes"]]:
        print(f"crop: {note}")
    print(f"crop: scores and decisions per photo in {summary['ingest']['manifest']}")


def _print_buckets(summary: dict, name: Callable[[str], str]) -> None:
    buckets = summary["buckets"]
    counts = ", ".join(f"{bucket}: {n}" for bucket, n in buckets["counts"].items())
    print(f"{name('buckets')}: {counts} (buckets.csv: {buckets['buckets_csv']})")
    if buckets["short"]:
        print(f"buckets: fewer images than a batch in {', '.join(buckets['short'])}")


def _print_captions(summary: dict, name: Callable[[str], str]) -> None:
    captions = summary["captions"]
    sources = ", ".join(f"{n} {source}" for source, n in captions["by_source"].items() if n)
    ran = "" if "captions" in summary["cached"] else f"; BLIP ran on {captions['generated']} image(s)"
    print(f"{name('captions')}: {sources}{ran} (captions.csv: {captions['captions_csv']})")


def _print_train(summary: dict, name: Callable[[str], str]) -> None:
    cached_epochs = summary["cached"].count("train-epoch")
    for epoch in summary["train"]["epochs"]:
        label = "train (cached)" if cached_epochs >= epoch["epoch"] else "train"
        lora = epoch["lora"] or "no file (save_every_n_epochs)"
        print(f"{label}: epoch {epoch['epoch']}: mean training loss {epoch['mean_loss']:.4f} -> {lora}")
    print("train: the training loss is each step's, at its own random noise: it jumps, and only falls on average")
    samples = [path for epoch in summary["train"]["epochs"] for path in epoch.get("samples", [])]
    if samples:
        print(f"train: {len(samples)} sample image(s) in {Path(samples[0]).parent}")
    print(f"train: final LoRA {summary['train']['final']}")


_PRINTERS: dict[str, Callable[[dict, Callable[[str], str]], None]] = {
    "ingest": _print_ingest,
    "checks": _print_checks,
    "crop": _print_crop,
    "buckets": _print_buckets,
    "captions": _print_captions,
    "train": _print_train,
}


def _print_selection(summary: dict, name: Callable[[str], str]) -> None:
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
