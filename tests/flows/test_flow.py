"""The flow and its command line: caching on content, artifacts, exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

from flows.cli import build_parser, config_from_args, main
from flows.train_subject import STAGES, train_subject
from lora_core.families import preset_config
from tests.conftest import TINY_BLIP, encode, photo


def _ingest_state(photos: Path, workdir: Path, token: str = "t0k3n") -> tuple[str, str]:
    """Run the flow; return the ingest task run's state name and the flow run id."""
    state = train_subject(photos=photos, token=token, workdir=workdir, stop_after="ingest", return_state=True)
    assert state.is_completed(), state
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    ingest_runs = [r for r in runs if r.task_key.startswith("ingest") or r.name.startswith("ingest")]
    assert len(ingest_runs) == 1
    return ingest_runs[0].state.name, str(flow_run_id)


def test_ingest_is_cached_on_the_photos_content(prefect_harness, good_folder, tmp_path):
    work = tmp_path / "work"
    assert _ingest_state(good_folder, work)[0] == "Completed"
    assert _ingest_state(good_folder, work)[0] == "Cached"  # unchanged folder
    (good_folder / "img-new.png").write_bytes(encode(photo((700, 500), 4242), "PNG"))
    assert _ingest_state(good_folder, work)[0] == "Completed"  # one more photo
    assert len(list((work / "t0k3n" / "training_images" / "57_t0k3n").glob("*.png"))) == 7
    assert _ingest_state(good_folder, work)[0] == "Cached"
    # Back to the first folder: Prefect holds its cached result, but the files are the 7-photo ones.
    (good_folder / "img-new.png").unlink()
    assert _ingest_state(good_folder, work)[0] == "Completed"
    assert [p.name for p in (work / "t0k3n" / "training_images").iterdir() if not p.name.startswith(".")] == [
        "66_t0k3n"
    ]


def test_damaged_output_is_rebuilt_not_served_from_cache(prefect_harness, good_folder, tmp_path):
    work = tmp_path / "work"
    _ingest_state(good_folder, work)
    victim = next((work / "t0k3n" / "training_images" / "66_t0k3n").glob("*.png"))
    victim.unlink()
    assert _ingest_state(good_folder, work)[0] == "Completed"
    assert victim.exists()


