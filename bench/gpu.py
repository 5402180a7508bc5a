"""Measure LoRA training on a GPU: full-size SD1.5, SDXL and FLUX.1, our `Trainer` against the plain loop.

Random weights from configs written out in `bench.models` (nothing is
downloaded), the presets' settings (SD1.5: 512 px, fp16; SDXL: 1024 px, bf16
and fp16; FLUX.1-dev's transformer: 1024 px, bf16, stored in fp8 (`flux`) or
NF4 (`flux-12gb`), cached latents and text states from narrow encoders;
batch, rank, text-encoder LoRA and AdamW8bit as the presets have
them; both sides checkpoint when the preset does), `--rounds` rounds each way
of `--steps` steps, alternated. Per case: the median round's steps/s of ours
and of the plain loop, their ratio, peak VRAM (set-up, steps, and the epoch
with one render round), that every loss is finite, that a sample from the
trained UNet decodes without NaN, that a fresh trainer resumes the saved
optimizer state value for value, and the epoch boundary's cost. Results go to
stdout, and to `$OUT/bench-gpu.json` and `$OUT/bench-gpu.md` when `$OUT` is set.

    python -m bench.gpu                 # on a CUDA machine: sd15-fp16, sdxl-bf16, sdxl-fp16
    python -m bench.gpu --cases flux-fp8 flux-nf4 --steps 12 --warmup 2 --rounds 2   # FLUX.1 (12B)
    python -m bench.gpu --vram-cap 12   # as on a 12 GB card: the process may use 12 GB of the GPU at most
    python -m bench.gpu --smoke         # the same code path on the CPU, tiny models, 2 steps (what the tests run)
    python -m bench.gpu --smoke --cases flux-fp8 flux-nf4   # FLUX.1's path on the CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.bare_flux import plain_inputs
from bench.gpu_rounds import (
    bare_round,
    cast_frozen,
    free,
    one_more_step,
    optimizer_values,
    ours_round,
    peak_gb,
    reset_peak,
    same_values,
    sample_finite,
)
from bench.measure import StepClock, all_finite, cap_vram, epoch_boundary, precision_name
from bench.models import ARCHITECTURES, build_base, fingerprint
from bench.subject import make_subject
from lora_core.config.lora_config import LoraConfig
from lora_core.families import preset_config
from lora_core.foundation.layout import SEED_REPEAT_BUDGET

GOAL_VRAM_GB = {"sd15": 6.0, "sdxl": 8.0, "flux": 22.0, "flux-12gb": 11.0}  # by preset
GOAL_RATIO = 1.0  # ours at least as fast as the plain loop
NO_CUDA = "no CUDA device: bench.gpu measures a GPU; run it where one is, or --smoke"


@dataclass(frozen=True)
class Case:
    name: str
    architecture: str  # a key of bench.models.ARCHITECTURES
    preset: str  # a key of GOAL_VRAM_GB
    precision: str


CASES = {
    "sd15-fp16": Case("sd15-fp16", "sd15", "sd15", "fp16"),
    "sdxl-bf16": Case("sdxl-bf16", "sdxl", "sdxl", "bf16"),
    "sdxl-fp16": Case("sdxl-fp16", "sdxl", "sdxl", "fp16"),
    "flux-fp8": Case("flux-fp8", "flux", "flux", "bf16"),
    "flux-nf4": Case("flux-nf4", "flux", "flux-12gb", "bf16"),
}
SMOKE_CASES = {
    "sd15-fp32": Case("sd15-fp32", "sd15-tiny", "sd15", "no"),
    "sdxl-bf16": Case("sdxl-bf16", "sdxl-tiny", "sdxl", "bf16"),
    "flux-fp8": Case("flux-fp8", "flux-tiny", "flux", "bf16"),
    "flux-nf4": Case("flux-nf4", "flux-tiny", "flux-12gb", "bf16"),
}
# Without --cases: the SD cases (FLUX.1's two take longer than the rest together: ask for them by name).
DEFAULT_CASES = {False: ("sd15-fp16", "sdxl-bf16", "sdxl-fp16"), True: ("sd15-fp32", "sdxl-bf16")}


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def case_config(case: Case, args: argparse.Namespace) -> LoraConfig:
    """The preset, changed only where the bench must: the precision, an epoch of `--steps`, no samples.

    `--smoke` also trains with torch's AdamW (bitsandbytes' 8-bit AdamW needs
    CUDA) below the config's 256 px floor; `--set key=value` changes anything else.
    """
    config = preset_config(case.preset)
    updates: dict[str, Any] = {
        "mixed_precision": case.precision,
        "max_train_epochs": 2,  # the resumed trainer's one more step is still inside the schedule
        "sample_every_n_steps": 0,
        "sample_every_n_epochs": 0,
    }
    side = args.resolution or config.resolution
    if side != config.resolution:
        updates |= {"resolution": max(256, side), "min_bucket_reso": min(config.min_bucket_reso, side)}
        updates["max_bucket_reso"] = max(config.max_bucket_reso, side)
    if args.smoke:
        updates["optimizer"] = "AdamW"
    updates |= {key: _value(value) for key, value in (item.split("=", 1) for item in args.set)}
    return LoraConfig.model_validate(config.model_dump() | updates)


def run_case(case: Case, args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    """Ours in full (set-up, an epoch and one render round, the sample, boundary and save), a fresh trainer
    resumed, then the rounds: the plain loop and ours alternated, `--rounds` each; one model at a time."""
    from lora_core.training.state import read_state, write_state
    from lora_core.training.trainer import Trainer

    arch = ARCHITECTURES[case.architecture]
    config = case_config(case, args)
    side = args.resolution or config.resolution
    layout = make_subject(work / case.name, config, side, config.train_batch_size, repeats=args.steps)
    storage = "fp8" if config.fp8_base else "nf4" if config.nf4_base else case.precision
    out: dict[str, Any] = {
        "case": case.name,
        "model": arch.notes or arch.name,
        "resolution": side,
        "batch": config.train_batch_size,
        "rank": config.network_dim,
        "optimizer": config.optimizer.value,
        "train_text_encoder": config.train_text_encoder,
        "gradient_checkpointing": config.gradient_checkpointing,
        "base_storage": storage,
        "precision_asked": case.precision,
        "rounds": args.rounds,
    }

    # -- ours, in full: the first round --
    base = build_base(arch, seed=0, device=device)
    weights = fingerprint(base.unet)
    inputs = plain_inputs(base, layout, device, config)
    out["text_tokens"] = int(inputs.hidden.shape[1])
    cast_frozen(base, case.precision)
    free()
    reset_peak(device)
    start = time.perf_counter()
    trainer = Trainer(config, base, layout, device=str(device), show_progress=False)
    setup_s, setup_peak = time.perf_counter() - start, peak_gb(device)
    precision = precision_name(trainer)
    reset_peak(device)
    clock = StepClock(base.unet, warmup=args.warmup, device=device)
    stats = trainer.run_epoch(1)
    clock.stop()
    steps_peak = peak_gb(device)
    render_round(trainer, side)  # the epoch's sample round counts in its peak
    epoch_peak = peak_gb(device)
    out |= {
        "precision_used": precision,
        "notes": list(getattr(trainer, "notes", [])),
        "ours": {
            "steps_timed": clock.steps,
            "rounds_steps_per_s": [clock.steps_per_s],
            "setup_s": setup_s,
            "peak_setup_gb": setup_peak,
            "peak_steps_gb": steps_peak,
            "peak_epoch_gb": epoch_peak,
            "losses_finite": all_finite(stats.losses),
            "mean_loss": stats.mean_loss,
            "skipped_steps": list(getattr(stats, "skipped_steps", [])),
        },
    }
    out["sample_finite"] = sample_finite(base, inputs, config, precision, device)
    out["boundary"] = epoch_boundary(trainer, stats, repeats=1)
    state = work / case.name / "resume.safetensors"
    write_state(trainer, state)
    saved = optimizer_values(trainer)
    del trainer, base, clock
    free()

    # -- a fresh trainer continues from the saved state: the same optimizer values, then one more finite step --
    base = build_base(arch, seed=0, device=device)
    cast_frozen(base, case.precision)
    resumed = Trainer(config, base, layout, device=str(device), show_progress=False)
    read_state(resumed, state)
    loaded_step, loaded = resumed.global_step, optimizer_values(resumed)
    more = one_more_step(resumed)
    out["resume"] = {
        "loaded_global_step": loaded_step,
        "optimizer_slots": sorted({key.split(".", 1)[1] for key in saved}),
        "values_match": same_values(saved, loaded),
        "losses": more,
        "finite": all_finite(more) and loaded_step == args.steps and same_values(saved, loaded),
    }
    del resumed, base
    free()

    # -- the rounds: the plain loop and ours, alternated, on fresh copies of the same weights --
    bare_rounds = []
    for index in range(args.rounds):
        if index:
            out["ours"]["rounds_steps_per_s"].append(
                ours_round(arch, config, layout, case.precision, device, args.warmup)
            )
        bare_rounds.append(bare_round(arch, inputs, config, precision, device, args.steps, args.warmup))
    losses = [loss for r in bare_rounds for loss in r["losses"]]
    out["bare"] = {
        "steps_timed": args.steps - args.warmup,
        "rounds_steps_per_s": [r["steps_per_s"] for r in bare_rounds],
        "peak_steps_gb": max((r["peak"] for r in bare_rounds if r["peak"] is not None), default=None),
        "losses_finite": all_finite(losses),
        "mean_loss": sum(losses) / len(losses),
        "same_weights": all(r["weights"] == weights for r in bare_rounds),
    }
    ours, plain = out["ours"], out["bare"]
    ours["steps_per_s"] = statistics.median(ours["rounds_steps_per_s"])
    plain["steps_per_s"] = statistics.median(plain["rounds_steps_per_s"])
    out["ratio"] = ours["steps_per_s"] / plain["steps_per_s"]
    boundary_s = out["boundary"]["save_epoch_s"] + out["boundary"]["artifact_s"]
    seed_steps = SEED_REPEAT_BUDGET // config.train_batch_size
    out["boundary_share_seed_epoch"] = boundary_s / (seed_steps / ours["steps_per_s"])
    peaks = [p for p in (setup_peak, steps_peak, epoch_peak) if p is not None]
    out["peak_gb"] = max(peaks) if peaks else None
    out["goal_vram_gb"] = GOAL_VRAM_GB[case.preset]
    out["preset"] = case.preset
    return out


def render_round(trainer: Any, side: int) -> None:
    """One sample round as an epoch ends (a prompt, 4 steps, at the training side), on the trainer's models."""
    from lora_core.training.sampling import SampleSpec, render

    config = trainer.config.model_copy(update={"sample_prompts": f"bench, portrait photo --w {side} --h {side} --s 4"})
    with trainer.models_on_device():
        render(trainer.base, SampleSpec.from_config(config, "bench"), trainer.precision)


