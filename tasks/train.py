"""The training stage: one Prefect task per epoch, the models kept loaded between epochs."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE
from pydantic import BaseModel

from lora_core.config.lora_config import LoraConfig
from lora_core.families.loading import load_base_model
from lora_core.foundation.layout import SubjectLayout
from lora_core.foundation.lora_file import read_lora
from lora_core.training.loss_log import LossLog, loss_log_folder
from lora_core.training.memory import apply_steps, free_memory, oom_step
from lora_core.training.precision import bf16_supported, resolve_device
from lora_core.training.sampling import (
    SampleSpec,
    contact_sheet,
    render,
    sample_files,
    sample_step_interval,
    save_samples,
)
from lora_core.training.state import (
    epoch_done,
    finished_epoch,
    read_state,
    read_steps,
    record_steps,
    run_info,
    save_epoch,
    saves_lora,
    state_file,
)
from lora_core.training.trainer import EpochStats, Trainer
from tasks.artifacts import publish_epoch, publish_samples
from tasks.caching import CodeVersion
from tasks.stage import stage

# Each run's loaded models, by run key, so epoch N+1 in the same process starts at once. Per run: subjects
# running in one process never share or free each other's models.
_TRAINERS: dict[str, Trainer] = {}

TRAIN_CACHE = TASK_SOURCE + INPUTS + CodeVersion.of_task(__name__)


def release_trainers(run_key: str) -> None:
    """Free one run's loaded models once its epochs are done, or failed (a worker process lives on)."""
    _TRAINERS.pop(run_key, None)
    free_memory()


def release_subject(layout: SubjectLayout) -> None:
    """Free every trainer of one subject (its flow is done; other subjects in the process keep theirs)."""
    for key in [key for key, trainer in _TRAINERS.items() if trainer.layout == layout]:
        del _TRAINERS[key]
    free_memory()


def lend_trainer(layout: SubjectLayout, rank: int) -> Trainer | None:
    """A loaded trainer of this subject whose network has `rank`, handed over with its models: the samples and
    select stages render on them instead of loading a second copy. It trains no more (its optimizer's state,
    saved with the epoch, is dropped); a later round loads its own from disk."""
    for key, trainer in list(_TRAINERS.items()):
        if trainer.layout == layout and trainer.network.rank == rank:
            del _TRAINERS[key]
            trainer.optimizer.state.clear()
            return trainer
    return None


class TrainRequest(BaseModel):
    """Everything an epoch task needs; `run_key` names the run (settings, model, data)."""

    token: str
    workdir: Path
    config: LoraConfig
    run_key: str
    device: str | None = None
    base_model_config: str | None = None  # a single-file checkpoint's diffusers config folder or hub id
    first_epoch: int = 1  # a resume round numbers its epochs on from the run it continues

    @property
    def layout(self) -> SubjectLayout:
        return SubjectLayout(self.workdir, self.token)

    @property
    def last_epoch(self) -> int:
        return self.first_epoch - 1 + self.config.max_train_epochs

    def epochs(self) -> range:
        return range(self.first_epoch, self.last_epoch + 1)


class EpochResult(BaseModel):
    epoch: int
    lora: Path | None  # None: an epoch `save_every_n_epochs` writes no LoRA for
    global_step: int
    mean_loss: float
    losses: list[float]
    lrs: list[float]
    notes: list[str]
    samples: list[Path] = []

    @classmethod
    def kept(cls, layout: SubjectLayout, epoch: int, done: dict) -> EpochResult:
        """An epoch finished on disk before (`run_state.finished_epoch`'s numbers)."""
        return cls(
            epoch=epoch,
            lora=layout.epoch_lora(epoch) if done.get("lora", True) else None,
            global_step=done["global_step"],
            mean_loss=sum(done["losses"]) / max(1, len(done["losses"])),
            losses=done["losses"],
            lrs=done["lrs"],
            notes=done["notes"],
            samples=sample_files(layout.samples, layout.token, epoch=epoch),
        )


