"""Epoch metrics from renders (evaluation.metrics), the samples and select stages, auto-resume, --select-only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from lora_core.config.lora_config import LoraConfig
from lora_core.config.settings import SelectionSettings
from lora_core.evaluation.embedders import FaceEmbedder
from lora_core.evaluation.epoch_files import SelectionError, find_run, publish_choice
from lora_core.evaluation.metric_grids import grid_key, load_grid, metric_spec, save_grid
from lora_core.evaluation.metrics import Reference, epoch_metrics
from lora_core.evaluation.selection import NO_SIGNAL
from lora_core.families.loading import load_base_model
from lora_core.foundation.layout import SubjectLayout
from lora_core.foundation.lora_file import read_lora
from lora_core.training.network import LoraNetwork
from tasks.artifacts import selection_markdown
from tests.conftest import photo
from tests.unit.test_training import TINY_SD15, captioned_photos, flow_config

# The metric grid on the tiny models: 64 px, 2 steps, two token prompts and the class prompt, two seeds.
CHEAP_GRID = {
    "size": 64,
    "steps": 2,
    "seeds": [1, 2],
    "prompts": ["{token}, portrait photo", "{token}, oil painting portrait"],
    "strengths": [0.6, 1.0],
}
CHEAP_GRID_SETTINGS = SelectionSettings(**CHEAP_GRID)


def test_the_metric_grid_ends_with_the_class_prompt_without_the_token():
    spec = metric_spec(SelectionSettings(), "t0k3n", "person", 512)
    texts = [p.text for p in spec.prompts]
    assert all("t0k3n" in t for t in texts[:-1]) and texts[-1] == "portrait photo of a person"
    assert {(p.width, p.height, p.steps, p.seeds) for p in spec.prompts} == {(512, 512, 20, (1, 2, 3))}
    assert metric_spec(SelectionSettings(class_prompt="photo of a woman"), "x", "person", 512).prompts[-1].text == (
        "photo of a woman"
    )
    assert metric_spec(SelectionSettings(), "x", "object", 512).prompts[-1].text == "photo of an object"
    with pytest.raises(ValueError, match="token"):
        SelectionSettings(prompts=["a photo of a dog"])


def test_a_grid_is_read_back_only_for_its_own_key(tmp_path):
    grid = [[photo((64, 64), seed) for seed in (1, 2)] for _ in range(2)]
    save_grid(tmp_path / "g", "key-a", grid, {"training_loss": 0.5, "heldout_loss": 0.7})
    images, losses = load_grid(tmp_path / "g", "key-a")
    assert losses == {"training_loss": 0.5, "heldout_loss": 0.7}
    assert [[np.asarray(i).tolist() for i in row] for row in images] == [
        [np.asarray(i).tolist() for i in row] for row in grid
    ]
    # A grid saved before the held-out split: its training images' loss was called validation_loss.
    record = json.loads((tmp_path / "g" / "grid.json").read_text())
    old = {"key": record["key"], "files": record["files"], "validation_loss": 0.4}
    (tmp_path / "g" / "grid.json").write_text(json.dumps(old))
    assert load_grid(tmp_path / "g", "key-a")[1] == {"training_loss": 0.4, "heldout_loss": None}
    assert load_grid(tmp_path / "g", "key-b") is None
    (tmp_path / "g" / "p01_1.png").write_bytes(b"broken")
    assert load_grid(tmp_path / "g", "key-a") is None
    spec = metric_spec(SelectionSettings(), "t", "person", 512)
    assert grid_key(spec, "base", "abc") != grid_key(spec, "base", "abd") != grid_key(spec, "other", "abd")


def _reference(photos, base_grid):
    return Reference(photos=photos, photo_embeddings=None, base_grid=base_grid, base_class_embeddings=[])


def test_epoch_metrics_on_constructed_grids(portraits):
    base = [[photo((96, 96), 10 + i + 3 * row) for i in range(3)] for row in range(3)]  # 2 token rows, class
    photos = [portraits["obama-1"], portraits["obama-2"]]
    reference = _reference(photos, base)
    same = epoch_metrics(1, base, {"training_loss": 0.3, "heldout_loss": 0.4}, reference, None)
    # The base model against itself: its own variety, no burn, no copy, nothing measured without an embedding.
    assert same.diversity == pytest.approx(1.0) and same.burn == 0.0 and same.copy_distance > 6
    assert (same.training_loss, same.heldout_loss) == (0.3, 0.4) and same.fidelity is None and same.preservation is None
    collapsed = [[base[0][0]] * 3, base[1], base[2]]  # every seed of the first prompt gives the same picture
    assert epoch_metrics(2, collapsed, {}, reference, None).diversity == pytest.approx(0.5 * (0 + 1.0), abs=1e-9)
    cooked = [[image.filter(ImageFilter.GaussianBlur(3)) for image in row] for row in base[:-1]] + [base[-1]]
    assert epoch_metrics(3, cooked, {}, reference, None).burn > 0.25
    copied = [[photos[0].resize((96, 96)), *base[0][1:]], base[1], base[2]]
    assert epoch_metrics(4, copied, {}, reference, None).copy_distance <= 6


def test_face_fidelity_and_preservation_on_real_portraits(portraits):
    """Renders of the subject score near the photos' own similarity; another person scores lower and,
    in the class prompt, the subject's face there is the LoRA bleeding."""
    embed = FaceEmbedder()
    obama = [portraits[f"obama-{i}"] for i in (1, 2, 3)]
    other = portraits["astronaut"]
    vectors = np.stack([v for v in embed(obama) if v is not None])
    assert len(vectors) == 3
    base_class = [other, other]
    reference = Reference(obama, vectors, [[other, other], base_class], embed(base_class))
    like = epoch_metrics(
        1, [[obama[0], obama[1]], [other, other]], {}, reference, [embed([obama[0], obama[1]]), embed([other, other])]
    )
    unlike = epoch_metrics(
        2, [[other, other], [other, other]], {}, reference, [embed([other, other]), embed([other, other])]
    )
    bleeding = epoch_metrics(
        3,
        [[obama[0], obama[1]], [obama[2], obama[0]]],
        {},
        reference,
        [embed(obama[:2]), embed([obama[2], obama[0]])],
    )
    assert like.fidelity > 0.9 and unlike.fidelity < like.fidelity - 0.05
    assert like.preservation == pytest.approx(0.0, abs=1e-6) and bleeding.preservation > 0.1