def _gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _rounds(side: dict[str, Any]) -> str:
    return ", ".join(f"{value:.3f}" for value in side["rounds_steps_per_s"])


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def report(result: dict[str, Any]) -> str:
    """A markdown table of every case, with the goals beside the figures."""
    lines = [
        f"# bench.gpu ({'smoke, ' if result['smoke'] else ''}{result['date']})",
        "",
        f"device: {result['device']}; torch {result['torch']}, Python {result['python']}; "
        f"{result['rounds']} rounds each way, alternated, of {result['steps']} steps, the first {result['warmup']} "
        "untimed; steps/s: the median round"
        + (f"; memory capped at {result['vram_cap_gb']} GB" if result.get("vram_cap_gb") else ""),
        "",
        "| case | px | batch | precision | ours steps/s | bare steps/s | ours/bare (goal >= 1) "
        "| peak VRAM GB ours: set-up / steps / epoch with a render round (goal) | bare peak GB | losses finite "
        "| sample decodes "
        "| optimizer state resumes | epoch boundary |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        if "error" in case:
            lines.append(f"| {case['case']} | failed: {case['error'].splitlines()[0][:300]} |" + " |" * 11)
            continue
        ours, bare, resume = case["ours"], case["bare"], case["resume"]
        goal = case["goal_vram_gb"]
        vram_ok = case["peak_gb"] is not None and case["peak_gb"] <= goal
        vram = f"{_gb(ours['peak_setup_gb'])} / {_gb(ours['peak_steps_gb'])} / {_gb(ours['peak_epoch_gb'])} " + (
            f"(<= {goal:.0f}: {_yes(vram_ok)})" if case["peak_gb"] is not None else f"(<= {goal:.0f}: n/a)"
        )
        boundary = case["boundary"]["save_epoch_s"] + case["boundary"]["artifact_s"]
        lines.append(
            f"| {case['case']} | {case['resolution']} | {case['batch']} | {case['precision_used']} "
            f"| {ours['steps_per_s']:.3f} | {bare['steps_per_s']:.3f} "
            f"| {case['ratio']:.3f} ({_yes(case['ratio'] >= GOAL_RATIO)}) | {vram} | {_gb(bare['peak_steps_gb'])} "
            f"| {_yes(ours['losses_finite'] and bare['losses_finite'])} | {_yes(case['sample_finite'])} "
            f"| {_yes(resume['finite'])} (step {resume['loaded_global_step']}) "
            f"| {boundary:.2f} s ({100 * case['boundary_share_seed_epoch']:.2f}% of a seed epoch) |"
        )
    lines.append("")
    for case in (c for c in result["cases"] if "error" not in c):
        details = [
            f"optimizer {case['optimizer']}",
            f"rank {case['rank']}",
            f"text-encoder LoRA {case['train_text_encoder']}",
            f"gradient checkpointing {case['gradient_checkpointing']}",
            f"preset {case.get('preset')}, frozen weights stored {case.get('base_storage')}, "
            f"{case.get('text_tokens')} text tokens",
            f"same weights both ways {case['bare']['same_weights']}",
            f"optimizer slots {case['resume']['optimizer_slots']} (values equal after a resume: "
            f"{case['resume']['values_match']})",
            f"steps/s a round: ours {_rounds(case['ours'])}, bare {_rounds(case['bare'])}",
        ]
        if not case["boundary"].get("artifact_timed", True):
            details.append("epoch boundary: save_epoch alone (no Prefect on this machine: the artifact not timed)")
        if case["ours"]["skipped_steps"]:
            details.append(f"fp16 steps skipped on overflow {case['ours']['skipped_steps']}")
        details += [f"note: {note}" for note in case["notes"]]
        lines.append(f"- {case['case']} ({case['model']}): " + "; ".join(details))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, 2 steps, 64 px (the tests)")
    parser.add_argument(
        "--cases",
        nargs="+",
        help=f"of {', '.join(CASES)} (smoke: {', '.join(SMOKE_CASES)}); default {', '.join(DEFAULT_CASES[False])} "
        f"(smoke: {', '.join(DEFAULT_CASES[True])})",
    )
    parser.add_argument("--steps", type=int, help="steps a round (default 30; smoke 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds each way, alternated (default 3)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (default 5; smoke 1)")
    parser.add_argument("--resolution", type=int, help="photo side in px (default: the preset's; smoke 64)")
    parser.add_argument("--device", help="default cuda (smoke: cpu); an explicit cpu runs full sizes, slowly")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change a config field")
    parser.add_argument("--vram-cap", type=float, metavar="GB", help="play a 10, 12, 16 or 24 GB card: cap GPU memory")
    args = parser.parse_args(argv)
    if args.vram_cap is not None and args.vram_cap <= 0:
        parser.error("--vram-cap must be a positive number of GB")
    cases = SMOKE_CASES if args.smoke else CASES
    args.steps = args.steps or (2 if args.smoke else 30)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.resolution = args.resolution or (64 if args.smoke else None)
    if args.steps <= args.warmup:
        parser.error("--steps must be more than --warmup")
    if args.cases and (unknown := set(args.cases) - set(cases)):
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(cases)}")
    if args.device is None and not args.smoke and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result: dict[str, Any] = {
        "bench": "gpu",
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": f"{device} ({name})",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "cases": [],
        "vram_cap_gb": cap_vram(device, args.vram_cap),
    }
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        for key in args.cases or DEFAULT_CASES[args.smoke]:
            try:
                result["cases"].append(run_case(cases[key], args, device, work))
            except Exception as error:  # one failed case (NaN, out of memory) must not lose the others' figures
                failure = {"case": key, "error": f"{type(error).__name__}: {error}"}
                result["cases"].append(failure | {"traceback": traceback.format_exc()})
                print(traceback.format_exc(), file=sys.stderr)
            free()
            print(f"{key}: {result['cases'][-1].get('error', 'done')}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(result)
    print(text)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-gpu.json").write_text(json.dumps(result, indent=2))
        (out / "bench-gpu.md").write_text(text)
    return 1 if any("error" in case for case in result["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