def _render_samples(
    trainer: Trainer, token: str, skipped: list[str], *, epoch: int | None = None, step: int | None = None
) -> list[Path]:
    """The config's sample prompts on the trainer's loaded models, saved in `result_current/sample/`.

    Out of memory is handled here, where it happens, never by the training ladder or a retry of the epoch
    (a render failing must not change what is trained): freed, tried again lighter (the VAE tiled), and
    then skipped, the round named in `skipped` (the epoch's notes, in the run's summary).
    """
    spec = SampleSpec.from_config(trainer.config, token)
    grid = None
    for light in (False, True):
        try:
            with trainer.models_on_device():
                grid = render(trainer.base, spec, trainer.precision, light=light)
            break
        except torch.OutOfMemoryError:
            pass
        free_memory()  # outside the except block: its traceback no longer holds the render's tensors
    if grid is None:
        where = f"epoch {epoch}" if epoch is not None else f"step {step}"
        skipped.append(f"samples at {where} skipped: out of GPU memory, the VAE tiled too")
        get_run_logger().warning("train: %s", skipped[-1])
        return []
    paths = save_samples(trainer.layout.samples, token, spec, grid, epoch=epoch, step=step)
    if epoch is not None:
        publish_samples(token, epoch, contact_sheet(grid, spec, title=f"{token} epoch {epoch}"))
    get_run_logger().info("train: %d sample(s) -> %s", len(paths), trainer.layout.samples)
    return paths


def _trainer(request: TrainRequest, config: LoraConfig, epoch: int) -> Trainer:
    """The run's trainer, ready for `epoch`: kept from the last epoch, or rebuilt and resumed from disk."""
    logger = get_run_logger()
    trainer = _TRAINERS.get(request.run_key)
    if trainer is not None and trainer.epoch == epoch - 1 and trainer.config == config:
        return trainer
    release_trainers(request.run_key)  # a stale copy of this run's models: never two in memory
    layout = request.layout
    base = load_base_model(
        config.pretrained_model_name_or_path,
        family=config.model_family,
        config_folder=request.base_model_config,
        parts=config.component_files,
    )
    trainer = Trainer(config, base, layout, device=request.device, show_progress=False)
    if epoch > request.first_epoch:
        read_state(trainer, state_file(layout, request.run_key, epoch - 1))
        logger.info("train: continuing after epoch %d (step %d)", epoch - 1, trainer.global_step)
    elif config.network_weights:
        report = trainer.network.load(read_lora(Path(config.network_weights)))
        logger.info(
            "train: starting from %s: %d modules loaded, %d new, %d ignored",
            config.network_weights,
            report.loaded,
            len(report.missing),
            len(report.unexpected),
        )
        trainer.resume_at(epoch - 1, 0)  # a resume round continues the run's numbering, its schedule anew
    for note in trainer.notes:
        logger.warning("train: %s", note)
    if trainer.heldout:
        held = ", ".join(Path(item.assignment.image).name for item in trainer.heldout)
        logger.info("train: validation_split: %s held out, never trained on (the held-out loss)", held)
    _TRAINERS[request.run_key] = trainer
    return trainer


def _on_step(
    trainer: Trainer, token: str, every: int, skipped: list[str], log: LossLog | None
) -> Callable[[int, float, float], None]:
    """Log every step (and to TensorBoard with `logging_dir`); render samples every `every` steps
    (`sample_step_interval`; 0: never)."""

    def on_step(step: int, loss: float, lr: float) -> None:
        get_run_logger().info("train: step %d loss %.5f lr %.3e", step, loss, lr)
        if log is not None:
            log.step(step, loss, lr)
        if every and step % every == 0:
            _render_samples(trainer, token, skipped, step=step)

    return on_step


def _epoch_intact(request: TrainRequest, epoch: int) -> bool:
    return epoch_done(request.layout, request.run_key, epoch)


