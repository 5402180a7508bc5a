"""The code a GPU runs: fp16 loss scaling, bf16, accumulation, NaN stops, retry-safe epochs, placement.

torch runs fp16 and bf16 autocast and `GradScaler("cpu")` on the CPU, so an
explicit `device="cpu"` with a `mixed_precision` takes exactly the step a
user's NVIDIA card takes; nothing here is an fp32 shortcut. Where there is a
GPU these tests train on it instead (`TRAIN_DEVICE`; `pytest -m gpu` runs
them alone), with the real AdamW8bit, a real out-of-memory from a memory cap
and the CUDA-only offload branches.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from lora_core.config.lora_config import LoraConfig
from lora_core.families.loading import load_base_model
from lora_core.foundation.lora_file import read_lora
from lora_core.training.memory import apply_steps, oom_step
from lora_core.training.state import read_state, write_state
from lora_core.training.trainer import NonFiniteLossError, Trainer
from tests.conftest import TRAIN_DEVICE
from tests.unit.test_training import TINY_SD15, captioned_photos, flow_config, make_subject, small_config

pytestmark = pytest.mark.gpu

# Four small images in one bucket: half precision on a CPU is several times slower than fp32, keep steps few.
FOUR = ((128, 160),) * 4


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{k}.{i}": t.clone() for k, pair in trainer.network.weights().items() for i, t in enumerate(pair)}


def _record_gradients(trainer: Trainer) -> list[list[torch.Tensor]]:
    """The gradients each optimizer step applies (after unscaling and clipping)."""
    steps: list[list[torch.Tensor]] = []
    real = trainer.optimizer.step

    def step(*args, **kwargs):
        steps.append([p.grad.clone() for p in trainer.network.parameters()])
        return real(*args, **kwargs)

    trainer.optimizer.step = step
    return steps


def test_fp16_on_the_cpu_skips_an_overflowing_step_and_lowers_the_scale(builtin_models_home, tmp_path):
    config = small_config(num_repeats=1, train_batch_size=1, mixed_precision="fp16", lr_scheduler="linear")
    layout = make_subject(tmp_path, config, FOUR)
    trainer = Trainer(config, load_base_model(TINY_SD15), layout, device=TRAIN_DEVICE)
    assert trainer.precision.name == "fp16" and trainer.scaler.is_enabled()
    assert next(trainer.base.unet.parameters()).dtype == torch.float16  # frozen weights in fp16
    assert all(p.dtype == torch.float32 for p in trainer.network.parameters())  # the LoRA in fp32
    start = trainer.scaler.get_scale()
    calls = []
    probe = trainer.network.parameters("unet")[1]  # a lora_up weight: it gets a gradient from step 1

    def overflow(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return grad * math.inf if len(calls) == 3 else grad

    probe.register_hook(overflow)
    stats = trainer.run_epoch(1)
    assert stats.skipped_steps == [3]
    assert trainer.scaler.get_scale() == start / 2  # backed off once, not grown back
    # The schedule follows the steps applied: the skipped step leaves the learning rate where it was.
    assert trainer.lr_steps == len(stats.losses) - 1 == 3
    assert stats.lrs[2] == stats.lrs[1] and stats.lrs[0] > stats.lrs[1] > stats.lrs[3]
    assert all(torch.isfinite(t).all() for t in _weights(trainer).values())
    assert torch.count_nonzero(probe) > 0  # the other steps were taken


def test_accumulating_two_batches_of_one_equals_one_batch_of_two(builtin_models_home, tmp_path, monkeypatch):
    """Same items, same noise: accumulation 2 x batch 1 is batch 2, in half the optimizer steps."""
    import lora_core.training.trainer

    runs = {}
    for name, batch, accumulate in (("batch2", 2, 1), ("accumulated", 1, 2), ("plain", 1, 1)):
        order = [[0, 1], [2, 3]] if batch == 2 else [[0], [1], [2], [3]]
        monkeypatch.setattr(lora_core.training.trainer, "epoch_batches", lambda *args, order=order: order)
        config = small_config(
            num_repeats=1,
            train_batch_size=batch,
            gradient_accumulation_steps=accumulate,
            optimizer="AdamW",
            lr_scheduler="constant",
            mixed_precision="no",
            train_text_encoder=False,
        )
        trainer = Trainer(config, load_base_model(TINY_SD15), make_subject(tmp_path / name, config, FOUR))
        grads = _record_gradients(trainer)
        stats = trainer.run_epoch(1)
        runs[name] = (grads, stats, trainer)
    batch2, accumulated, plain = runs["batch2"], runs["accumulated"], runs["plain"]
    assert len(batch2[1].losses) == len(accumulated[1].losses) == 2 and len(plain[1].losses) == 4
    assert accumulated[2].batches_per_epoch == 4 and accumulated[2].steps_per_epoch == 2
    assert len(batch2[0]) == len(accumulated[0]) == 2  # optimizer steps
    for step, (ours, theirs) in enumerate(zip(accumulated[0], batch2[0], strict=True)):
        for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-7), (step, index, float((a - b).abs().max()))
    # The weights follow: equal up to Adam's sign-like first steps on gradients that are zero but for rounding.
    lr = 4e-4
    a, b = _weights(accumulated[2]), _weights(batch2[2])
    assert all(torch.allclose(a[k], b[k], atol=lr / 10) for k in a)
    assert not torch.allclose(plain[0][0][1], batch2[0][0][1], rtol=1e-3, atol=1e-7)  # one micro-batch per step


def test_one_process_trains_fp16_then_bf16_then_takes_the_precision_rung(builtin_models_home, tmp_path):
    """No per-process precision state: a worker trains subject after subject, and the ladder changes precision."""
    for index, precision in enumerate(("fp16", "bf16")):
        config = small_config(num_repeats=2, mixed_precision=precision)
        layout = make_subject(tmp_path / precision, config, FOUR[:1])
        trainer = Trainer(config, load_base_model(TINY_SD15), layout, device=TRAIN_DEVICE)
        assert trainer.precision.name == precision and trainer.scaler.is_enabled() == (index == 0)
        assert all(math.isfinite(loss) for loss in trainer.run_epoch(1).losses)
    fp32 = small_config(num_repeats=1, mixed_precision="no")
    rung = apply_steps(fp32, [dict(zip(("updates", "note"), oom_step(fp32, bf16_ok=True), strict=True))])
    assert rung.mixed_precision.value == "bf16"
    layout = make_subject(tmp_path / "rung", rung, FOUR[:1])
    trainer = Trainer(rung, load_base_model(TINY_SD15), layout, device=TRAIN_DEVICE)
    assert trainer.precision.name == "bf16" and trainer.run_epoch(1).losses


def test_frozen_text_encoders_get_no_gradient(builtin_models_home, tmp_path):
    # Shuffled tags are encoded at every step: the frozen encoders must not build a graph for them.
    config = small_config(num_repeats=2, train_text_encoder=False, shuffle_caption=True, keep_tokens=1)
    trainer = Trainer(config, load_base_model(TINY_SD15), make_subject(tmp_path, config), device=TRAIN_DEVICE)
    assert trainer.text is None  # encoded per step, not cached
    trainer.run_epoch(1)
    encoders = trainer.base.text_encoders
    assert all(not p.requires_grad and p.grad is None for encoder in encoders for p in encoder.parameters())
    assert any(p.grad is not None or torch.count_nonzero(p) for p in trainer.network.parameters("unet"))


def test_a_text_encoder_lora_trains_under_gradient_checkpointing(builtin_models_home, tmp_path):
    """The ladder's checkpointing rung must not stop the text encoder's LoRA from learning (transformers 4
    checkpoints re-entrantly and enables no input gradients for an injected adapter: no gradient reached it)."""
    config = small_config(num_repeats=2, gradient_checkpointing=True, train_text_encoder=True, text_encoder_lr=1e-3)
    trainer = Trainer(config, load_base_model(TINY_SD15), make_subject(tmp_path, config), device=TRAIN_DEVICE)
    encoder = trainer.base.text_encoders[0]
    name = "is_activation_checkpointing" if hasattr(type(encoder), "is_activation_checkpointing") else None
    assert trainer.base.unet.is_gradient_checkpointing and getattr(encoder, name or "is_gradient_checkpointing")
    trainer.run_epoch(1)
    ups = {t.name: up for t in trainer.network.targets for _, up in [trainer.network._pair(t)]}
    text = [name for name in ups if name.startswith("lora_te_")]
    assert text and all(torch.count_nonzero(ups[name]) for name in text), "a text-encoder LoRA did not train"
    assert any(torch.count_nonzero(up) for name, up in ups.items() if name.startswith("lora_unet_"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="without a device a CUDA machine trains on its GPU")
def test_without_an_explicit_device_the_cpu_trains_in_fp32_with_a_note(builtin_models_home, tmp_path):
    config = small_config(num_repeats=1, mixed_precision="fp16")
    trainer = Trainer(config, load_base_model(TINY_SD15), make_subject(tmp_path, config))
    assert trainer.precision.name == "no" and not trainer.scaler.is_enabled()
    assert any("fp32" in note for note in trainer.notes)


def _cli(tmp_path, photos, config: dict, *extra: str) -> tuple[int, str]:
    from flows.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    work = tmp_path / "work"
    argv = [str(photos), "--token", "t0k3n", "--workdir", str(work), "--base-model", TINY_SD15]
    return main([*argv, "--caption-model", "builtin:tiny-blip", "--config", str(path), *extra]), work


SMALL_RUN = {
    "resolution": 256,
    "min_bucket_reso": 128,
    "max_bucket_reso": 512,
    "network_dim": 4,
    "network_alpha": 2,
    "sample_every_n_epochs": 0,
    "sample_every_n_steps": 0,
}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_the_cli_trains_in_half_precision_with_accumulation_on_the_cpu(
    prefect_harness, builtin_models_home, tmp_path, capsys, precision
):
    photos = captioned_photos(tmp_path, seed=140)
    config = SMALL_RUN | {
        "mixed_precision": precision,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 2,
        "num_repeats": 1,
        "epoch": 2,
        "unet_lr": 1e-3,
    }
    code, work = _cli(tmp_path, photos, config, "--device", TRAIN_DEVICE, "--stop-after", "train")
    assert code == 0, capsys.readouterr().err
    final = work / "t0k3n" / "result_current" / "t0k3n.safetensors"
    with safe_open(final, framework="pt") as handle:
        meta = handle.metadata()
    micro = 5  # five photos, one repeat, batches of one: the last optimizer step has one micro-batch
    assert meta["ss_mixed_precision"] == precision
    assert meta["ss_gradient_accumulation_steps"] == "2" and meta["ss_total_batch_size"] == "2"
    assert meta["ss_num_batches_per_epoch"] == str(micro)
    assert meta["ss_steps"] == str(2 * math.ceil(micro / 2))  # optimizer steps over two epochs
    lora = read_lora(final).modules
    assert all(torch.isfinite(t.float()).all() for down, up, _ in lora.values() for t in (down, up))
    assert sum(int(torch.count_nonzero(up)) for _, up, _ in lora.values()) > 0  # it learned something


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_epoch(
    prefect_harness, builtin_models_home, tmp_path, capsys, monkeypatch
):
    photos = captioned_photos(tmp_path, seed=150)
    real = Trainer._loss
    calls = {"epoch2": 0}

    def loss(self, batch, rng):
        value = real(self, batch, rng)
        if self.epoch == 1:  # training epoch 2
            calls["epoch2"] += 1
            if calls["epoch2"] >= 3:
                return value * float("nan")
        return value

    monkeypatch.setattr(Trainer, "_loss", loss)
    config = SMALL_RUN | {"num_repeats": 1, "epoch": 2, "mixed_precision": "bf16"}
    code, work = _cli(tmp_path, photos, config, "--device", TRAIN_DEVICE, "--stop-after", "train")
    err = capsys.readouterr().err
    # Five photos, one repeat, batches of 2: epoch 1 took steps 1-3, so the third step of epoch 2 is step 6.
    assert code == 1 and "epoch 2, step 6 (step 3 of the epoch): the loss is nan" in err, err[-2000:]
    result = work / "t0k3n" / "result_current"
    assert not (result / "t0k3n-000002.safetensors").exists()
    epoch1 = read_lora(result / "t0k3n-000001.safetensors").modules
    assert all(torch.isfinite(t.float()).all() for down, up, _ in epoch1.values() for t in (down, up))
    assert calls["epoch2"] == 3  # not retried: the same state would give the same NaN


def test_an_epoch_that_failed_midway_and_was_retried_equals_an_unbroken_one(
    prefect_harness, builtin_models_home, tmp_path, monkeypatch
):
    """The retry must start from epoch 1's saved state, not from the half-trained network in memory."""
    from flows.train_subject import train_subject

    photos = captioned_photos(tmp_path, seed=160)
    config = flow_config(num_repeats=3, max_train_epochs=2)
    unbroken = train_subject(photos=photos, token="rt", workdir=tmp_path / "a", config=config, stop_after="train")
    real = Trainer._loss
    failed = []

    def loss(self, batch, rng):
        if self.epoch == 1 and not failed and self.global_step >= self.steps_per_epoch + 2:
            failed.append(self.global_step)
            raise OSError("the disk went away for a moment (injected)")
        return real(self, batch, rng)

    monkeypatch.setattr(Trainer, "_loss", loss)
    retried = train_subject(photos=photos, token="rt", workdir=tmp_path / "b", config=config, stop_after="train")
    assert failed, "the error was never injected"
    a = read_lora(tmp_path / "a" / "rt" / "result_current" / "rt.safetensors").modules
    b = read_lora(tmp_path / "b" / "rt" / "result_current" / "rt.safetensors").modules
    for name, (down, up, _) in a.items():
        assert torch.equal(b[name][0], down) and torch.equal(b[name][1], up), name
    assert [e["mean_loss"] for e in retried["train"]["epochs"]] == [e["mean_loss"] for e in unbroken["train"]["epochs"]]


