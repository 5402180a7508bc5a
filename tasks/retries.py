"""Which failures deserve a retry: transient ones, never a verdict on the user's input."""

from __future__ import annotations

from typing import Any

from lora_core.blip import CaptionModelError
from lora_core.config import ConfigError
from lora_core.faces import FaceModelError
from lora_core.fs import PathEscapeError
from lora_core.ingest import InputError, TooFewImagesError
from lora_core.layout import InvalidTokenError
from lora_core.memory import is_fatal_cuda_error
from lora_core.precision import DeviceError
from lora_core.run_state import NonFiniteWeightsError
from lora_core.training import NonFiniteLossError

# Errors that say the input or settings are wrong: running again cannot help.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CaptionModelError,
    ConfigError,
    DeviceError,
    FaceModelError,
    InputError,
    InvalidTokenError,
    PathEscapeError,
    TooFewImagesError,
)


# Errors that running the same step again, from the same saved state, would repeat exactly.
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (NonFiniteLossError, NonFiniteWeightsError)


# Errors that say the code is wrong: running it again gives the same error, later.
PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (
    AssertionError,
    AttributeError,
    ImportError,
    NameError,
    NotImplementedError,
    TypeError,
)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry I/O hiccups, not bad input, not bugs, not a poisoned CUDA context.

    After an illegal memory access or a device-side assert, every CUDA call in
    this process fails: only a new process (which resumes from the last saved
    epoch) can go on, so a retry here would only fail again.
    """
    try:
        state.result()
    except USER_ERRORS + PROGRAMMING_ERRORS + DETERMINISTIC_ERRORS:
        return False
    except Exception as error:
        return not is_fatal_cuda_error(error)
    return False
