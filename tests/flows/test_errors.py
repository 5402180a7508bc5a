"""One error taxonomy (`lora_core.foundation.errors`): the retry policy and the command line decide from it alike."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import flows.cli
from lora_core.foundation.errors import RunFailure, UserError
from tasks.retries import should_retry

PACKAGES = ("lora_core", "tasks", "flows", "bench")


@pytest.fixture(autouse=True)
def photos_here(tmp_path, monkeypatch) -> Path:
    """`photos/` with five files in the test's folder (its cwd): the command line checks that the photos
    path holds enough files before it gets to what these tests are about."""
    monkeypatch.chdir(tmp_path)
    for i in range(5):
        (tmp_path / "photos" / f"p{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "photos" / f"p{i}.jpg").write_bytes(b"a photo, as far as the path check knows")
    return tmp_path / "photos"


# Exceptions that never leave the function that raises them: control flow, caught where they are raised.
# A run the command line starts without any preflight (it stops before training), so `_run` is reached.
CLI_ARGS = ["photos", "--token", "t0k3n", "--stop-after", "ingest"]

INTERNAL = {
    "bench.gpu_rounds._Stop": "ends one timed step early inside bench.gpu_rounds.one_more_step",
    "flows.console.Stopped": "Ctrl-C: raised by flows.console.guard, printed by flows.cli.main (exit 130)",
    "flows.console.ServerStartError": "raised by flows.console.guard, printed by flows.cli.main in one line (exit 1)",
}


def _project_exceptions() -> list[type[Exception]]:
    """Every Exception subclass defined in the project's packages (warnings are not raised: left out)."""
    found: dict[str, type[Exception]] = {}
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names = [package_name] + [
            info.name for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}.")
        ]
        for name in names:
            if name.endswith("__main__"):
                continue
            module = importlib.import_module(name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == name and issubclass(cls, Exception) and not issubclass(cls, Warning):
                    found[f"{name}.{cls.__qualname__}"] = cls
    return [found[key] for key in sorted(found)]


def _instance(cls: type[Exception], message: str) -> Exception:
    """An instance with `message`, whatever extra arguments the class's constructor wants."""
    try:
        return cls(message)
    except TypeError:
        error = cls.__new__(cls)
        Exception.__init__(error, message)
        return error


EXCEPTIONS = _project_exceptions()


def test_the_project_defines_the_errors_this_test_is_about():
    names = {cls.__name__ for cls in EXCEPTIONS}
    # The ones the issue names, so a broken discovery cannot pass vacuously.
    assert {"SelectionError", "LoraFileError", "BaseModelError", "ConfigError", "NonFiniteLossError"} <= names
    assert len(EXCEPTIONS) >= 15


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda cls: f"{cls.__module__}.{cls.__qualname__}")
def test_every_error_is_classified_and_the_retry_policy_and_the_cli_agree(cls, capsys, monkeypatch):
    key = f"{cls.__module__}.{cls.__qualname__}"
    user, failure = issubclass(cls, UserError), issubclass(cls, RunFailure)
    assert user or failure or key in INTERNAL, f"{key}: derive it from UserError or RunFailure, or list it"
    assert not (user and failure), key
    if key in INTERNAL:
        return
    error = _instance(cls, f"the words of {cls.__name__}")
    assert should_retry(error) is False  # running again cannot help either kind

    def raises(*args, **kwargs):
        raise error

    monkeypatch.setattr(flows.cli, "_run", raises)
    code = flows.cli.main(CLI_ARGS)
    err = capsys.readouterr().err
    assert code == (2 if user else 1)
    assert f"error: the words of {cls.__name__}" in err and "Traceback" not in err


@pytest.mark.parametrize("error", [OSError("NFS hiccup"), TimeoutError("slow disk"), RuntimeError("flaky read")])
def test_a_transient_error_is_retried_and_the_cli_does_not_hide_it(error, monkeypatch):
    assert should_retry(error) is True

    def raises(*args, **kwargs):
        raise error

    monkeypatch.setattr(flows.cli, "_run", raises)
    with pytest.raises(type(error)):  # not a user's mistake: the traceback is the report
        flows.cli.main(CLI_ARGS)


