"""What the command line does at the terminal: cheap checks up front, Ctrl-C, and errors in one line.

A user who types a wrong path should hear so at once, not after Prefect's
temporary server started; a user who presses Ctrl-C should get the prompt back
within seconds, even though the terminal's SIGINT also stopped that server
(Prefect's API calls would otherwise retry against it for many minutes); a
user whose photos are too few should read the reason, not a traceback. The
traceback of a user error still goes to the Prefect log (the UI), just not
to the terminal.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from lora_core.foundation.errors import RunFailure, UserError
from lora_core.foundation.layout import SubjectLayout
from lora_core.foundation.lock import subject_lock
from lora_core.foundation.sources import CAPTION_SUFFIXES, InputError, open_input

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_SERVER",
    "ServerStartError",
    "Stopped",
    "check_not_busy",
    "check_photos",
    "guard",
    "prefect_defaults",
    "quiet_libraries",
    "quiet_library_bars",
    "quiet_user_errors",
    "stage_message",
]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_SERVER = 1
# Prefect's default (20 s) is too short for a busy 2-core machine starting its server beside training.
SERVER_STARTUP_TIMEOUT_S = 180
# After Ctrl-C the run may take this long to mark itself stopped on a live server; then we leave anyway.
STOP_GRACE_S = 5.0
_TIMEOUT_VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


class Stopped(Exception):
    """The user pressed Ctrl-C; the message says where and how to continue."""


class ServerStartError(Exception):
    """Prefect's temporary server did not come up."""


def prefect_defaults() -> None:
    """Settings for Prefect's temporary server that the user did not choose: no phoning home (there is
    no network here or on most GPU boxes), and a start-up time that a busy machine can meet."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(_TIMEOUT_VAR, str(SERVER_STARTUP_TIMEOUT_S))


# Libraries whose warnings and progress bars are theirs, not the user's news: off the terminal unless --verbose.
_LIBRARIES = ("transformers", "diffusers", "bitsandbytes", "huggingface_hub", "accelerate", "peft", "torch")
_DOCS_LINK = "\nSee https://www.prefect.io/docs"


class _NoDocsLink(logging.Filter):
    """Prefect's temporary-server line without the docs link it appends on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and _DOCS_LINK in record.msg:
            record.msg = record.msg.split(_DOCS_LINK, 1)[0]
        return True


_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's and transformers' bars
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


@contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Only our lines and Prefect's run lines on the terminal while the command runs: other libraries'
    warnings (transformers' torchvision notice, bitsandbytes' kernel notice, torch's dtype notes), their
    progress bars and Prefect's docs link stay off it; all as it was after. `verbose`: nothing changes."""
    if verbose:
        yield
        return
    import warnings

    env = {name: os.environ.get(name) for name in _QUIET_ENV}
    levels = {name: logging.getLogger(name).level for name in _LIBRARIES}
    docs = _NoDocsLink()
    with warnings.catch_warnings():
        os.environ.update({name: value for name, value in _QUIET_ENV.items() if env[name] is None})
        for name in _LIBRARIES:
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=rf"({'|'.join(_LIBRARIES)})(\..*)?$")
        logging.getLogger("prefect").addFilter(docs)
        try:
            yield
        finally:
            logging.getLogger("prefect").removeFilter(docs)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            for name, value in env.items():
                if value is None:
                    os.environ.pop(name, None)
            if _BARS_OFF in sys.meta_path:
                sys.meta_path.remove(_BARS_OFF)
            _library_bars(True)


def _library_bars(on: bool) -> None:
    """diffusers' and transformers' own progress bars ("Loading pipeline components", "Loading weights"),
    switched where those libraries are loaded (diffusers heeds no setting; transformers reads one at import)."""
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.enable_progress_bar() if on else diffusers_logging.disable_progress_bar()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.enable_progress_bar() if on else transformers_logging.disable_progress_bar()


class _BarsOffOnImport(importlib.abc.MetaPathFinder):
    """Switches diffusers' and transformers' bars off as their logging modules are imported. The run imports
    them only when a model loads, and a cached re-run never does: importing them up front just to switch
    their bars off cost 1.8 s of a 15 s re-run (`bench.rerun`)."""

    NAMES = ("diffusers.utils.logging", "transformers.utils.logging")

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in self.NAMES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            module.disable_progress_bar()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this module's own loader
        return spec


_BARS_OFF = _BarsOffOnImport()


def quiet_library_bars(verbose: bool = False) -> None:
    """The libraries' bars off for the run (inside `quiet_libraries`, which puts them back): now where they
    are loaded, else as they load."""
    if not verbose:
        _library_bars(False)
        if _BARS_OFF not in sys.meta_path:
            sys.meta_path.insert(0, _BARS_OFF)


