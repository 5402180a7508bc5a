"""The seams a kill can fall into (issue 15): between an epoch's samples and its LoRA, in the middle of an
atomic write. The kill-anywhere test finds them by chance; these tests aim at each one."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from PIL import Image

import tasks.train
from lora_core.foundation.fs import atomic_write_text, remove_stale_temps
from lora_core.foundation.layout import SubjectLayout
from lora_core.training.sampling import SamplePrompt, SampleSpec, sample_files, save_samples
from tests.conftest import TINY_BLIP, photo

TOKEN = "t0k3n"


def _grid(spec: SampleSpec, shade: int) -> list[list[Image.Image]]:
    return [[Image.new("RGB", (8, 8), (shade, 0, 0)) for _ in prompt.seeds] for prompt in spec.prompts]


def test_a_rendered_round_replaces_its_earlier_render_and_nothing_else(tmp_path, monkeypatch):
    spec = SampleSpec((SamplePrompt("t0k3n, portrait", seeds=(1,)), SamplePrompt("t0k3n, park", seeds=(2, 3))))
    first = save_samples(tmp_path, TOKEN, spec, _grid(spec, 10), epoch=1)
    others = save_samples(tmp_path, TOKEN, spec, _grid(spec, 20), epoch=2)
    steps = save_samples(tmp_path, TOKEN, spec, _grid(spec, 30), step=1)
    stranger = tmp_path / f"{TOKEN}x_e000001_00_20260101000000_1.png"  # another output name's round 1
    shutil.copy(first[0], stranger)
    assert sample_files(tmp_path, TOKEN, epoch=1) == sorted(first)

    # Rendered again a second later (a run killed after its samples, before its LoRA): one set, the new one.
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20991231235959")
    again = save_samples(tmp_path, TOKEN, spec, _grid(spec, 40), epoch=1)
    assert sample_files(tmp_path, TOKEN, epoch=1) == sorted(again) and len(again) == 3
    assert not any(path.exists() for path in first)
    assert all(Image.open(path).getpixel((0, 0)) == (40, 0, 0) for path in again)
    assert all(path.exists() for path in [*others, *steps, stranger])


def test_stale_temp_files_go_and_nothing_else(tmp_path):
    subject = tmp_path / TOKEN
    atomic_write_text(subject / "result_current" / "kept.json", "{}")
    stale = [
        subject / "result_current" / ".t0k3n-000002.safetensors.ab_cd123.tmp",
        subject / "training_images" / "2_t0k3n" / ".0001.txt.q0w9e8r7.tmp",
    ]
    kept = [
        subject / "result_current" / "notes.tmp",  # the user's
        subject / "result_current" / ".short.abc.tmp",  # not a name atomic_output makes
        subject / "result_current" / "t0k3n-000001.safetensors",
    ]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / ".x.json.abcdefgh.tmp").write_text("x")
    (subject / "linked").symlink_to(outside)  # a link out of the subject folder is never followed
    (subject / ".y.json.abcdefgh.tmp").symlink_to(outside / ".x.json.abcdefgh.tmp")

    assert sorted(remove_stale_temps(subject)) == sorted(stale)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept) and (subject / "result_current" / "kept.json").exists()
    assert (outside / ".x.json.abcdefgh.tmp").exists() and (subject / ".y.json.abcdefgh.tmp").is_symlink()


@pytest.fixture
def two_epochs(tmp_path) -> list[str]:
    """The command line's arguments for two epochs with samples at each, on the tiny models."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(5):
        photo((256, 320), 40 + i).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(f"a man, photo {i}")
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "resolution": 256,
                "min_bucket_reso": 128,
                "max_bucket_reso": 512,
                "num_repeats": 1,
                "epoch": 2,
                "network_dim": 4,
                "network_alpha": 2,
                "sample_every_n_epochs": 1,
                "sample_prompts": "{token}, portrait photo --w 64 --h 64 --s 2 --d 7",
            }
        )
    )
    work, models = str(tmp_path / "work"), ["--base-model", "builtin:tiny-sd15", "--caption-model", TINY_BLIP]
    return [str(photos), "--token", TOKEN, "--workdir", work, "--config", str(config), *models, "--stop-after", "train"]


def test_an_epoch_is_saved_only_with_its_samples_and_a_kept_epoch_lists_them(
    prefect_harness, two_epochs, tmp_path, capsys, monkeypatch
):
    from flows.cli import main

    layout = SubjectLayout(tmp_path / "work", TOKEN)
    at_save = []  # (epoch, its sample files when it was saved)
    save_epoch = tasks.train.save_epoch

    def watched(trainer, *args, **kwargs):
        at_save.append((trainer.epoch, sample_files(layout.samples, TOKEN, epoch=trainer.epoch)))
        return save_epoch(trainer, *args, **kwargs)

    monkeypatch.setattr(tasks.train, "save_epoch", watched)
    assert main(two_epochs) == 0, capsys.readouterr().err
    assert [(epoch, len(found)) for epoch, found in at_save] == [(1, 1), (2, 1)], at_save
    first = {epoch: sample_files(layout.samples, TOKEN, epoch=epoch) for epoch in (1, 2)}

    # Killed after both epochs were saved, before Prefect kept its results: the epochs are finished on disk
    # and kept, with the samples they were saved with; a killed write's temp file is cleared away.
    shutil.rmtree(layout.prefect_results)
    stale = layout.result_current / f".{TOKEN}-000003.safetensors.k1ll3d00.tmp"
    stale.write_bytes(os.urandom(64))
    capsys.readouterr()
    assert main(two_epochs) == 0
    out = capsys.readouterr().out
    assert len(at_save) == 2  # neither epoch was trained again
    assert f"train: 2 sample image(s) in {layout.samples}" in out, out
    assert {epoch: sample_files(layout.samples, TOKEN, epoch=epoch) for epoch in (1, 2)} == first
    assert not stale.exists()