@stage("train-epoch", TRAIN_CACHE, outputs_intact=_epoch_intact, gpu=True)
def train_epoch(request: TrainRequest, epoch: int) -> EpochResult:
    """Train one epoch; write `<token>-00000N.safetensors` and the state to continue from it.

    On CUDA out-of-memory the epoch is tried again one rung down the ladder
    (see `lora_core.training.memory`); the steps taken are kept for the rest of the run
    and recorded in its kohya_ss JSON and ss_training_comment. Any other
    failure drops the loaded trainer, so a retry starts from the last saved
    epoch, never from a half-trained network.
    """
    layout = request.layout
    if (done := finished_epoch(layout, request.run_key, epoch)) is not None:
        get_run_logger().info("train: epoch %d was finished before the last run stopped; kept", epoch)
        return EpochResult.kept(layout, epoch, done)
    skipped: list[str] = []  # sample rounds out of memory skipped
    folder = loss_log_folder(layout, request.config.logging_dir, request.run_key)
    with LossLog(folder) if folder else nullcontext() as log:
        return _train_and_save(request, layout, epoch, skipped, log)


def _train_and_save(
    request: TrainRequest, layout: SubjectLayout, epoch: int, skipped: list[str], log: LossLog | None
) -> EpochResult:
    try:
        trainer, stats = _train_with_ladder(request, layout, epoch, skipped, log)
        info = run_info(trainer.layout, request.run_key, request.config.network_weights)
        write_lora = saves_lora(trainer.config, epoch, request.last_epoch)
        every = request.config.sample_every_n_epochs
        # Samples before the epoch is saved: once saved it counts as finished and is never trained (or
        # sampled) again, so a run killed in between would keep an epoch without its samples.
        samples = _render_samples(trainer, request.token, skipped, epoch=epoch) if every and epoch % every == 0 else []
        path = save_epoch(trainer, request.run_key, info, stats, write_lora=write_lora)
    except BaseException:
        release_trainers(request.run_key)  # a retry reloads the last saved epoch
        raise
    _log_epoch(request, stats, path)
    if log is not None:
        log.epoch(epoch, stats.mean_loss, trainer.heldout_loss())
    result = EpochResult(
        epoch=epoch,
        lora=path,
        global_step=stats.global_step,
        mean_loss=stats.mean_loss,
        losses=stats.losses,
        lrs=stats.lrs,
        notes=[*trainer.notes, *skipped],
        samples=samples,
    )
    publish_epoch(request.token, result.epoch, result.losses, result.lrs, path, result.global_step)
    return result


def _log_epoch(request: TrainRequest, stats: EpochStats, path: Path | None) -> None:
    logger = get_run_logger()
    saved = path.name if path else "no LoRA file (save_every_n_epochs)"
    logger.info(
        "train: epoch %d/%d: %d steps, mean training loss %.4f -> %s",
        stats.epoch,
        request.last_epoch,
        len(stats.losses),
        stats.mean_loss,
        saved,
    )
    if stats.skipped_steps:
        logger.warning("train: fp16 overflow: step(s) %s skipped, the loss scale lowered", stats.skipped_steps)


def _train_with_ladder(
    request: TrainRequest, layout: SubjectLayout, epoch: int, skipped: list[str], log: LossLog | None
) -> tuple[Trainer, EpochStats]:
    """Train `epoch`, stepping down the out-of-memory ladder until it fits (or the ladder is spent)."""
    steps = read_steps(layout, request.run_key)
    while True:
        config = apply_steps(request.config, steps)
        out_of_memory = False
        try:
            trainer = _trainer(request, config, epoch)
            skipped.clear()  # this attempt's rounds only
            every = sample_step_interval(config)
            # The callback is not kept in a local: after an out-of-memory it would keep the failed trainer alive.
            stats = trainer.run_epoch(epoch, on_step=_on_step(trainer, request.token, every, skipped, log))
            return trainer, stats
        except torch.OutOfMemoryError:
            out_of_memory = True
        # Outside the except block: its traceback no longer holds the failed attempt's tensors.
        if out_of_memory:
            trainer = None  # the last reference to the failed attempt's models
            release_trainers(request.run_key)
            device = resolve_device(request.device)
            step = oom_step(config, device.type == "cuda" and bf16_supported(device))
            if step is None:
                raise torch.OutOfMemoryError(
                    f"epoch {epoch}: out of GPU memory with every rung of the ladder taken "
                    f"({config.training_comment or 'none'}); try a smaller resolution or network_dim"
                )
            steps.append({"updates": step[0], "note": step[1]})
            record_steps(layout, request.run_key, steps)
            get_run_logger().warning("train: epoch %d ran out of GPU memory; trying again: %s", epoch, step[1])