# --- Checks before anything starts ---------------------------------------------------------


def check_photos(photos: Path, min_images: int, exclude: Path | None = None) -> None:
    """The photos path exists, is a folder or a zip, and holds at least `min_images` files that may be
    photos (ingest then decides which are); raises `InputError` saying which of these fails."""
    with open_input(Path(photos), exclude=Path(exclude) if exclude else None) as entries:
        candidates = [
            e for e in entries if e.read is not None and PurePosixPath(e.rel).suffix.lower() not in CAPTION_SUFFIXES
        ]
    if not candidates:
        raise InputError(f"{photos}: no photos in it (only hidden, caption or unreadable files, or nothing)")
    if len(candidates) < min_images:
        raise InputError(
            f"{photos}: {len(candidates)} file(s) that may be photos, and at least {min_images} usable photos "
            "are needed (ingest.min_images; the recipe: 5 to 10 can work)"
        )


def check_not_busy(layout: SubjectLayout) -> None:
    """Refuse at once when another process holds the subject folder (the flow takes the lock for real)."""
    if layout.lock.is_file():
        with subject_lock(layout.lock, layout.root):
            pass


# --- While the run goes ------------------------------------------------------------------


def stage_message(error: BaseException) -> str:
    """A user error's one line, naming the stage it came from (`tasks.stage` marks it)."""
    stage = getattr(error, "stage", None)
    return f"{stage}: {error}" if stage else str(error)


@contextmanager
def guard() -> Iterator[None]:
    """Run the flow with Ctrl-C handled: the first stops the run (`Stopped`, or a forced exit after
    `STOP_GRACE_S`), a second exits at once; a server that would not start says so in one line."""
    state = _Interrupts()
    previous = signal.signal(signal.SIGINT, state.on_sigint)
    try:
        yield
    except BaseException as err:
        if state.stopped_during is not None:  # whatever the interrupted run raised on its way out
            raise Stopped(state.message()) from None
        if isinstance(err, RuntimeError) and "ephemeral Prefect API server" in str(err):
            raise ServerStartError(_server_message()) from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


class _Interrupts:
    def __init__(self) -> None:
        self.stopped_during: str | None = None
        self.deadline: threading.Thread | None = None

    def message(self) -> str:
        return f"stopped {self.stopped_during}; run the same command to continue (finished work is kept)"

    def on_sigint(self, signum: int, frame: object) -> None:
        if self.stopped_during is not None:  # the second Ctrl-C: no more waiting
            _leave(self.message())
            return
        self.stopped_during = _running_stage()
        logging.getLogger("prefect").setLevel(logging.CRITICAL + 1)  # its crash reports are not the user's news
        self.deadline = threading.Thread(target=self._deadline, daemon=True)
        self.deadline.start()
        raise KeyboardInterrupt

    def _deadline(self) -> None:
        time.sleep(STOP_GRACE_S)
        _leave(self.message())


def _running_stage() -> str:
    stage = sys.modules.get("tasks.stage")
    return (stage.running() if stage is not None else None) or "during start-up"


def _leave(message: str) -> None:
    """Exit now (the files are written atomically, so nothing is half-written), stopping the temporary
    server first so that no process is left behind."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    server = sys.modules.get("prefect.server.api.server")
    for instance in list(getattr(getattr(server, "SubprocessASGIServer", None), "_instances", {}).values()):
        if getattr(instance, "server_process", None) is not None:
            instance.server_process.kill()
    os._exit(EXIT_INTERRUPTED)


def _server_message() -> str:
    timeout = os.environ.get(_TIMEOUT_VAR, SERVER_STARTUP_TIMEOUT_S)
    return (
        f"Prefect's temporary server did not start within {timeout} s (a busy machine?): run again, raise "
        f"{_TIMEOUT_VAR}, or start one (`prefect server start`) and set PREFECT_API_URL to it"
    )


class _UserErrorsInOneLine(logging.Filter):
    """Keep a user error off the terminal, traceback and "Finished in state Failed(... <the message>)"
    alike: the command line prints its one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (UserError, RunFailure)):
            return False
        text = record.getMessage()
        return not ("in state Failed" in text and any(f" {name}: " in text for name in _explained()))


def _explained() -> set[str]:
    """The names of every error class the command line explains in one line."""
    names, todo = set(), [UserError, RunFailure]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def quiet_user_errors() -> None:
    """Filter Prefect's terminal handlers (once Prefect has set up its logging); its API handler, which
    feeds the UI, keeps the full record."""
    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                isinstance(f, _UserErrorsInOneLine) for f in handler.filters
            ):
                handler.addFilter(_UserErrorsInOneLine())
