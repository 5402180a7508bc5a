"""Checks made before any work, and errors that name a setting the way its person gave it: a flag on the
command line, a field of the train-subject form (Prefect's UI, a deployment), a key of a batch file."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_core.dataset.blip import CaptionModelError, check_caption_model
from lora_core.families.loading import BaseModelError, check_base_model
from lora_core.foundation.origin import COMMAND_LINE, FORM, Origin
from lora_core.foundation.sources import all_captioned
from lora_core.setup.preflight import preflight
from lora_core.setup.resolve import subject_config
from lora_core.training.precision import DeviceError

OFFLINE_HUB_ID = "someone/not-downloaded-model"
BATCH = Origin.batch("tonight.yaml: subjects[1] (b3n)")


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    """No model downloaded before, and the hub unreachable."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(
    ("origin", "names", "not_said"),
    [
        (COMMAND_LINE, "pass `--base-model DIR`", ("field", "base_model:")),
        (FORM, "set train-subject's base_model field to DIR", ("--base-model", "base_model:")),
        (BATCH, "set `base_model: DIR` in tonight.yaml: subjects[1] (b3n)", ("--base-model", "field")),
    ],
)
def test_an_offline_base_model_is_named_as_its_person_gave_it(empty_cache, origin, names, not_said):
    with pytest.raises(BaseModelError) as caught:
        check_base_model(OFFLINE_HUB_ID, "sd15", origin)
    message = str(caught.value)
    assert names in message and OFFLINE_HUB_ID in message
    assert not any(other in message for other in not_said), message


@pytest.mark.parametrize(
    ("origin", "names"),
    [(COMMAND_LINE, "pass `--base-model MODEL`"), (FORM, "base_model field"), (BATCH, "`base_model: MODEL`")],
)
def test_no_base_model_says_where_to_give_one(origin, names):
    with pytest.raises(BaseModelError, match="no base model") as caught:
        check_base_model(None, "sd15", origin)
    assert names in str(caught.value)
    assert (origin is COMMAND_LINE) == ("--base-model" in str(caught.value))


def test_caption_model_offline_is_refused_naming_the_form_field(empty_cache):
    with pytest.raises(CaptionModelError) as caught:
        check_caption_model("Salesforce/blip-image-captioning-large", FORM)
    message = str(caught.value)
    assert "set train-subject's caption_model field to DIR" in message and "--caption-model" not in message
    assert "hf download Salesforce/blip-image-captioning-large" in message


def test_caption_model_in_the_cache_passes_offline(empty_cache, tmp_path):
    """A model downloaded before is there: the check finds it in the cache, with no hub to ask."""
    repo = tmp_path / "hub" / "models--Salesforce--blip-image-captioning-large"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    check_caption_model("Salesforce/blip-image-captioning-large", FORM)
    with pytest.raises(CaptionModelError):  # and the check is a real one: another id is not there
        check_caption_model("Salesforce/blip-image-captioning-base", FORM)


@pytest.mark.parametrize("spec", ["./no/such/folder", "builtin:tiny-blop", "not a hub id!"])
def test_a_caption_model_that_cannot_be_one_is_refused(spec):
    with pytest.raises(CaptionModelError, match="caption model"):
        check_caption_model(spec, BATCH)


def _photos(folder: Path, captioned: int, bare: int) -> Path:
    folder.mkdir()
    for i in range(captioned + bare):
        (folder / f"p{i}.jpg").write_bytes(b"\xff\xd8 not decoded here")
        if i < captioned:
            (folder / f"p{i}.txt").write_text("t0k3n, a photo")
    return folder


def test_photos_that_all_come_captioned_need_no_caption_model(empty_cache, tmp_path):
    """The recipe's users may caption by hand: offline, with no BLIP, such a run still starts."""
    config = subject_config(base_model="builtin:tiny-sd15")
    blip = config.captioning.model_copy(update={"model": "Salesforce/blip-image-captioning-large"})
    config = config.model_copy(update={"captioning": blip})
    captioned = _photos(tmp_path / "all", captioned=3, bare=0)
    assert all_captioned(captioned)
    preflight(config, "cpu", FORM, photos=captioned)  # no BLIP needed
    with pytest.raises(CaptionModelError):  # one photo without a caption: BLIP is needed, and not there
        preflight(config, "cpu", FORM, photos=_photos(tmp_path / "some", captioned=2, bare=1))
    recaption = config.model_copy(update={"captioning": config.captioning.model_copy(update={"recaption": True})})
    with pytest.raises(CaptionModelError):  # asked to caption again: needed too
        preflight(recaption, "cpu", FORM, photos=captioned)
    preflight(recaption, "cpu", FORM, photos=captioned, captions=False)  # a run that stops before captions


def test_a_bad_device_names_the_setting(tmp_path):
    config = subject_config(base_model="builtin:tiny-sd15")
    with pytest.raises(DeviceError, match=r"^train-subject's device field: device 'gpu0'"):
        preflight(config, "gpu0", FORM, captions=False)
    with pytest.raises(DeviceError, match=r"^--device: "):
        preflight(config, "tpu", COMMAND_LINE, captions=False)


def test_a_hub_id_the_hub_does_not_know_says_check_the_id(monkeypatch, tmp_path):
    """A typo'd id (the hub answers 404) is not "the hub is unreachable"."""
    import huggingface_hub.constants

    import lora_core.families.loading

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(
        lora_core.families.loading, "hub_unreachable", lambda repo: f"https://hf.co answered 404 for {repo}"
    )
    with pytest.raises(BaseModelError) as caught:
        check_base_model("stabilityai/stable-difusion-xl-base-1.0", "sdxl", FORM)
    message = str(caught.value)
    assert message == (
        "base model 'stabilityai/stable-difusion-xl-base-1.0' (train-subject's base_model field): the hub has no "
        "such model (404): check the id"
    )
