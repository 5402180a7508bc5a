"""Which failures deserve a retry: transient ones, never a verdict on the user's input."""

from __future__ import annotations

from typing import Any

from lora_core.captioning import CaptionModelError
from lora_core.config import ConfigError
from lora_core.faces import FaceModelError
from lora_core.fs import PathEscapeError
from lora_core.ingest import InputError, TooFewImagesError
from lora_core.layout import InvalidTokenError

# Errors that say the input or settings are wrong: running again cannot help.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CaptionModelError,
    ConfigError,
    FaceModelError,
    InputError,
    InvalidTokenError,
    PathEscapeError,
    TooFewImagesError,
)


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
    """Prefect `retry_condition_fn`: retry I/O hiccups, not bad input and not bugs."""
    try:
        state.result()
    except USER_ERRORS + PROGRAMMING_ERRORS:
        return False
    except Exception:
        return True
    return False