def test_a_poisoned_cuda_context_is_not_retried_in_the_same_process():
    from tasks.retries import retry_transient

    class State:
        def __init__(self, error: BaseException) -> None:
            self.error = error

        def result(self):
            raise self.error

    assert retry_transient(None, None, State(OSError("connection reset")))
    assert retry_transient(None, None, State(RuntimeError("CUDA out of memory? no: a flaky read")))
    for message in (
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: device-side assert triggered",
    ):
        assert not retry_transient(None, None, State(RuntimeError(message))), message
    assert not retry_transient(None, None, State(NonFiniteLossError("epoch 2, step 3: the loss is nan")))


def test_a_device_that_is_not_here_is_refused_before_any_work(tmp_path, capsys):
    from flows.cli import main

    photos = tmp_path / "photos"  # enough files for the path check, which comes first
    photos.mkdir()
    for i in range(5):
        (photos / f"p{i}.jpg").write_bytes(b"a photo, as far as the path check knows")
    absent = ("cuda:99", "CUDA device(s) here") if torch.cuda.is_available() else ("cuda", "no CUDA device")
    for device, why in (absent, ("tpu", "want cpu, cuda or cuda:N")):
        assert main([str(photos), "--token", "t0k3n", "--workdir", str(tmp_path / "work"), "--device", device]) == 2
        assert why in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_config_sdxl_and_v2_must_describe_the_model(builtin_models_home, tmp_path):
    from lora_core.families.loading import BaseModelError

    base = load_base_model(TINY_SD15)
    config = small_config(num_repeats=1)
    layout = make_subject(tmp_path, config)
    bad = LoraConfig.model_validate(config.model_dump() | {"model_family": "sdxl"})
    with pytest.raises(BaseModelError, match=r"is SD1\.x/2\.x, but the config says model_family=sdxl"):
        Trainer(bad, base, layout)


