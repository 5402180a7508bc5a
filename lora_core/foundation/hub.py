"""Where a model comes from: the Hugging Face hub, a local folder, or a builtin tiny model.

One rule for every model the pipeline loads (BLIP, the base model): look in
the local cache first, then try the hub once, quickly; when it cannot be
reached, fail at once with how to use a local copy, never after minutes of
retries.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from lora_core.foundation.origin import Origin, Setting
from lora_core.foundation.tiny_models import is_builtin, materialize

__all__ = ["hub_unreachable", "model_identity", "offline_help"]


def model_identity(spec: str) -> str:
    """A short string that changes when the model does, known without loading it (for cache keys).

    A builtin's folder name carries its version; a local file or folder is
    fingerprinted by its files' names, sizes and times; a hub id is itself.
    """
    if is_builtin(spec):
        return materialize(spec).name
    path = Path(spec).expanduser()
    if not path.exists():
        return spec
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(
            f"{file.relative_to(path) if file != path else file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode()
        )
    return f"{path.resolve()}@{digest.hexdigest()[:16]}"


def hub_unreachable(repo_id: str, timeout: float = 5.0) -> str | None:
    """None when the hub answers for `repo_id`; else why not, in one line. One try, no retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        request = urllib.request.Request(f"{endpoint}/api/models/{repo_id}", method="HEAD")
        urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        return None if err.code in (401, 403) else f"{endpoint} answered {err.code} for {repo_id}"
    except (OSError, ValueError) as err:
        return f"{endpoint} cannot be reached ({getattr(err, 'reason', err)})"
    return None


def offline_help(what: str, repo_id: str, why: str, setting: Setting, field: str, builtin: str, origin: Origin) -> str:
    """The message for a model that is neither cached nor downloadable (`why`: `hub_unreachable`'s answer);
    `setting` named as `origin` spells it, `field` the config file's name for it."""
    if why.endswith(f"answered 404 for {repo_id}"):  # the hub answers: no such model, most likely a typo
        return f"{what} {repo_id!r} ({origin.name(setting)}): the hub has no such model (404): check the id"
    return (
        f"{what} {repo_id!r} is not in the local Hugging Face cache and the hub is unreachable. On a machine "
        f"with network, run `hf download {repo_id} --local-dir DIR`, copy DIR here, and "
        f"{origin.give(setting, 'DIR')} (or set {field} in the config). For a run with no model at all, "
        f"{origin.give(setting, builtin)}. ({why})"
    )
