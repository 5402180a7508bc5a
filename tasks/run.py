"""The run folder's bookkeeping as Prefect tasks: its kohya_ss JSON, starting a run, publishing its LoRA.

Each writes files, so each is a task the dashboard shows, never a side effect
hidden in the flow's body.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger

from lora_core.config.lora_config import LoraConfig
from lora_core.foundation.layout import SubjectLayout
from lora_core.training.state import export_run_config, open_run, publish_final
from tasks.stage import step
from tasks.train import EpochResult, TrainRequest


@step("export-settings")
def export_settings(layout: SubjectLayout, config: LoraConfig) -> Path | None:
    """The settings as kohya_ss GUI JSON in `result_current/`, before training (never over a trained run's)."""
    return export_run_config(layout, config)


@step("start-run")
def start_run(
    layout: SubjectLayout,
    config: LoraConfig,
    device: str | None = None,
    base_model_config: str | None = None,
    first_epoch: int = 1,
    continues: str | None = None,
) -> TrainRequest:
    """Name the run and make `result_current/` its own: earlier results archived, never overwritten;
    a resume round (`continues`) adds its epochs beside the run it extends."""
    config, key = open_run(layout, config, device, first_epoch=first_epoch, continues=continues)
    get_run_logger().info(
        "train: run %s, epochs %d-%d", key[:12], first_epoch, first_epoch + config.max_train_epochs - 1
    )
    return TrainRequest(
        token=layout.token,
        workdir=layout.workdir,
        config=config,
        run_key=key,
        base_model_config=base_model_config,
        first_epoch=first_epoch,
        device=device,
    )


@step("publish-run")
def publish_run(request: TrainRequest, epochs: list[EpochResult]) -> Path:
    """The last epoch as `<token>.safetensors` (until selection chooses), and the kohya_ss JSON of what
    the run really used (out-of-memory steps included)."""
    final = publish_final(request.layout, epochs[-1].epoch)
    export_run_config(request.layout, request.config, request.run_key)
    return final
