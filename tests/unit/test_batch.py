"""The batch file (lora_core.setup.subjects) and the one config resolution the CLI, the UI and the batch share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.cli import build_parser, config_from_args
from lora_core.setup.resolve import merge_settings, subject_config
from lora_core.setup.subjects import BatchError, BatchSubject, load_batch, subject_outcome


def write_batch(folder: Path, data: object) -> Path:
    path = folder / "batch.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


@pytest.fixture
def photo_dirs(tmp_path) -> dict[str, Path]:
    dirs = {name: tmp_path / "photos" / name for name in ("anna", "ben", "cleo")}
    for folder in dirs.values():
        folder.mkdir(parents=True)
    return dirs


def test_defaults_apply_subject_keys_win_and_overrides_merge(tmp_path, photo_dirs):
    path = write_batch(
        tmp_path,
        {
            "defaults": {
                "base_model": "builtin:tiny-sd15",
                "workdir": "runs",
                "overrides": {"selection": {"max_resumes": 0}, "max_train_epochs": 3},
            },
            "subjects": [
                {"photos": "photos/anna", "token": "ann4"},
                {
                    "photos": "photos/ben",
                    "token": "b3n",
                    "base_model": "builtin:tiny-sdxl",
                    "preset": "sdxl",
                    "overrides": {"max_train_epochs": 8, "selection": {"resume_epochs": 2}},
                },
            ],
        },
    )
    anna, ben = load_batch(path)
    assert anna.photos == photo_dirs["anna"] and anna.workdir == tmp_path / "runs"  # relative to the batch file
    assert anna.base_model == "builtin:tiny-sd15" and ben.base_model == "builtin:tiny-sdxl"
    assert ben.overrides == {"max_train_epochs": 8, "selection": {"max_resumes": 0, "resume_epochs": 2}}
    config = ben.lora_config("test")
    assert config.model_family == "sdxl" and config.max_train_epochs == 8 and config.selection.max_resumes == 0
    assert anna.lora_config("test").max_train_epochs == 3
    parameters = ben.parameters()
    assert json.loads(json.dumps(parameters)) == parameters  # what run_deployment sends
    assert parameters["photos"] == str(photo_dirs["ben"]) and parameters["preset"] == "sdxl"


def test_every_problem_is_reported_at_once_naming_the_entry(tmp_path, photo_dirs):
    path = write_batch(
        tmp_path,
        {
            "defaults": {"base_model": "builtin:tiny-sd15"},
            "subjects": [
                {"photos": "photos/anna", "token": "ann4"},
                {"photos": "photos/nobody", "token": "n0body"},
                {"photos": "photos/ben", "token": "bad token!"},
                {"photos": "photos/cleo", "token": "cl3o", "overrides": {"selection": {"max_resumes": -1}}},
                {"photos": "photos/cleo", "token": "cl3o2", "colour": "blue"},
                {"photos": "photos/anna", "token": "ann4"},
                {"photos": "photos/ben", "token": "b3n", "base_model": "models/sd15/missing.safetensors"},
                {"photos": "photos/ben", "token": "b3n3", "base_model": "someone/not-downloaded-here"},
                {"photos": "photos/ben", "token": "b3n2", "caption_model": "./no/blip/here"},
            ],
        },
    )
    with pytest.raises(BatchError) as raised:
        load_batch(path)
    message = str(raised.value)
    assert "nothing started" in message
    assert "subjects[1] (n0body): photos:" in message and "does not exist" in message
    assert "subjects[2] (bad token!)" in message
    assert "subjects[3] (cl3o)" in message and "max_resumes" in message
    assert "subjects[4] (cl3o2)" in message and "colour" in message
    assert "subjects[5] (ann4): token 'ann4'" in message and "also subjects[0]" in message
    assert "subjects[0]" not in message.replace("also subjects[0]", "")  # the good entry is not blamed
    # The models are checked too, before anything starts, and named as batch keys, not as flags.
    assert "subjects[6] (b3n): base model 'models/sd15/missing.safetensors'" in message
    assert "(the batch key base_model)" in message and "--base-model" not in message
    # A hub id is looked for where each subject trains (its cache, its network), not on the batch's machine.
    assert "subjects[7]" not in message
    assert "subjects[8] (b3n2): caption model './no/blip/here'" in message and "the batch key caption_model" in message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("subjects: [unclosed", "not a readable YAML file"),
        ("- just\n- a list\n", "expected a mapping"),
        ("subjects: []\n", "at least one subject"),
        ("defaults: {tokn: x}\nsubjects: [{photos: ., token: a}]\n", "'defaults:' takes subject keys"),
        ("subjects: [{photos: ., token: a}]\nextra: 1\n", "expected a mapping"),
    ],
)
def test_a_malformed_file_says_what_is_wrong(tmp_path, text, words):
    with pytest.raises(BatchError, match=words):
        load_batch(write_batch(tmp_path, text))


def test_a_missing_batch_file_is_named(tmp_path):
    with pytest.raises(BatchError, match="no such batch file"):
        load_batch(tmp_path / "absent.yaml")


def test_cli_deployment_and_batch_resolve_the_same_config(tmp_path, photo_dirs):
    """The same inputs give the same LoraConfig wherever a run starts: the command line, the train-subject
    deployment's parameters, a batch entry."""
    kohya = tmp_path / "kohya.json"
    kohya.write_text(json.dumps({"learning_rate": 0.0003, "max_train_epochs": 9, "network_dim": 16}))
    args = build_parser().parse_args(
        [
            str(photo_dirs["anna"]),
            "--token",
            "ann4",
            "--config",
            str(kohya),
            "--base-model",
            "builtin:tiny-sd15",
            "--caption-model",
            "builtin:tiny-blip",
            "--subject-type",
            "object",
        ]
    )
    from_cli = config_from_args(args)
    entry = {
        "photos": "photos/anna",
        "token": "ann4",
        "config": "kohya.json",
        "base_model": "builtin:tiny-sd15",
        "caption_model": "builtin:tiny-blip",
        "subject_type": "object",
    }
    (subject,) = load_batch(write_batch(tmp_path, {"subjects": [entry]}))
    parameters = subject.parameters()
    from_flow = subject_config(
        parameters["preset"],
        parameters["config_file"],
        parameters["overrides"],
        base_model=parameters["base_model"],
        caption_model=parameters["caption_model"],
        subject_type=parameters["subject_type"],
    )
    assert from_cli == subject.lora_config("batch") == from_flow
    assert from_cli.max_train_epochs == 9 and from_cli.network_dim == 16 and str(from_cli.subject_type) == "object"


