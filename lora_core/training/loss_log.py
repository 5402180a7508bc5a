"""kohya's `logging_dir`: the run's loss and learning rate as TensorBoard event files, where kohya users look.

sd-scripts writes `loss/current` and `lr/...` every step and `loss/epoch` every
epoch under `logging_dir`; we write the same names, plus `loss/validation` (the
held-out images' fixed loss, `validation_split`) per epoch. A run's epochs,
resumed or not, write into one folder, `<logging_dir>/<token>-<run key>`; a
relative `logging_dir` is inside the subject's folder. Events are written by
tensorboard's own writer (through torch), read back by its own reader in the tests.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from lora_core.foundation.layout import SubjectLayout

__all__ = ["LossLog", "loss_log_folder"]


def loss_log_folder(layout: SubjectLayout, logging_dir: str | None, run_key: str) -> Path | None:
    """Where this run's events go (None: `logging_dir` unset, nothing is written)."""
    if not logging_dir:
        return None
    root = Path(logging_dir).expanduser()
    return (root if root.is_absolute() else layout.root / root) / f"{layout.token}-{run_key[:12]}"


class LossLog:
    """One epoch's events; a context manager, so the file is flushed and closed however the epoch ends."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(folder))

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("loss/current", loss, step)
        self.writer.add_scalar("lr/unet", lr, step)

    def epoch(self, epoch: int, mean_loss: float, validation: float | None) -> None:
        self.writer.add_scalar("loss/epoch", mean_loss, epoch)
        if validation is not None:
            self.writer.add_scalar("loss/validation", validation, epoch)

    def __enter__(self) -> LossLog:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.writer.close()
