"""Measure LoRA training on a GPU: full-size SD1.5 and SDXL, our `Trainer` against the plain loop.

Random weights from configs written out in `bench.models` (nothing is
downloaded), the presets' settings (SD1.5: 512 px, fp16; SDXL: 1024 px, bf16
and fp16; batch, rank, text-encoder LoRA and AdamW8bit as the presets have
them), `--steps` steps each way. Per case: steps/s of ours and of the plain
loop, their ratio, peak VRAM, that every loss is finite, that a sample from
the trained UNet decodes without NaN, that the optimizer state saves and a
fresh trainer resumes from it, and the epoch boundary's cost. Results go to
stdout, and to `$OUT/bench-gpu.json` and `$OUT/bench-gpu.md` when `$OUT` is set.

    python -m bench.gpu                 # on a CUDA machine: sd15-fp16, sdxl-bf16, sdxl-fp16
    python -m bench.gpu --vram-cap 12   # as on a 12 GB card: the process may use 12 GB of the GPU at most
    python -m bench.gpu --smoke         # the same code path on the CPU, tiny models, 2 steps (what the tests run)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.bare_loop import BareLoop, bare_inputs
from bench.measure import StepClock, all_finite, cap_vram, epoch_boundary, precision_name, sample_decodes
from bench.models import ARCHITECTURES, build_base, fingerprint, make_subject
from lora_core.config.lora_config import LoraConfig
from lora_core.families import preset_config
from lora_core.foundation.layout import SEED_REPEAT_BUDGET

GOAL_VRAM_GB = {"sd15": 6.0, "sdxl": 8.0}
GOAL_RATIO = 1.0  # ours at least as fast as the plain loop
NO_CUDA = "no CUDA device: bench.gpu measures a GPU; run it where one is, or --smoke"
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    name: str
    architecture: str  # a key of bench.models.ARCHITECTURES
    preset: str  # sd15 or sdxl
    precision: str


CASES = {
    "sd15-fp16": Case("sd15-fp16", "sd15", "sd15", "fp16"),
    "sdxl-bf16": Case("sdxl-bf16", "sdxl", "sdxl", "bf16"),
    "sdxl-fp16": Case("sdxl-fp16", "sdxl", "sdxl", "fp16"),
}
SMOKE_CASES = {
    "sd15-fp32": Case("sd15-fp32", "sd15-tiny", "sd15", "no"),
    "sdxl-bf16": Case("sdxl-bf16", "sdxl-tiny", "sdxl", "bf16"),
}


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


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def _cast_frozen(base: Any, precision: str) -> None:
    """Frozen UNet and text encoders in the training dtype, as the trainer keeps them (the VAE stays fp32).

    Our models are built on the device in fp32 (fast, seeded); a real run loads
    them in host memory and the trainer casts while moving, so the GPU never
    holds an fp32 copy. Casting first keeps that copy out of the measured peak.
    """
    for module in (base.unet, *base.text_encoders):
        module.to(dtype=_DTYPES[precision])


def _optimizer_state(trainer: Any) -> dict[str, str]:
    """The first parameter's optimizer slots and their dtypes (8-bit AdamW keeps uint8 moments)."""
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is None:
        return {}
    states = list(optimizer.state.values())  # the live slots: bitsandbytes nests them in its state_dict
    if not states:
        return {}
    return {key: str(value.dtype).removeprefix("torch.") for key, value in states[0].items() if torch.is_tensor(value)}


class _Stop(Exception):
    pass


def one_more_step(trainer: Any) -> list[float]:
    """Run the next epoch's first step only (stopped from `on_step`), or the whole epoch without `on_step`."""
    losses: list[float] = []
    if "on_step" not in inspect.signature(trainer.run_epoch).parameters:
        return list(trainer.run_epoch(trainer.epoch + 1).losses)

    def stop(step: int, loss: float, lr: float) -> None:
        losses.append(loss)
        raise _Stop

    with contextlib.suppress(_Stop):
        trainer.run_epoch(trainer.epoch + 1, on_step=stop)
    return losses