def test_flow_publishes_artifacts_and_the_kohya_json(prefect_harness, good_folder, tmp_path):
    work = tmp_path / "work"
    _, flow_run_id = _ingest_state(good_folder, work, token="Art_Token")
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["art-token-ingest", "art-token-ingest-summary"]))
        )
    by_key = {a.key: a for a in artifacts if str(a.flow_run_id) == flow_run_id}
    table = by_key["art-token-ingest"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert {row["source"] for row in table} == {f"img{i}.jpg" for i in range(6)}
    assert "accepted: **6**" in by_key["art-token-ingest-summary"].data
    exported = json.loads((work / "Art_Token" / "result_current" / "kohya_ss_config.json").read_text())
    assert exported["output_name"] == "Art_Token" and exported["train_data_dir"].endswith("training_images")


def _stage_states(photos: Path, workdir: Path, token: str = "t0k3n", enable_bucket=True, **kwargs) -> dict[str, str]:
    """Run the flow through captions with the tiny BLIP; return each stage's state name."""
    captioning = preset_config().captioning.model_copy(update={"model": TINY_BLIP, **kwargs})
    config = preset_config().model_copy(update={"captioning": captioning, "enable_bucket": enable_bucket})
    state = train_subject(
        photos=photos, token=token, workdir=workdir, config=config, stop_after="captions", return_state=True
    )
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    names = {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}
    return {name: state for name, state in names.items() if name in STAGES}  # not the bookkeeping tasks


def test_buckets_and_captions_are_cached_stages(prefect_harness, good_folder, tmp_path, count_blip):
    work = tmp_path / "work"
    stages = ("ingest", "checks", "crop", "buckets", "captions")
    assert _stage_states(good_folder, work) == dict.fromkeys(stages, "Completed")
    assert sum(count_blip) == 6
    subject = work / "t0k3n"
    assert (subject / "buckets.csv").is_file() and (subject / "captions.csv").is_file()
    assert _stage_states(good_folder, work) == dict.fromkeys(stages, "Cached")
    # One more photo: every stage runs again, but BLIP sees only the new photo.
    count_blip.clear()
    (good_folder / "img9.png").write_bytes(encode(photo((700, 500), 4242), "PNG"))
    assert set(_stage_states(good_folder, work).values()) == {"Completed"}
    assert count_blip == [1]
    captions = sorted(subject.glob("training_images/*/*.txt"))
    assert len(captions) == 7 and all(c.read_text().startswith("t0k3n, ") for c in captions)
    # An edited caption re-runs only the captions stage, which keeps the edit.
    captions[2].write_text("t0k3n, my own words\n")
    assert _stage_states(good_folder, work) == dict.fromkeys(stages[:-1], "Cached") | {"captions": "Completed"}
    assert captions[2].read_text() == "t0k3n, my own words\n" and count_blip == [1]
    # A deleted buckets.csv is written again rather than trusted from the cache.
    (subject / "buckets.csv").unlink()
    assert _stage_states(good_folder, work)["buckets"] == "Completed" and (subject / "buckets.csv").is_file()


def test_going_back_to_earlier_settings_rewrites_the_outputs(prefect_harness, good_folder, tmp_path):
    """Prefect still holds the first settings' cached result; the files must follow the settings anyway."""
    (good_folder / "img0.txt").write_text("a man with a hat")
    work = tmp_path / "work"
    subject = work / "t0k3n"
    first = _stage_states(good_folder, work)
    assert first["captions"] == "Completed"
    caption = next(subject.glob("training_images/*/0001.txt"))
    rows = (subject / "buckets.csv").read_text()
    assert caption.read_text() == "t0k3n, a man with a hat\n"
    _stage_states(good_folder, work, enable_bucket=False, recaption=True)
    assert "a man with a hat" not in caption.read_text() and (subject / "buckets.csv").read_text() != rows
    again = _stage_states(good_folder, work)
    assert again["buckets"] == "Completed" and again["captions"] == "Completed"
    assert caption.read_text() == "t0k3n, a man with a hat\n" and (subject / "buckets.csv").read_text() == rows


def test_bucket_and_caption_artifacts(prefect_harness, good_folder, tmp_path):
    _stage_states(good_folder, tmp_path / "work", token="Art2")
    keys = [
        "art2-buckets",
        "art2-buckets-summary",
        "art2-captions",
        "art2-checks-summary",
        "art2-crop",
        "art2-crop-summary",
    ]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    by_key = {a.key: a for a in artifacts}
    table = by_key["art2-buckets"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert sum(row["images"] for row in table) == 6
    markdown = by_key["art2-captions"].data
    assert markdown.count("data:image/jpeg;base64,") == 6 and markdown.count("| Art2, ") == 6
    # The dataset checks: a row per photo with its flags, a thumbnail each. These synthetic photos have no
    # face (HOG may see one in a random blob: the face checks themselves are tested on real photos).
    crop = by_key["art2-crop"].data
    crop = json.loads(crop) if isinstance(crop, str) else crop
    assert len(crop) == 6 and all(row["decision"] == "keep" for row in crop)
    no_face = [row["source"] for row in crop if "no_face" in row["flags"].split(";")]
    assert len(no_face) >= 5
    summary = by_key["art2-crop-summary"].data
    assert summary.count("data:image/jpeg;base64,") == 6 and f"{len(no_face)} image(s) have no face found" in summary
    assert "mirroring not checked" in by_key["art2-checks-summary"].data


def test_help_explains_every_option():
    text = build_parser().format_help()
    options = ("photos", "--token", "--workdir", "--config", "--preset", "--stop-after", "--caption-model")
    for option in (*options, "--select-only", "--max-resumes"):
        assert option in text
    assert "--recaption" in text and "captions" in text and "buckets" in text
    assert "--mirror-policy" in text and "--subject-type" in text and "checks" in text and "crop" in text


def test_check_flags_override_the_config_file(tmp_path):
    cfg = tmp_path / "kohya.json"
    cfg.write_text(json.dumps({"network_dim": 8, "checks": {"min_face_px": 64, "mirror_policy": "reject"}}))
    args = build_parser().parse_args(
        ["p", "--token", "t", "--config", str(cfg), "--mirror-policy", "fix", "--subject-type", "object"]
    )
    config = config_from_args(args)
    assert config.checks.mirror_policy == "fix" and config.checks.min_face_px == 64  # the file's other values stay
    assert config.subject_type == "object" and config.network_dim == 8
    assert config_from_args(build_parser().parse_args(["p", "--token", "t"])).checks.mirror_policy == "flag"


def _cli(capsys: pytest.CaptureFixture, *args: str) -> SimpleNamespace:
    """The command line in this process (its exit code and output); the killed-run test in
    test_training runs it as a real subprocess."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_cli_on_a_messy_folder_exits_zero(prefect_harness, capsys, demo_copy, tmp_path):
    (demo_copy / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (demo_copy / "notes.txt").write_text("not a photo")
    (demo_copy / "empty.jpg").write_bytes(b"")
    (demo_copy / "tiny.png").write_bytes(encode(photo((120, 90), 1), "PNG"))
    (demo_copy / "obama-1.txt").write_text("a man in a suit with arms crossed")
    work = tmp_path / "W"
    done = _cli(
        capsys,
        str(demo_copy),
        "--token",
        "t0k3n",
        "--workdir",
        str(work),
        "--caption-model",
        TINY_BLIP,
        "--stop-after",
        "captions",
    )
    assert done.returncode == 0, done.stderr
    manifest = (work / "t0k3n" / "manifest.csv").read_text()
    for name in ("notes.txt", "empty.jpg", "tiny.png", ".DS_Store", "obama-1.txt"):
        assert name in manifest
    assert "ingest: 5 accepted" in done.stdout
    assert "captions: 4 blip, 1 user; BLIP ran on 4 image(s)" in done.stdout
    # Through captions: every image has one, starting with the token once; the user's caption survives.
    images = sorted((work / "t0k3n" / "training_images" / "80_t0k3n").glob("*.png"))
    captions = [image.with_suffix(".txt").read_text() for image in images]
    assert len(captions) == 5 and all(c.startswith("t0k3n, ") and c.count("t0k3n") == 1 for c in captions)
    assert captions[0] == "t0k3n, a man in a suit with arms crossed\n"  # obama-1 sorts first


def test_cli_stops_after_buckets(prefect_harness, capsys, good_folder, tmp_path):
    work = tmp_path / "W"
    done = _cli(capsys, str(good_folder), "--token", "b", "--workdir", str(work), "--stop-after", "buckets")
    assert done.returncode == 0, done.stderr
    assert "buckets: 576x448: 6" in done.stdout  # 640x480 photos: 4:3 is nearest 576x448
    assert (work / "b" / "buckets.csv").is_file() and not list(work.glob("b/training_images/*/*.txt"))


def test_a_typo_in_the_config_gets_a_guess_said_first_and_again_after_the_summary(
    prefect_harness, capsys, good_folder, tmp_path
):
    config = tmp_path / "kohya.json"
    config.write_text('{"leraning_rate": 0.0002, "network_dim": 8, "totally_new_key": 1}')
    args = [str(good_folder), "--token", "t", "--workdir", str(tmp_path / "W"), "--config", str(config)]
    done = _cli(capsys, *args, "--stop-after", "buckets")
    assert done.returncode == 0, done.stderr
    said = f"warning: {config}: ignoring keys this trainer does not use: leraning_rate (did you mean learning_rate?)"
    assert said in done.stderr and "totally_new_key" in done.stderr
    assert "totally_new_key (did you mean" not in done.stderr  # a guess only where one is close
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(said) and done.stdout.index("buckets:") < done.stdout.index(said)


def test_cli_with_an_unreachable_caption_model_says_what_to_do_before_any_stage(
    prefect_harness, capsys, good_folder, tmp_path
):
    done = _cli(capsys, str(good_folder), "--token", "c", "--workdir", str(tmp_path / "W"), "--stop-after", "captions")
    assert done.returncode == 2  # an unreachable model is a user error (lora_core.foundation.errors)
    assert "`--caption-model DIR`" in done.stderr and "builtin:tiny-blip" in done.stderr
    assert not (tmp_path / "W" / "c").exists()  # refused before ingest, not after ingest, checks, crop, buckets
    # Stopping before captions needs no caption model: the same command runs.
    stopped = _cli(
        capsys, str(good_folder), "--token", "c", "--workdir", str(tmp_path / "W"), "--stop-after", "buckets"
    )
    assert stopped.returncode == 0, stopped.stderr


def test_cli_with_three_photos_fails_clearly(prefect_harness, capsys, tmp_path):
    folder = tmp_path / "three"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(encode(photo((640, 480), i)))
    done = _cli(capsys, str(folder), "--token", "t0k3n", "--workdir", str(tmp_path / "W"), "--stop-after", "ingest")
    assert done.returncode == 2  # said before the run starts (flows.console.check_photos)
    assert "3 file(s) that may be photos, and at least 5 usable photos are needed" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--token", "../evil"], "invalid token"),
        (["--token", "ok", "--config", "{cfg}"], "bad.json: field 'networkDim' (network_dim)"),
    ],
)
def test_cli_rejects_bad_arguments_before_running(capsys, tmp_path, good_folder, args, message):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"networkDim": "wide"}))
    args = [a.replace("{cfg}", str(cfg)) for a in args]
    done = _cli(capsys, str(good_folder), *args, "--workdir", str(tmp_path / "W"))
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "W").exists()


def test_going_back_to_an_earlier_check_policy_puts_its_files_back(prefect_harness, tmp_path, portraits):
    """fix -> flag -> fix: the third run's cached result is only trusted once its files are back."""
    from PIL import Image

    from lora_core.config.settings import CheckSettings
    from tests.unit.test_orient import crops, same_pixels

    photos = tmp_path / "photos"
    photos.mkdir()
    originals = crops(portraits["astronaut"], 6, seed=11)
    for i, image in enumerate(originals):
        (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i == 2 else image).save(photos / f"c-{i}.png")
    ingest = preset_config().ingest.model_copy(update={"near_duplicate_distance": 2})

    def run(policy: str) -> Image.Image:
        config = preset_config().model_copy(update={"checks": CheckSettings(mirror_policy=policy), "ingest": ingest})
        train_subject(photos=photos, token="pol", workdir=tmp_path / "work", config=config, stop_after="crop")
        return Image.open(tmp_path / "work" / "pol" / "training_images" / "66_pol" / "0003.png")

    assert same_pixels(run("fix"), originals[2])
    assert same_pixels(run("flag"), originals[2].transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert same_pixels(run("fix"), originals[2])


def test_a_run_from_the_form_is_refused_at_its_start_naming_the_form_s_fields(prefect_harness, good_folder, tmp_path):
    """The UI's train-subject form (or a deployment's parameters): the same checks as the command line, at the
    flow's start, before ingest; the message names the field to fill in, not a flag nobody typed."""
    from lora_core.dataset.blip import CaptionModelError
    from lora_core.families.loading import BaseModelError

    work = tmp_path / "W"
    with pytest.raises(BaseModelError) as caught:
        train_subject(photos=good_folder, token="f0rm", workdir=work, base_model="someone/not-downloaded")
    assert "set train-subject's base_model field to DIR" in str(caught.value)
    assert "--base-model" not in str(caught.value)
    with pytest.raises(CaptionModelError) as caught:
        train_subject(photos=good_folder, token="f0rm", workdir=work, stop_after="captions")
    assert "set train-subject's caption_model field to DIR" in str(caught.value)
    assert not (work / "f0rm").exists()  # refused before ingest


def test_a_subject_started_by_a_batch_names_the_batch_file_s_keys(prefect_harness):
    """train-batch starts each subject as its subflow: a subject's errors then name batch keys, not form fields."""
    from prefect import flow

    from flows.train_subject import _form_or_batch

    @flow
    def subject() -> str:
        return _form_or_batch("b4tch").give("base_model", "DIR")

    @flow
    def batch() -> str:
        return subject()

    assert batch() == "set `base_model: DIR` in the batch file's entry for b4tch (or in the batch's defaults)"
    assert subject() == "set train-subject's base_model field to DIR"  # from the form: no parent run