def test_strength_scales_the_update_and_zero_is_the_base(builtin_models_home, tmp_path):
    base = load_base_model(TINY_SD15)
    torch.manual_seed(0)
    network = LoraNetwork(base, 4, 4.0)
    with torch.no_grad():
        for param in network.parameters():
            param.normal_()
    from lora_core.foundation.lora_file import save_lora

    save_lora(tmp_path / "l.safetensors", network.weights(), 4.0, {}, torch.float32)
    lora = read_lora(tmp_path / "l.safetensors")
    full = {k: v[1].clone() for k, v in network.weights().items()}

    def ups() -> dict[str, torch.Tensor]:
        return {k: v[1] for k, v in network.weights().items()}

    network.load(lora, 0.5)
    assert all(torch.allclose(up, 0.5 * full[k]) for k, up in ups().items())
    network.load(lora, 0.0)
    assert not any(up.any() for up in ups().values())
    network.load(lora)
    assert all(torch.equal(up, full[k]) for k, up in ups().items())
    network.clear()
    assert not any(up.any() for up in ups().values())


def _kohya_folder(tmp_path, epochs: dict[int, bytes], last: tuple[int, bytes] | None = None):
    folder = tmp_path / "kohya_out"
    folder.mkdir()
    for epoch, data in epochs.items():
        (folder / f"mylora-{epoch:06d}.safetensors").write_bytes(data)
    if last is not None:
        (folder / "mylora.safetensors").write_bytes(last[1])
    return folder