def run_case(case: Case, args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    """Ours (with the sample, boundary and save), a fresh trainer resumed, then the plain loop; one model at a time."""
    from lora_core.training.state import read_state, write_state
    from lora_core.training.trainer import Trainer

    arch = ARCHITECTURES[case.architecture]
    config = case_config(case, args)
    side = args.resolution or config.resolution
    layout = make_subject(work / case.name, config, side, config.train_batch_size, repeats=args.steps)
    out: dict[str, Any] = {
        "case": case.name,
        "model": arch.notes or arch.name,
        "resolution": side,
        "batch": config.train_batch_size,
        "rank": config.network_dim,
        "optimizer": config.optimizer.value,
        "train_text_encoder": config.train_text_encoder,
        "gradient_checkpointing": config.gradient_checkpointing,
        "precision_asked": case.precision,
    }

    # -- ours --
    base = build_base(arch, seed=0, device=device)
    weights = fingerprint(base.unet)
    inputs = bare_inputs(base, layout, device)
    _cast_frozen(base, case.precision)
    _free()
    _reset_peak(device)
    start = time.perf_counter()
    trainer = Trainer(config, base, layout, device=str(device), show_progress=False)
    setup_s = time.perf_counter() - start
    setup_peak = _peak_gb(device)
    precision = precision_name(trainer)
    _reset_peak(device)
    clock = StepClock(base.unet, warmup=args.warmup, device=device)
    stats = trainer.run_epoch(1)
    clock.stop()
    steps_peak = _peak_gb(device)
    out |= {
        "precision_used": precision,
        "notes": list(getattr(trainer, "notes", [])),
        "ours": {
            "steps_timed": clock.steps,
            "steps_per_s": clock.steps_per_s,
            "setup_s": setup_s,
            "peak_setup_gb": setup_peak,
            "peak_steps_gb": steps_peak,
            "losses_finite": all_finite(stats.losses),
            "mean_loss": stats.mean_loss,
            "skipped_steps": list(getattr(stats, "skipped_steps", [])),
        },
    }
    out["sample_finite"] = sample_decodes(base, inputs, precision, device)
    out["boundary"] = epoch_boundary(trainer, stats, repeats=1)
    state = work / case.name / "resume.safetensors"
    write_state(trainer, state)
    saved_slots = _optimizer_state(trainer)
    del trainer, base, clock
    _free()

    # -- a fresh trainer continues from the saved state --
    base = build_base(arch, seed=0, device=device)
    _cast_frozen(base, case.precision)
    resumed = Trainer(config, base, layout, device=str(device), show_progress=False)
    read_state(resumed, state)
    loaded_step = resumed.global_step
    loaded_slots = _optimizer_state(resumed)
    more = one_more_step(resumed)
    out["resume"] = {
        "loaded_global_step": loaded_step,
        "optimizer_slots": saved_slots,
        "slots_match": saved_slots == loaded_slots,
        "losses": more,
        "finite": all_finite(more) and loaded_step == args.steps and saved_slots == loaded_slots,
    }
    del resumed, base
    _free()

    # -- the plain loop, on a fresh copy of the same weights --
    base = build_base(arch, seed=0, device=device)
    same = fingerprint(base.unet) == weights
    base.vae.to("cpu")  # the plain loop never uses it
    if not config.train_text_encoder:
        for encoder in base.text_encoders:
            encoder.to("cpu")
    _free()
    _reset_peak(device)
    bare = BareLoop(base, inputs, config, precision=precision, device=device)
    clock = StepClock(base.unet, warmup=args.warmup, device=device)
    losses = bare.train(args.steps)
    clock.stop()
    out["bare"] = {
        "steps_timed": clock.steps,
        "steps_per_s": clock.steps_per_s,
        "peak_steps_gb": _peak_gb(device),
        "losses_finite": all_finite(losses),
        "mean_loss": sum(losses) / len(losses),
        "same_weights": same,
    }
    del bare, base, clock
    _free()

    ours, plain = out["ours"], out["bare"]
    out["ratio"] = ours["steps_per_s"] / plain["steps_per_s"]
    boundary_s = out["boundary"]["save_epoch_s"] + out["boundary"]["artifact_s"]
    seed_steps = SEED_REPEAT_BUDGET // config.train_batch_size
    out["boundary_share_seed_epoch"] = boundary_s / (seed_steps / ours["steps_per_s"])
    peaks = [p for p in (setup_peak, steps_peak) if p is not None]
    out["peak_gb"] = max(peaks) if peaks else None
    out["goal_vram_gb"] = GOAL_VRAM_GB[case.preset]
    return out


def _gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def report(result: dict[str, Any]) -> str:
    """A markdown table of every case, with the goals beside the figures."""
    lines = [
        f"# bench.gpu ({'smoke, ' if result['smoke'] else ''}{result['date']})",
        "",
        f"device: {result['device']}; torch {result['torch']}, Python {result['python']}; "
        f"{result['steps']} steps each way, the first {result['warmup']} untimed"
        + (f"; memory capped at {result['vram_cap_gb']} GB" if result.get("vram_cap_gb") else ""),
        "",
        "| case | px | batch | precision | ours steps/s | bare steps/s | ours/bare (goal >= 1) "
        "| peak VRAM GB ours: set-up / steps (goal) | bare peak GB | losses finite | sample decodes "
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
        vram = f"{_gb(ours['peak_setup_gb'])} / {_gb(ours['peak_steps_gb'])} (<= {goal:.0f}: " + (
            f"{_yes(vram_ok)})" if case["peak_gb"] is not None else "n/a)"
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
            f"same weights both ways {case['bare']['same_weights']}",
            f"optimizer slots {case['resume']['optimizer_slots']}",
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
    parser.add_argument("--cases", nargs="+", help=f"default: all of {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, help="steps each way (default 50; smoke 2)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (default 5; smoke 1)")
    parser.add_argument("--resolution", type=int, help="photo side in px (default: the preset's; smoke 64)")
    parser.add_argument("--device", help="default cuda (smoke: cpu); an explicit cpu runs full sizes, slowly")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change a config field")
    parser.add_argument("--vram-cap", type=float, metavar="GB", help="play a 10, 12, 16 or 24 GB card: cap GPU memory")
    args = parser.parse_args(argv)
    if args.vram_cap is not None and args.vram_cap <= 0:
        parser.error("--vram-cap must be a positive number of GB")
    cases = SMOKE_CASES if args.smoke else CASES
    args.steps = args.steps or (2 if args.smoke else 50)
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
        "cases": [],
        "vram_cap_gb": cap_vram(device, args.vram_cap),
    }
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        for key in args.cases or list(cases):
            try:
                result["cases"].append(run_case(cases[key], args, device, work))
            except Exception as error:  # one failed case (NaN, out of memory) must not lose the others' figures
                failure = {"case": key, "error": f"{type(error).__name__}: {error}"}
                result["cases"].append(failure | {"traceback": traceback.format_exc()})
                print(traceback.format_exc(), file=sys.stderr)
            _free()
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
