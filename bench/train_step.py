"""Time the LoRA training step on the CPU: our `Trainer` against the plain loop, same weights, same latents.

`--family sd15` (the default): SD1.5's UNet at full width (860M parameters,
random weights; a tiny VAE and text encoder, whose outputs are cached) at a
small resolution, so a step takes seconds on two cores; `sdxl`: SDXL's UNet
at full width, shallower; `flux`: FLUX.1-dev's transformer 512 wide with 2
double and 4 single blocks (`bench.models`). The plain loop
(`bench.bare_loop.BareLoop`, FLUX: `bench.bare_flux.BareFluxLoop`) is the
same step written the way diffusers' examples write it, on a copy of the same
denoiser. `--steps` steps each run in short alternating rounds, so a change in
the machine's load hits both; the very first step of each is warm-up. Also
timed: the work between two epoch tasks (`save_epoch` and the epoch artifact),
against one epoch's training.

    python -m bench.train_step                      # SD1.5, fp32, 128 px (16x16 latents), batch 2, rank 16
    python -m bench.train_step --precision bf16     # needs the trainer that honours bf16 on the CPU
    python -m bench.train_step --family flux        # FLUX.1, fp32, 256 px (32x32 latents), 512 T5 tokens
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.bare_flux import plain_inputs, plain_loop
from bench.measure import StepClock, all_finite, epoch_boundary, precision_name
from bench.models import ARCHITECTURES, build_base
from bench.subject import make_subject
from lora_core.config.lora_config import LoraConfig
from lora_core.families import FAMILIES, preset_config, preset_for
from lora_core.foundation.layout import SEED_REPEAT_BUDGET

GOAL_RATIO = 0.95  # ours / bare, steps per second
GOAL_BOUNDARY = 0.02  # the epoch boundary, as a share of one epoch's training


def default_threads() -> int:
    """`OMP_NUM_THREADS` when set, else every core this process may run on."""
    return int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def bench_config(args: argparse.Namespace) -> LoraConfig:
    """The family's first preset, changed only where a CPU bench must be: size, rank (alpha in the preset's
    ratio), precision, no samples, no 8-bit, the frozen weights in the training dtype (fp8 and NF4 storage
    are a GPU's memory recipe: on the CPU both ways would only add casts); `--set` changes anything else."""
    preset = preset_config(preset_for(args.family))
    updates = {
        "resolution": 256,  # the config's floor; smaller photos get buckets of their own size (no upscaling)
        "min_bucket_reso": 64,
        "network_dim": args.rank,
        "network_alpha": args.rank * preset.network_alpha / preset.network_dim,
        "train_text_encoder": False,  # text-encoder outputs cached, as the brief's CPU step is UNet-only
        "shuffle_caption": False,
        "optimizer": "AdamW",  # bitsandbytes' 8-bit AdamW needs CUDA
        "mixed_precision": args.precision,
        "max_train_epochs": args.rounds,  # one epoch a round
        "sample_every_n_steps": 0,
        "sample_every_n_epochs": 0,
        "fp8_base": False,
        "nf4_base": False,
    }
    updates |= {key: _value(value) for key, value in (item.split("=", 1) for item in args.set)}
    return LoraConfig.model_validate(preset.model_dump() | updates)


def _side(clock: StepClock, losses: list[float]) -> dict[str, Any]:
    return {
        "steps": clock.steps,
        "seconds": clock.seconds,
        "forward_s": clock.forward,
        "losses": losses,
    }


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    steps = sum(r["steps"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    forward = sum(r["forward_s"] for r in rounds)
    losses = [x for r in rounds for x in r["losses"]]
    return {
        "steps": steps,
        "s_per_step": seconds / steps,
        "steps_per_s": steps / seconds,
        "forward_s_per_step": forward / steps,
        "rest_s_per_step": (seconds - forward) / steps,
        "losses_finite": all_finite(losses),
        "mean_loss": sum(losses) / len(losses),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, train both ways in alternating rounds, time the epoch boundary; return the figures."""
    from lora_core.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    arch = ARCHITECTURES[f"{args.family}-{args.model}"]
    config = bench_config(args)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    try:
        per_round = args.steps // args.rounds
        layout = make_subject(work, config, args.resolution, config.train_batch_size, repeats=per_round)
        start = time.perf_counter()
        base = build_base(arch, seed=0)
        unet_params = sum(p.numel() for p in base.unet.parameters())
        bare_unet = copy.deepcopy(base.unet)  # the same weights, before our trainer adds its LoRA
        build_s = time.perf_counter() - start
        inputs = plain_inputs(base, layout, "cpu", config)  # fp32, before the trainer casts the models
        start = time.perf_counter()
        trainer = Trainer(config, base, layout, device="cpu", show_progress=False)
        setup_s = time.perf_counter() - start
        precision = precision_name(trainer)
        bare = plain_loop(dataclasses.replace(base, unet=bare_unet), inputs, config, precision=precision, device="cpu")
        if trainer.steps_per_epoch != per_round:
            raise RuntimeError(f"the subject gives {trainer.steps_per_epoch} steps an epoch, not {per_round}")

        ours_rounds: list[dict[str, Any]] = []
        bare_rounds: list[dict[str, Any]] = []
        stats = None
        for index in range(args.rounds):
            warmup = 1 if index == 0 else 0  # later rounds are timed from their first UNet call

            def ours(epoch: int = index + 1, warmup: int = warmup) -> None:
                nonlocal stats
                clock = StepClock(base.unet, warmup=warmup)
                stats = trainer.run_epoch(epoch)
                ours_rounds.append(_side(clock.stop(), stats.losses))

            def plain(warmup: int = warmup) -> None:
                clock = StepClock(bare_unet, warmup=warmup)
                losses = bare.train(per_round)
                bare_rounds.append(_side(clock.stop(), losses))

            for side in (ours, plain) if index % 2 == 0 else (plain, ours):
                side()
        boundary = epoch_boundary(trainer, stats)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ours_total, bare_total = _summary(ours_rounds), _summary(bare_rounds)
    # The median of the rounds' ratios: one round stalled by another process must not decide the result.
    per_round_ratios = [
        (o["steps"] / o["seconds"]) / (b["steps"] / b["seconds"]) for o, b in zip(ours_rounds, bare_rounds, strict=True)
    ]
    boundary_s = boundary["save_epoch_s"] + boundary["artifact_s"]
    seed_steps = SEED_REPEAT_BUDGET // config.train_batch_size
    latent = args.resolution // 8
    return {
        "bench": "train_step",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch threads",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "model": f"{arch.notes} ({unet_params / 1e6:.0f}M {type(base.unet).__name__} parameters)",
        "preset": preset_for(args.family),
        "text_tokens": int(inputs.hidden.shape[1]),
        "resolution": f"{args.resolution} px ({latent}x{latent} latents)",
        "batch": config.train_batch_size,
        "rank": config.network_dim,
        "precision_asked": args.precision,
        "precision_used": precision,
        "trainer_notes": list(getattr(trainer, "notes", [])),
        "build_s": build_s,
        "trainer_setup_s": setup_s,
        "steps_per_round": per_round,
        "rounds": args.rounds,
        "ours": ours_total,
        "bare": bare_total,
        "ratio": statistics.median(per_round_ratios),
        "ratio_of_totals": ours_total["steps_per_s"] / bare_total["steps_per_s"],
        "ratio_per_round": per_round_ratios,
        "boundary": boundary,
        "boundary_s": boundary_s,
        "boundary_share_bench_epoch": boundary_s / (per_round * ours_total["s_per_step"]),
        "seed_epoch_steps": seed_steps,
        "boundary_share_seed_epoch": boundary_s / (seed_steps * ours_total["s_per_step"]),
    }


def report(result: dict[str, Any]) -> str:
    """The figures as a small markdown table and a few lines (what RESULTS.md keeps)."""
    ours, bare = result["ours"], result["bare"]

    def yes(ok: bool) -> str:
        return "yes" if ok else "NO"

    busy = result["load_average"][0] > 0.5 * (os.cpu_count() or 1)
    lines = [
        *(["WARNING: the machine was busy before the run (load average above half its cores): timings vary"] * busy),
        f"machine: {result['machine']}; load average {result['load_average'][0]} before, "
        f"{result['load_average'][1]} after; Python {result['python']}, torch {result['torch']}",
        f"model: {result['model']}; preset {result['preset']}; {result['resolution']}, {result['text_tokens']} "
        f"text tokens, batch {result['batch']}, rank {result['rank']}",
        f"precision: {result['precision_used']} (asked: {result['precision_asked']})"
        + "".join(f"; note: {note}" for note in result["trainer_notes"]),
        f"build {result['build_s']:.1f} s; Trainer set-up (LoRA, latent and text caches) "
        f"{result['trainer_setup_s']:.1f} s",
        f"{result['rounds']} alternating round(s) of {result['steps_per_round']} steps each way; "
        "the first step of each way untimed",
        "",
        "| | ours (`Trainer`) | bare loop |",
        "|---|---|---|",
        f"| steps timed | {ours['steps']} | {bare['steps']} |",
        f"| s/step | {ours['s_per_step']:.3f} | {bare['s_per_step']:.3f} |",
        f"| steps/s | {ours['steps_per_s']:.3f} | {bare['steps_per_s']:.3f} |",
        f"| denoiser forward, s/step | {ours['forward_s_per_step']:.3f} | {bare['forward_s_per_step']:.3f} |",
        f"| rest of the step (backward, optimizer, loop), s/step | {ours['rest_s_per_step']:.3f} "
        f"| {bare['rest_s_per_step']:.3f} |",
        f"| mean loss (all finite) | {ours['mean_loss']:.4f} ({yes(ours['losses_finite'])}) "
        f"| {bare['mean_loss']:.4f} ({yes(bare['losses_finite'])}) |",
        "",
        f"ratio ours/bare (steps/s), median of the rounds: {result['ratio']:.3f} "
        f"(goal >= {GOAL_RATIO}: {yes(result['ratio'] >= GOAL_RATIO)}); per round: "
        + ", ".join(f"{r:.3f}" for r in result["ratio_per_round"])
        + f"; of the totals: {result['ratio_of_totals']:.3f}",
        f"epoch boundary: save_epoch {result['boundary']['save_epoch_s']:.3f} s + epoch artifact markdown "
        f"{result['boundary']['artifact_s']:.3f} s (Prefect's create call not timed) = {result['boundary_s']:.3f} s: "
        f"{100 * result['boundary_share_seed_epoch']:.2f}% of a seed-size epoch ({result['seed_epoch_steps']} steps at "
        f"ours' speed; goal < {100 * GOAL_BOUNDARY:.0f}%: {yes(result['boundary_share_seed_epoch'] < GOAL_BOUNDARY)}), "
        f"{100 * result['boundary_share_bench_epoch']:.1f}% of this bench's {result['steps_per_round']}-step epoch",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=tuple(FAMILIES), default="sd15", help="the model family (default sd15)")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--steps", type=int, default=12, help="steps each way (the first untimed); default 12")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds the steps are split into")
    parser.add_argument(
        "--resolution",
        type=int,
        help="photo side in px, a multiple of 64; default a quarter of the preset's: sd15 128, sdxl and flux 256",
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="torch threads (default: OMP_NUM_THREADS, else every core; on a busy machine fewer can be faster)",
    )
    parser.add_argument(
        "--model", choices=("mid", "tiny"), default="mid", help="tiny: the family's tree, narrow (tests)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change a config field")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps % args.rounds or args.steps // args.rounds < 2:
        parser.error("want --steps a multiple of --rounds, at least 2 steps a round")
    # A quarter of the preset's side, so each family trains at the same share of its own size: SD1.5 128 px
    # (16x16 latents), SDXL and FLUX.1 256 px (32x32).
    args.resolution = args.resolution or preset_config(preset_for(args.family)).resolution // 4
    if args.resolution % 64 or args.resolution < 64:
        parser.error("want --resolution a multiple of 64")
    result = run(args)
    print(report(result))
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-train-step.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