def test_find_run_reads_kohya_names_and_keeps_the_last_epoch_file(trained_run, tmp_path):
    files = {e: trained_run.epoch_lora(e).read_bytes() for e in (1, 2, 3)}
    folder = _kohya_folder(tmp_path, {1: files[1], 2: files[2]}, last=(3, files[3]))
    run = find_run(folder, "whatever")
    assert run.name == "mylora" and sorted(run.epochs) == [1, 2, 3] and run.epochs[3].name == "mylora.safetensors"
    assert run.layout is None and run.photos == ()
    publish_choice(run, 1)
    # kohya's last epoch lived only in mylora.safetensors: kept under its epoch name before being replaced.
    assert (folder / "mylora-000003.safetensors").read_bytes() == files[3]
    assert (folder / "mylora.safetensors").read_bytes() == files[1]
    (folder / "other-000001.safetensors").write_bytes(files[1])
    with pytest.raises(SelectionError, match="several runs"):
        find_run(folder, "whatever")
    with pytest.raises(SelectionError, match="no epoch files"):
        find_run(tmp_path, "x")


# --- The flow: a run forced to be undertrained resumes by itself ----------------------------------


class TrainedRun:
    """The forced-undertrained flow run every test here looks at (trained once per session)."""

    def __init__(self, work, photos, config, summary) -> None:
        self.work, self.photos, self.config, self.summary = work, photos, config, summary
        self.result = work / "rs" / "result_current"

    def epoch_lora(self, epoch: int):
        return self.result / f"rs-{epoch:06d}.safetensors"


def forced_config() -> LoraConfig:
    """Two epochs, then at most one resume of two; undertrained every time: the subject embedding
    (BLIP's vision encoder for an object) can never reach `min_fidelity` 10, and no guard may fire."""
    guards_off = {"copy_distance": -1, "min_diversity": 0.0, "max_preservation": 100.0, "max_burn": 100.0}
    selection = CHEAP_GRID | guards_off | {"min_fidelity": 10.0, "max_resumes": 1, "resume_epochs": 2}
    cheap = "{token}, portrait photo --w 64 --h 64 --s 2"  # txt2img renders the sample prompts
    return flow_config(
        max_train_epochs=2, num_repeats=1, subject_type="object", selection=selection, sample_prompts=cheap
    )


@pytest.fixture(scope="module")
def trained_run(prefect_harness, builtin_models_home, tmp_path_factory) -> TrainedRun:
    from flows.train_subject import train_subject

    root = tmp_path_factory.mktemp("forced")
    photos = captioned_photos(root, seed=300)
    config = forced_config()
    summary = train_subject(photos=photos, token="rs", workdir=root / "work", config=config)
    return TrainedRun(root / "work", photos, config, summary)