def test_a_network_weights_file_that_is_not_a_lora_exits_2_at_once(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "start.safetensors"
    bad.write_bytes(bytes(range(256)) * 64)  # not a safetensors file
    started = []
    monkeypatch.setattr(flows.cli, "_run", lambda *a, **k: started.append(1))
    argv = [str(tmp_path), "--token", "t0k3n", "--workdir", str(tmp_path / "W"), "--network-weights", str(bad)]
    code = flows.cli.main([*argv, "--base-model", "builtin:tiny-sd15"])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "Traceback" not in err
    assert not started and not (tmp_path / "W").exists()  # nothing ran, nothing written


def test_the_flow_refuses_a_starting_file_that_is_not_a_lora_before_any_work(prefect_harness, tmp_path):
    from flows.train_subject import train_subject
    from lora_core.families import preset_config
    from lora_core.foundation.lora_file import LoraFileError

    bad = tmp_path / "start.safetensors"
    bad.write_bytes(b"\x00" * 512)
    config = preset_config().model_copy(
        update={"network_weights": str(bad), "pretrained_model_name_or_path": "builtin:tiny-sd15"}
    )
    with pytest.raises(LoraFileError, match=r"start\.safetensors"):
        train_subject(photos=tmp_path, token="t0k3n", workdir=tmp_path / "W", config=config)
    assert not (tmp_path / "W" / "t0k3n").exists()


def test_a_user_error_inside_a_stage_fails_at_once(prefect_harness, good_folder, tmp_path, monkeypatch):
    """Raised inside a Prefect task, a LoraFileError (retried before this taxonomy) runs once."""
    from prefect import flow

    import tasks.ingest
    from lora_core.config.settings import IngestSettings
    from lora_core.foundation.layout import SubjectLayout
    from lora_core.foundation.lora_file import LoraFileError

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise LoraFileError(f"{Path('x.safetensors')}: not a readable safetensors file")

    monkeypatch.setattr(tasks.ingest, "ingest", broken)

    @flow
    def once():
        task = tasks.ingest.ingest_photos.with_options(retry_delay_seconds=0, cache_policy=None, persist_result=False)
        return task(good_folder, SubjectLayout(tmp_path / "work", "t0k3n"), IngestSettings())

    with pytest.raises(LoraFileError):
        once()
    assert calls == [1]


def test_a_damaged_file_means_redo_but_a_bug_surfaces(tmp_path, monkeypatch):
    """`*_intact` answers False for a file a crash or an editor damaged, and lets a bug in our code through."""
    import lora_core.dataset.buckets
    import lora_core.dataset.captioning
    import lora_core.dataset.ingest
    from lora_core.dataset.buckets import BucketPlan, buckets_intact
    from lora_core.dataset.captioning import captions_intact
    from lora_core.dataset.ingest import layout_intact
    from lora_core.foundation.layout import SubjectLayout

    layout = SubjectLayout(tmp_path, "t0k3n")
    layout.root.mkdir(parents=True)
    for path in (layout.manifest, layout.buckets_csv, layout.captions_csv):
        path.write_bytes(b"\xff\xfe\x00 half a row,,\n")  # truncated, not UTF-8, no header
    checks = (
        lambda: layout_intact(layout),
        lambda: buckets_intact(layout, BucketPlan()),
        lambda: captions_intact(layout),
    )
    assert [check() for check in checks] == [False, False, False]

    def bug(*args, **kwargs):
        raise TypeError("a bug in our own reader")

    monkeypatch.setattr(lora_core.dataset.ingest, "read_manifest", bug)
    monkeypatch.setattr(lora_core.dataset.buckets, "read_buckets", bug)
    monkeypatch.setattr(lora_core.dataset.captioning, "read_captions", bug)
    for check in checks:
        with pytest.raises(TypeError):
            check()


def test_a_run_that_trains_without_a_base_model_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(flows.cli, "_run", lambda *a, **k: started.append(1))
    code = flows.cli.main([str(tmp_path), "--token", "t0k3n", "--workdir", str(tmp_path / "W")])
    err = capsys.readouterr().err
    assert code == 2 and "no base model: pass `--base-model MODEL`" in err and "Traceback" not in err
    assert not started and not (tmp_path / "W").exists()
    # Stopping before training needs no base model: the run starts.
    stop_at_captions = [str(tmp_path), "--token", "t0k3n", "--stop-after", "captions"]
    monkeypatch.setattr(flows.cli, "print_summary", lambda summary: None)
    assert flows.cli.main([*stop_at_captions, "--caption-model", "builtin:tiny-blip"]) == 0 and started