def test_an_8bit_adamw_state_saves_and_resumes(builtin_models_home, tmp_path, monkeypatch):
    """The GPU's default optimizer, bitsandbytes' AdamW8bit, nests its quantisation state in its state
    dict; an epoch's saved state must hold it and a fresh trainer must get it back (run on the CPU here,
    which bitsandbytes' optimizers support, through the same `write_state`/`read_state` a GPU run uses)."""
    import bitsandbytes

    from lora_core.config.lora_config import Optimizer
    from lora_core.training.optim import OPTIMIZERS

    def adamw8bit(groups, args, device):
        return bitsandbytes.optim.AdamW8bit(groups, **args), None

    monkeypatch.setitem(OPTIMIZERS, Optimizer.AdamW8bit, adamw8bit)
    # min_8bit_size: the tiny LoRA's tensors are small; 8-bit state for all of them, as for SD's.
    # fp16 with its loss scale, as the sd15 preset trains on a GPU (the CPU runs the same step, explicitly).
    config = small_config(
        num_repeats=1,
        train_batch_size=2,
        mixed_precision="fp16",
        optimizer="AdamW8bit",
        optimizer_args={"min_8bit_size": 1},
    )
    layout = make_subject(tmp_path, config, FOUR)
    trainer = Trainer(config, load_base_model(TINY_SD15), layout, device=TRAIN_DEVICE)
    assert isinstance(trainer.optimizer, bitsandbytes.optim.AdamW8bit) and trainer.scaler.is_enabled()
    trainer.run_epoch(1)
    saved = trainer.optimizer.state_dict()["state"]
    nested = saved[0]["__bnb_optimizer_quant_state__"]
    assert nested["state1"].dtype == torch.uint8  # 8-bit moments: the state this test is about
    path = tmp_path / "state.safetensors"
    write_state(trainer, path)
    fresh = Trainer(config, load_base_model(TINY_SD15), layout, device=TRAIN_DEVICE)
    read_state(fresh, path)
    loaded = fresh.optimizer.state_dict()["state"]
    assert loaded.keys() == saved.keys()
    for index, slots in saved.items():
        for key, value in slots["__bnb_optimizer_quant_state__"].items():
            assert torch.equal(loaded[index]["__bnb_optimizer_quant_state__"][key].cpu(), value.cpu()), (index, key)
        assert loaded[index]["step"] == slots["step"]
    assert fresh.global_step == trainer.global_step
    assert fresh.scaler.get_scale() == trainer.scaler.get_scale()


