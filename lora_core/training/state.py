"""A run on disk: which run it is, its epochs, the state to continue from, its out-of-memory steps.

Everything here is written atomically, and in an order that makes a killed
process safe: an epoch counts as done only when all of its files are there.
State is safetensors with JSON metadata, never pickled.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as save_bytes

from lora_core.config.kohya import write_kohya_gui
from lora_core.config.lora_config import LoraConfig
from lora_core.families import family_named, family_of_lora, network_shape
from lora_core.families.loading import model_identity
from lora_core.foundation.errors import RunFailure
from lora_core.foundation.fs import atomic_write_bytes
from lora_core.foundation.layout import SubjectLayout
from lora_core.foundation.lora_file import LoraFileError, read_lora, save_lora
from lora_core.training.memory import apply_steps
from lora_core.training.metadata import kohya_metadata
from lora_core.training.precision import resolve_precision

if TYPE_CHECKING:
    from lora_core.training.trainer import EpochStats, Trainer

__all__ = [
    "NonFiniteWeightsError",
    "begin_run",
    "check_starting_lora",
    "epoch_done",
    "export_run_config",
    "finished_epoch",
    "open_run",
    "publish_final",
    "read_state",
    "read_steps",
    "record_steps",
    "run_info",
    "run_key",
    "save_epoch",
    "state_file",
    "write_state",
]


class NonFiniteWeightsError(RunFailure, RuntimeError):
    """The LoRA holds NaN or inf: nothing is written from it."""


_SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


def check_starting_lora(path: Path, model_family: str) -> None:
    """A LoRA to continue must be one (safetensors, LoRA keys) of the run's model family: a FLUX.1 LoRA on
    an SD1.5 run (or the reverse) would load nothing, or garbage."""
    lora = read_lora(path)
    ours, theirs = family_named(model_family), family_of_lora(lora.metadata)
    if theirs is not None and theirs is not ours:
        raise LoraFileError(
            f"{path}: network_weights is a {theirs.label} LoRA (ss_base_model_version "
            f"{lora.metadata.get('ss_base_model_version')!r}), but this run trains {ours.label} "
            f"(model_family {ours.name}); give a {ours.label} LoRA or a {theirs.label} base model"
        )
    try:
        network_shape(lora.modules, ours)
    except ValueError as err:
        raise LoraFileError(f"{path}: network_weights: {err}") from None


def open_run(
    layout: SubjectLayout,
    config: LoraConfig,
    device: str | None,
    *,
    first_epoch: int = 1,
    continues: str | None = None,
) -> tuple[LoraConfig, str]:
    """The run `config` trains, made `result_current/`'s own (`begin_run`): its config and key.

    A starting LoRA sets the rank and alpha (the recipe's resume trains at the
    LoRA's own), and the returned config reads it from the run's own copy. The
    key includes the precision that will really be used on `device`.
    """
    if config.network_weights:
        source = read_lora(Path(config.network_weights))
        shape = network_shape(source.modules, family_named(config.model_family))
        if shape != (config.network_dim, config.network_alpha):
            config = config.model_copy(update={"network_dim": shape[0], "network_alpha": shape[1]})
    identity = model_identity(config.pretrained_model_name_or_path or "")
    precision = resolve_precision(config.mixed_precision, device).name
    key = run_key(config, identity, layout, first_epoch=first_epoch, precision=precision)
    start = begin_run(layout, key, config.network_weights, continues=continues)
    return config.model_copy(update={"network_weights": start}), key


def begin_run(
    layout: SubjectLayout, run_key: str, network_weights: str | None, continues: str | None = None
) -> str | None:
    """Make `result_current/` this run's, and keep the LoRA it starts from inside the run.

    Results of a different earlier run are moved to `result_<date-time>/` first,
    never overwritten: the LoRA being continued often lives in `result_current/`
    itself. A resume round (`continues`: the key of the run it extends) adds its
    epochs beside that run's instead; `.run-key` lists the run and its rounds.
    The starting LoRA is copied into the run's state folder and that copy is
    what training reads, so a resumed run finds it wherever the original went.
    Returns the copy's path (None without a starting LoRA).
    """
    state = layout.train_state(run_key)
    state.mkdir(parents=True, exist_ok=True)
    start = state / "start.safetensors"
    if network_weights and not start.is_file():
        atomic_write_bytes(start, Path(network_weights).read_bytes())
        atomic_write_bytes(state / "start.json", json.dumps({"source": str(Path(network_weights).resolve())}).encode())
    marker = layout.result_current / ".run-key"
    keys = marker.read_text().split() if marker.is_file() else []
    if run_key in keys:
        return str(start) if network_weights else None
    if continues is not None and continues in keys:
        keys.append(run_key)
    else:
        if any(layout.result_current.glob("*.safetensors")):
            archive = layout.root / f"result_{time.strftime('%Y%m%d-%H%M%S')}"
            archive.mkdir(parents=True, exist_ok=False)
            for item in layout.result_current.iterdir():
                item.rename(archive / item.name)
        keys = [run_key]
    atomic_write_bytes(marker, "\n".join(keys).encode())
    return str(start) if network_weights else None


def run_info(layout: SubjectLayout, run_key: str, network_weights: str | None = None) -> dict[str, str]:
    """The run's identity for its metadata (session id, start time, where it started), made once."""
    path = layout.train_state(run_key) / "run.json"
    if path.is_file():
        return json.loads(path.read_text())
    origin = layout.train_state(run_key) / "start.json"
    if origin.is_file():
        network_weights = json.loads(origin.read_text())["source"]
    info = {
        "session_id": str(random.SystemRandom().randint(0, 2**32 - 1)),
        "started_at": str(time.time()),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
        "network_weights": network_weights or "",
    }
    atomic_write_bytes(path, json.dumps(info).encode())
    return info


def state_file(layout: SubjectLayout, run_key: str, epoch: int) -> Path:
    return layout.train_state(run_key) / f"epoch-{epoch:06d}.safetensors"


def saves_lora(config: LoraConfig, epoch: int, last_epoch: int) -> bool:
    """kohya's `save_every_n_epochs`: a LoRA file every n-th epoch and at the last one."""
    return epoch % config.save_every_n_epochs == 0 or epoch == last_epoch


def save_epoch(
    trainer: Trainer,
    run_key: str,
    info: dict[str, str],
    stats: EpochStats | None = None,
    *,
    write_lora: bool = True,
) -> Path | None:
    """Write the finished epoch's state to continue from, its numbers, and its LoRA (kohya's file and name).

    The state and the numbers go first and the LoRA last: an epoch counts as
    done only when its LoRA file is there too, so a crash in between redoes
    the epoch rather than losing it. A LoRA with NaN or inf in it is refused
    before anything is written, so the last good epoch stays the last one.
    Epochs `save_every_n_epochs` skips get their state and numbers only.
    """
    weights = trainer.network.weights()
    broken = [name for name, pair in weights.items() if not all(bool(torch.isfinite(t).all()) for t in pair)]
    if broken:
        raise NonFiniteWeightsError(
            f"epoch {trainer.epoch}: {len(broken)} LoRA module(s) hold NaN or inf (first: {broken[0]}); "
            "nothing written for this epoch"
        )
    epoch, layout = trainer.epoch, trainer.layout
    write_state(trainer, state_file(layout, run_key, epoch))
    if stats is not None:
        numbers = asdict(stats) | {"notes": trainer.notes, "lora": write_lora}
        atomic_write_bytes(_stats_file(layout, run_key, epoch), json.dumps(numbers).encode())
    if not write_lora:
        return None
    path = layout.epoch_lora(epoch)
    dtype = _SAVE_DTYPES[trainer.config.save_precision.value]
    alpha = trainer.config.network_alpha
    modules = trainer.base.family.to_file({name: (down, up, alpha) for name, (down, up) in weights.items()})
    save_lora(path, modules, alpha, kohya_metadata(trainer, epoch, info), dtype)
    return path


def _stats_file(layout: SubjectLayout, run_key: str, epoch: int) -> Path:
    return layout.train_state(run_key) / f"epoch-{epoch:06d}.json"


def finished_epoch(layout: SubjectLayout, run_key: str, epoch: int) -> dict[str, Any] | None:
    """The numbers of an epoch this run finished before (state, numbers and LoRA on disk), else None.

    A process killed after writing an epoch but before Prefect recorded it
    must not train that epoch again.
    """
    numbers = _stats_file(layout, run_key, epoch)
    if not (state_file(layout, run_key, epoch).is_file() and numbers.is_file()):
        return None
    try:
        done = json.loads(numbers.read_text())
    except ValueError:
        return None
    return done if not done.get("lora", True) or layout.epoch_lora(epoch).is_file() else None


def epoch_done(layout: SubjectLayout, run_key: str, epoch: int) -> bool:
    """All of the epoch's files are on disk, written by this run."""
    return finished_epoch(layout, run_key, epoch) is not None


def write_state(trainer: Trainer, path: Path) -> None:
    """Everything a new process needs to continue after this epoch, as one safetensors file.

    LoRA weights in fp32, optimizer moments, the fp16 loss scale, the step and
    the noise generator; the LR schedule is a pure function of the step and is
    rebuilt, not saved.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, (down, up) in trainer.network.weights().items():
        tensors[f"lora.{name}.down"], tensors[f"lora.{name}.up"] = down.float().cpu(), up.float().cpu()
    state = trainer.optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for index, slots in state["state"].items():
        for key, value in _flat_slots(slots):
            if torch.is_tensor(value):
                # A copy each: 8-bit optimizers share one quantisation map between parameters.
                tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    tensors["rng.noise"] = trainer.noise.get_state()
    meta = {
        "epoch": str(trainer.epoch),
        "global_step": str(trainer.global_step),
        "lr_steps": str(trainer.lr_steps),
        "optimizer_scalars": json.dumps(scalars),
        "param_groups": json.dumps([{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]),
        "grad_scaler": json.dumps(trainer.scaler.state_dict()),
    }
    atomic_write_bytes(Path(path), save_bytes(tensors, meta))


def _flat_slots(slots: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """An optimizer's per-parameter state as (name, value) pairs, nested dicts named `outer/inner`.

    bitsandbytes' 8-bit optimizers nest their quantisation state (`state1`,
    `qmap1`, `absmax1`, ...) under `__bnb_optimizer_quant_state__`; torch's
    keep every slot at the top.
    """
    pairs: list[tuple[str, Any]] = []
    for key, value in slots.items():
        if isinstance(value, dict):
            pairs += _flat_slots(value, f"{prefix}{key}/")
        else:
            pairs.append((f"{prefix}{key}", value))
    return pairs


def _put_slot(slots: dict[str, Any], name: str, value: Any) -> None:
    """Undo `_flat_slots` for one value: `outer/inner` goes back into the nested dict."""
    *outer, last = name.split("/")
    for key in outer:
        slots = slots.setdefault(key, {})
    slots[last] = value


def read_state(trainer: Trainer, path: Path) -> None:
    """Put `trainer` where the state at `path` (written by `write_state` for this run) left off."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    with torch.no_grad():
        for target in trainer.network.targets:
            down, up = trainer.network._pair(target)
            down.copy_(tensors[f"lora.{target.name}.down"])
            up.copy_(tensors[f"lora.{target.name}.up"])
    state = trainer.optimizer.state_dict()
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, slot = key.split(".", 2)
            _put_slot(slots.setdefault(int(index), {}), slot, value.to(trainer.device))
    for key, value in json.loads(meta["optimizer_scalars"]).items():
        index, slot = key.split(".", 1)
        _put_slot(slots.setdefault(int(index), {}), slot, value)
    for group, saved in zip(state["param_groups"], json.loads(meta["param_groups"]), strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    trainer.optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
    scaler = json.loads(meta.get("grad_scaler", "{}"))
    if scaler and trainer.scaler.is_enabled():
        trainer.scaler.load_state_dict(scaler)
    trainer.noise.set_state(tensors["rng.noise"])
    trainer.resume_at(int(meta["epoch"]), int(meta["global_step"]), int(meta.get("lr_steps", meta["global_step"])))


# Settings that never change the trained weights (samples render without touching training's state).
_NOT_IN_RUN_KEY = {
    "captioning",
    "ingest",
    "checks",
    "selection",
    "subject_type",
    "network_weights",
    "training_comment",
    "logging_dir",
    "sample_every_n_steps",
    "sample_every_n_epochs",
    "sample_prompts",
    "sample_sampler",
}


def run_key(
    config: LoraConfig, base_identity: str, layout: SubjectLayout, first_epoch: int = 1, precision: str | None = None
) -> str:
    """What makes a run this run: its settings, base model, training data and starting LoRA.

    Caption, ingest and check settings are left out: what they produced is in the data
    (captions.csv holds every image's hash, so a flipped photo changes the key);
    so is the starting LoRA's path: its bytes count, wherever it was moved.
    """
    digest = hashlib.sha256()
    digest.update(config.model_dump_json(exclude=_NOT_IN_RUN_KEY).encode())
    digest.update(base_identity.encode())
    for path in (layout.buckets_csv, layout.captions_csv):
        digest.update(path.read_bytes())
    if config.network_weights:
        digest.update(Path(config.network_weights).read_bytes())
    if precision is not None and precision != config.mixed_precision.value:  # e.g. fp32 on a CPU by default
        digest.update(f"precision={precision}".encode())
    if first_epoch != 1:  # a resume round: its epochs are numbered on from the run's
        digest.update(f"first_epoch={first_epoch}".encode())
    return digest.hexdigest()


def publish_final(layout: SubjectLayout, epoch: int) -> Path:
    """`result_current/<token>.safetensors`: the chosen epoch under the name users load."""
    atomic_write_bytes(layout.final_lora, layout.epoch_lora(epoch).read_bytes())
    return layout.final_lora


def export_run_config(layout: SubjectLayout, config: LoraConfig, run_key: str | None = None) -> Path | None:
    """`result_current/kohya_ss_config.json`: the run's settings as kohya_ss GUI JSON (the recipe loads it there).

    Before training (`run_key` None): the settings as given, but never over a
    trained run's own file (None then). After: what the run really used, its
    out-of-memory steps applied and the LoRA it started from under the user's
    path, not the run's private copy.
    """
    if run_key is None and any(layout.result_current.glob("*.safetensors")):
        return None
    if run_key is not None:
        config = apply_steps(config, read_steps(layout, run_key))
        config = config.model_copy(update={"network_weights": run_info(layout, run_key).get("network_weights") or None})
    path = layout.result_current / "kohya_ss_config.json"
    paths = {"train_data_dir": layout.training_images.resolve(), "output_dir": layout.result_current.resolve()}
    write_kohya_gui(path, config, output_name=layout.token, **paths)
    return path


def read_steps(layout: SubjectLayout, run_key: str) -> list[dict[str, Any]]:
    path = layout.train_state(run_key) / "oom-steps.json"
    return json.loads(path.read_text()) if path.is_file() else []


def record_steps(layout: SubjectLayout, run_key: str, steps: list[dict[str, Any]]) -> None:
    atomic_write_bytes(layout.train_state(run_key) / "oom-steps.json", json.dumps(steps).encode())