def test_named_settings_win_over_overrides_which_win_over_the_file(tmp_path):
    kohya = tmp_path / "kohya.json"
    kohya.write_text(json.dumps({"max_train_epochs": 9, "network_dim": 16}))
    config = subject_config(
        None, kohya, {"max_train_epochs": 4, "network_dim": 8}, base_model="builtin:tiny-sd15", epochs=2
    )
    assert (config.max_train_epochs, config.network_dim) == (2, 8)
    assert config.pretrained_model_name_or_path == "builtin:tiny-sd15"


_settings = st.dictionaries(
    st.sampled_from(["max_train_epochs", "network_dim", "num_repeats"]), st.integers(1, 64), max_size=3
)


@settings(max_examples=30, deadline=None)
@given(defaults=_settings, own=_settings, resumes=st.one_of(st.none(), st.integers(0, 3)))
def test_a_subject_s_overrides_merge_over_the_defaults(tmp_path_factory, defaults, own, resumes):
    folder = tmp_path_factory.mktemp("batch")
    (folder / "p").mkdir()
    nested = {"selection": {"max_resumes": resumes}} if resumes is not None else {}
    data = {
        "defaults": {"overrides": {**defaults, **nested}, "base_model": "builtin:tiny-sd15"},
        "subjects": [{"photos": "p", "token": "t", **({"overrides": own} if own else {})}],
    }
    (subject,) = load_batch(write_batch(folder, data))
    expected = merge_settings({**defaults, **nested}, own)
    assert subject.overrides == expected
    config = subject.lora_config("batch")
    for key, value in expected.items():
        if key != "selection":
            assert getattr(config, key) == value
    if resumes is not None:
        assert config.selection.max_resumes == resumes


def test_outcome_reads_the_selection_of_a_finished_subject(tmp_path):
    subject = BatchSubject(photos=tmp_path, token="t0k", workdir=tmp_path / "work")
    assert subject_outcome(subject) == {"verdict": "", "chosen_epoch": None, "lora": ""}
    result = tmp_path / "work" / "t0k" / "result_current"
    result.mkdir(parents=True)
    (result / "selection.json").write_text(json.dumps({"verdict": "good", "chosen_epoch": 3}))
    (result / "t0k.safetensors").write_bytes(b"x")
    assert subject_outcome(subject) == {"verdict": "good", "chosen_epoch": 3, "lora": str(result / "t0k.safetensors")}


def test_the_scheduled_default_batch_file_is_valid_on_a_fresh_clone():
    """deployments/nightly.yaml, the nightly schedule's default: the demo photos on the built-in tiny models."""
    root = Path(__file__).resolve().parents[2]
    (subject,) = load_batch(root / "deployments" / "nightly.yaml")
    assert subject.photos == root / "demo" / "photos" and subject.token == "t0k3n"
    assert subject.lora_config("nightly").pretrained_model_name_or_path == "builtin:tiny-sd15"