@pytest.mark.parametrize(
    ("capability", "chosen"), [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]
)
def test_bf16_only_where_the_card_computes_it(monkeypatch, capability, chosen):
    """The sdxl preset asks for bf16; a Turing card (7.5, the recipe's RTX 2060 Super) gets fp16 with loss
    scaling and a note naming the card, Ampere (8.0) and later get bf16. The card asked about is the one the
    run was given (cuda:1 here), not the current device; torch's `is_bf16_supported` is not consulted (it
    says True on Turing)."""
    from lora_core.families import preset_config
    from lora_core.training.precision import resolve_precision

    asked: list[object] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 2060 SUPER")

    def capability_of(device=None):
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    precision = resolve_precision(preset_config("sdxl").mixed_precision, "cuda:1")
    assert precision.name == chosen and precision.device == torch.device("cuda:1")
    assert asked and all(torch.device(device) == torch.device("cuda:1") for device in asked)
    if chosen == "fp16":
        assert precision.grad_scaler().is_enabled()
        (note,) = precision.notes
        assert "RTX 2060 SUPER" in note and f"{capability[0]}.{capability[1]}" in note and "fp16" in note
    else:
        assert not precision.notes


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_set_up_holds_one_model_on_the_device_at_a_time(builtin_models_home, tmp_path, monkeypatch, train_text_encoder):
    """sd-scripts' order, which keeps SDXL's set-up under its steps' peak: the VAE alone on the training device
    while latents are cached, then the text encoders alone while their outputs are cached, then the UNet (a
    trained text encoder stays with it). The spy keeps a ledger of what the trainer put on the device."""
    config = small_config(num_repeats=1, train_text_encoder=train_text_encoder)
    base = load_base_model(TINY_SD15)
    names = {id(base.vae): "vae", id(base.unet): "unet", id(base.text_encoders[0]): "text_encoder"}
    on_device: set[str] = set()
    seen: list[tuple[str, frozenset[str]]] = []
    real_place = Trainer._place

    def place(self, module, on, dtype=None):
        (on_device.add if on else on_device.discard)(names[id(module)])
        return real_place(self, module, on, dtype)

    def spied(name, call):
        def run(*args, **kwargs):
            seen.append((name, frozenset(on_device)))
            return call(*args, **kwargs)

        return run

    monkeypatch.setattr(Trainer, "_place", place)
    monkeypatch.setattr(base.vae, "encode", spied("encode", base.vae.encode))
    encoder = base.text_encoders[0]
    monkeypatch.setattr(encoder, "forward", spied("text", encoder.forward))
    trainer = Trainer(config, base, make_subject(tmp_path, config), device=TRAIN_DEVICE)
    encodes = [held for what, held in seen if what == "encode"]
    assert encodes and all(held == {"vae"} for held in encodes), encodes
    if train_text_encoder:  # encoded at every step, with the UNet
        assert trainer.text is None and on_device == {"unet", "text_encoder"}
    else:
        texts = [held for what, held in seen if what == "text"]
        assert texts and all(held == {"text_encoder"} for held in texts), texts
        assert on_device == {"unet"}
    assert [what for what, _ in seen][: len(encodes)] == ["encode"] * len(encodes)  # latents first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real out-of-memory needs a CUDA card")
def test_a_real_out_of_memory_from_a_memory_cap_climbs_the_ladder(prefect_harness, builtin_models_home, tmp_path):
    """On a GPU: the process capped far below what an epoch needs runs out of memory for real; the train stage
    steps down the ladder and records each rung, or says every rung was taken, never a raw CUDA error."""
    from flows.train_subject import train_subject

    config = flow_config(num_repeats=2, max_train_epochs=1, mixed_precision="no", cache_latents=False)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(64 * 2**20 / torch.cuda.get_device_properties(0).total_memory)
    try:
        summary = train_subject(
            photos=captioned_photos(tmp_path, seed=80),
            token="cap",
            workdir=tmp_path / "w",
            config=config,
            stop_after="train",
            device="cuda",
        )
        exported = (tmp_path / "w" / "cap" / "result_current" / "kohya_ss_config.json").read_text()
        assert summary["train"]["epochs"] and '"training_comment": "out of memory; took: ' in exported
    except torch.OutOfMemoryError as error:
        assert "every rung of the ladder taken" in str(error)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