def test_an_undertrained_run_resumes_from_its_last_epoch_and_selects_again(trained_run):
    result = trained_run.result
    record = json.loads((result / "selection.json").read_text())
    # Round 1 judged epochs 1-2 undertrained; the resume trained epochs 3-4 as new files; round 2 judged all four.
    assert [r["epochs"] for r in record["rounds"]] == [[1, 2], [1, 2, 3, 4]]
    assert [r["verdict"] for r in record["rounds"]] == ["undertrained", "undertrained"]
    assert [m["epoch"] for m in record["metrics"]] == [1, 2, 3, 4]
    assert all(trained_run.epoch_lora(e).is_file() for e in (1, 2, 3, 4))
    assert read_lora(trained_run.epoch_lora(3)).metadata["ss_epoch"] == "3"
    assert any("min_fidelity" in reason for reason in record["reasons"])
    assert any("still undertrained after 1 resume(s)" in reason for reason in record["reasons"])
    # The resume started from epoch 2's LoRA: the round keeps a copy of it and names its source.
    states = SubjectLayout(trained_run.work, "rs").train_state("any").parent
    starts = [json.loads(p.read_text())["source"] for p in states.glob("*/start.json")]
    assert starts == [str(trained_run.epoch_lora(2).resolve())]
    start_copy = next(states.glob("*/start.safetensors"))
    assert start_copy.read_bytes() == trained_run.epoch_lora(2).read_bytes()
    # Every metric is a number or unavailable; BLIP's embedding makes fidelity available for an object.
    assert all(isinstance(m["fidelity"], float) and isinstance(m["training_loss"], float) for m in record["metrics"])
    assert all(m["heldout_loss"] is None for m in record["metrics"])  # no validation_split
    assert record["fidelity_model"].startswith("BLIP vision encoder")
    # The chosen epoch is the final file; the txt2img renders cover each strength.
    chosen = record["chosen_epoch"]
    assert (result / "rs.safetensors").read_bytes() == trained_run.epoch_lora(chosen).read_bytes()
    renders = sorted(p.name for p in (trained_run.work / "rs" / "txt2img-images").glob("*.png"))
    assert {name.split("_w")[1].split("_")[0] for name in renders} == {"0.6", "1"} and len(renders) == 2 * 2 * 1
    assert trained_run.summary["select"]["verdict"] == "undertrained"


def test_selection_artifacts_show_the_table_chart_and_contact_sheets(trained_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(
                    any_=["rs-selection", "rs-selection-metrics", "rs-txt2img", "rs-training-progress"]
                )
            )
        )
    by_key = {a.key: a for a in sorted(artifacts, key=lambda a: a.created)}  # the latest of each key
    assert set(by_key) == {"rs-selection", "rs-selection-metrics", "rs-txt2img", "rs-training-progress"}
    assert by_key["rs-training-progress"].data == 100  # the last round's epoch n of n
    report = by_key["rs-selection"].data
    assert report.startswith("# Verdict: undertrained, epoch ")  # the verdict first
    assert "undertrained" in report and "| epoch | training_loss | heldout_loss |" in report and "## Rounds" in report
    # The chart (a PNG) and at least two epochs' grids (JPEG previews: the full images stay on disk).
    assert report.count("data:image/png;base64,") == 1 and report.count("data:image/jpeg;base64,") >= 2
    table = json.loads(by_key["rs-selection-metrics"].data)
    assert [row["epoch"] for row in table] == ["1", "2", "3", "4"] and all(row["fidelity"] != "" for row in table)


def test_a_second_run_is_served_from_the_cache(trained_run):
    from flows.train_subject import train_subject

    again = train_subject(photos=trained_run.photos, token="rs", workdir=trained_run.work, config=trained_run.config)
    assert again["cached"].count("train-epoch") == 4 and again["cached"].count("select") == 2
    assert again["cached"].count("samples") == 2 and "txt2img" in again["cached"]
    assert [r["epochs"] for r in again["select"]["rounds"]] == [[1, 2], [1, 2, 3, 4]]


