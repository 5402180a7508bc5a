"""Cache policies keyed on content, never on paths alone or in-memory objects."""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from prefect.cache_policies import CachePolicy

from lora_core.foundation.sources import fingerprint_input


@dataclass(kw_only=True)
class InputContent(CachePolicy):
    """Key on the bytes of the input folder or zip named by `parameter`.

    An unchanged folder gives the same key wherever it was copied from; any
    added, removed or edited file gives a new one. `exclude_parameter` names a
    folder (the work folder) that is not part of the input even when it lies
    inside it.
    """

    parameter: str = "photos"
    exclude_parameter: str | None = "workdir"

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: Any, **kwargs: Any) -> str:
        exclude = inputs.get(self.exclude_parameter) if self.exclude_parameter else None
        return fingerprint_input(Path(inputs[self.parameter]), Path(exclude) if exclude else None)


@dataclass(kw_only=True)
class CodeVersion(CachePolicy):
    """Key on the source of the `lora_core` modules a task calls, so a code change re-runs it."""

    modules: tuple[ModuleType, ...] = field(default_factory=tuple)

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: Any, **kwargs: Any) -> str:
        digest = hashlib.sha256()
        for module in self.modules:
            digest.update(inspect.getsource(module).encode())
        return digest.hexdigest()
