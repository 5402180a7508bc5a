"""Which failures deserve a retry: transient ones, never a verdict on the user's input, never a bug."""

from __future__ import annotations

from typing import Any

from lora_core.foundation.errors import RunFailure, UserError
from lora_core.foundation.fs import disk_full
from lora_core.training.memory import is_fatal_cuda_error

# Errors that say the code is wrong: running it again gives the same error, later.
PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (
    AssertionError,
    AttributeError,
    ImportError,
    NameError,
    NotImplementedError,
    TypeError,
)


def should_retry(error: BaseException) -> bool:
    """Retry I/O hiccups and out-of-memory; not bad input (`UserError`), not a run that would fail the
    same way again (`RunFailure`), not a bug, not a poisoned CUDA context.

    After an illegal memory access or a device-side assert, every CUDA call in
    this process fails: only a new process (which resumes from the last saved
    epoch) can go on, so a retry here would only fail again.
    """
    if isinstance(error, (UserError, RunFailure, *PROGRAMMING_ERRORS)) or disk_full(error) is not None:
        return False  # a full disk too, wherever the write was (Prefect's result record): it stays full
    return isinstance(error, Exception) and not is_fatal_cuda_error(error)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: `should_retry` on the failed run's exception."""
    try:
        state.result()
    except BaseException as error:  # the policy decides, by class
        return should_retry(error)
    return False