def test_select_only_on_a_kohya_folder_and_on_our_run(trained_run, tmp_path, capsys):
    from flows.cli import main

    files = {e: trained_run.epoch_lora(e).read_bytes() for e in (1, 2, 3)}
    folder = _kohya_folder(tmp_path, {1: files[1], 2: files[2]}, last=(3, files[3]))
    config = tmp_path / "cfg.json"
    # A person (no face in these photos or renders: no fidelity), the guards off: nothing can judge the epochs.
    guards_off = {"copy_distance": -1, "min_diversity": 0.0, "max_preservation": 100.0, "max_burn": 100.0}
    settings = {"selection": CHEAP_GRID | guards_off, "resolution": 256, "min_bucket_reso": 128, "network_dim": 8}
    settings["sample_prompts"] = "{token}, portrait photo --w 64 --h 64 --s 2"
    config.write_text(json.dumps(settings))
    args = ["--select-only", str(folder), "--token", "mylora", "--base-model", TINY_SD15, "--config", str(config)]
    assert main([*args, str(trained_run.photos)]) == 0
    out = capsys.readouterr().out
    record = json.loads((folder / "selection.json").read_text())
    assert [m["epoch"] for m in record["metrics"]] == [1, 2, 3]
    # No captioned training images beside a kohya folder: the losses are unavailable, and said so.
    assert {"training_loss", "heldout_loss", "fidelity"} <= set(record["unavailable"]) and "training-photo loss" in out
    # ... so a person must look: the verdict says so, and the reasons (printed too) say where.
    sheets = folder / "selection" / "contact-sheets"
    assert record["verdict"] == "needs_review" and record["chosen_epoch"] == 3 and NO_SIGNAL in record["reasons"]
    assert f"needs review: compare the contact sheets in {sheets}" in out
    assert sorted(p.name for p in sheets.iterdir()) == ["base.png", *(f"epoch-{e:06d}.png" for e in (1, 2, 3))]
    report = selection_markdown(
        find_run(folder, "mylora"), metric_spec(CHEAP_GRID_SETTINGS, "mylora", "person", 256), record
    )
    assert report.startswith("# Verdict: needs_review, epoch 3") and "every epoch, to judge by eye" in report
    assert all(f"### Epoch {e}" in report for e in (1, 2, 3))
    assert (folder / "mylora.safetensors").read_bytes() == files[record["chosen_epoch"]]
    assert (folder / "mylora-000003.safetensors").read_bytes() == files[3]
    assert len(list((folder / "txt2img-images").glob("mylora_e*_w*.png"))) == 2 * 2
    # Our own run folder: its exported kohya_ss_config.json names the base model; the grids are on disk already.
    ours = trained_run.work / "rs"
    assert main(["--select-only", str(ours), "--token", "rs"]) == 0
    out = capsys.readouterr().out
    assert "select" in out and "(base, " not in out  # nothing rendered again
    mine = json.loads((ours / "result_current" / "selection.json").read_text())
    assert [m["epoch"] for m in mine["metrics"]] == [1, 2, 3, 4] and mine["metrics"][0]["training_loss"] is not None
    # A folder with no epoch files fails clearly, before loading anything.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--select-only", str(empty), "--token", "x", "--base-model", TINY_SD15]) == 2  # a user error
    assert "no epoch files" in capsys.readouterr().err


def test_renders_without_a_face_report_face_metrics_unavailable(builtin_models_home):
    blank = [Image.new("RGB", (64, 64), (128, 128, 128))] * 2
    assert FaceEmbedder()(blank) == [None, None]


def test_a_missing_run_folder_is_named(tmp_path):
    with pytest.raises(SelectionError, match="no such run folder"):
        find_run(tmp_path / "missing", "x")


def test_samples_and_select_render_on_the_models_training_loaded(
    prefect_harness, builtin_models_home, tmp_path, monkeypatch
):
    """The base model is loaded once in a run: the metric grids, the losses and the strengths render on the
    trainer's own models (no second copy in memory), and every model is freed when the flow ends."""
    import tasks.select
    import tasks.train
    from flows.train_subject import train_subject

    loads: list[str] = []
    for module in (tasks.train, tasks.select):
        real = module.load_base_model

        def counted(spec, *args, _real=real, **kwargs):
            loads.append(spec)
            return _real(spec, *args, **kwargs)

        monkeypatch.setattr(module, "load_base_model", counted)
    selection = CHEAP_GRID_SETTINGS.model_copy(update={"max_resumes": 0})
    config = flow_config(num_repeats=2, max_train_epochs=2, selection=selection)
    photos = captioned_photos(tmp_path, seed=70)
    summary = train_subject(photos=photos, token="one", workdir=tmp_path / "w", config=config)
    assert summary["select"]["chosen_epoch"] in (1, 2) and summary["select"]["txt2img"]
    assert loads == [TINY_SD15]
    assert not tasks.train._TRAINERS and not tasks.select._RENDERERS
