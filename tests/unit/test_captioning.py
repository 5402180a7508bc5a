"""Captioning: the text rules, the real BLIP generate path on a tiny model, the per-image cache."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_core.config.settings import DEFAULT_STRIP_PHRASES, CaptionSettings
from lora_core.dataset.blip import BlipCaptioner, CaptionModelError
from lora_core.dataset.caption_text import strip_phrases, with_prefix
from lora_core.dataset.captioning import caption_subject, captions_intact, read_captions
from lora_core.dataset.ingest import ingest
from lora_core.foundation.layout import SubjectLayout
from lora_core.foundation.tiny_models import materialize
from tests.conftest import TINY_BLIP, photo

TOKEN = "t0k3n"
PREFIX = f"{TOKEN}, "


# --- Phrase filter -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected", "removed"),
    [
        ("a man in a suit holding a remote control", "a man in a suit", ["holding a remote control"]),
        ("a man With a Microphone in the hand and a tie", "a man and a tie", ["With a Microphone in the hand"]),
        ("arafed man in a suit", "man in a suit", ["arafed"]),
        ("an arafed man smiling", "a man smiling", ["arafed"]),
        ("a woman smiling and holding a microphone", "a woman smiling", ["holding a microphone"]),
        ("a man holding a remote control, standing", "a man, standing", ["holding a remote control"]),
        ("a man in a suit", "a man in a suit", []),
        ("a man holding a remotely controlled car", "a man holding a remotely controlled car", []),  # whole words
    ],
)
def test_default_phrases_are_stripped_and_reported(raw, expected, removed):
    assert strip_phrases(raw, DEFAULT_STRIP_PHRASES) == (expected, removed)


def test_longest_phrase_wins():
    text, removed = strip_phrases("a man holding a remote control", ["holding a remote", "holding a remote control"])
    assert text == "a man" and removed == ["holding a remote control"]


def test_a_removal_that_joins_another_phrase_removes_that_too():
    text, removed = strip_phrases("a man holding a arafed remote", ["holding a remote", "arafed"])
    assert text == "a man" and sorted(removed) == ["arafed", "holding a remote"]


_WORDS = st.sampled_from(["a", "man", "holding", "remote", "control", "with", "microphone", "in", "the", "hand", "and"])


@given(st.lists(_WORDS, max_size=25))
def test_no_phrase_survives_the_filter(words):
    phrases = ["holding a remote control", "with a microphone in the hand", "man and"]
    text, removed = strip_phrases(" ".join(words), phrases)
    for phrase in phrases:
        assert not re.search(rf"(?<![\w-]){phrase}(?![\w-])", text, re.I)
    present = any(re.search(rf"(?<![\w-]){p}(?![\w-])", " ".join(words), re.I) for p in phrases)
    assert bool(removed) == present


# --- Prefix rule -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["a man in a suit", "t0k3n, a man in a suit", "T0K3N a man", "t0k3n, t0k3n, a man", "  a  man \n in a suit "],
)
def test_prefix_appears_exactly_once(text):
    caption = with_prefix(text, TOKEN)
    assert caption.startswith(PREFIX)
    assert not caption[len(PREFIX) :].lower().startswith(TOKEN)
    assert "\n" not in caption and "  " not in caption


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60))
def test_prefix_rule_holds_for_any_text(text):
    caption = with_prefix(text, TOKEN)
    assert caption == PREFIX.strip(" ,") or caption.startswith(PREFIX)
    assert not caption[len(PREFIX) :].lower().startswith(TOKEN + ",")
    assert with_prefix(caption, TOKEN) == caption  # idempotent: a second pass adds nothing


@pytest.mark.parametrize(
    ("text", "prefix", "expected"),
    [
        ("t0k3nish man", "{token}, ", "t0k3n, t0k3nish man"),  # inside a word: not the token
        ("t0k3n's dog", "{token}, ", "t0k3n, t0k3n's dog"),  # no separator after it: not the prefix
        ("t0k3n standing in a park", "", "t0k3n standing in a park"),  # no prefix: nothing to strip
        ("photo of t0k3n, a man", "{token}, ", "t0k3n, photo of t0k3n, a man"),  # the token inside stays
    ],
)
def test_what_is_not_taken_for_the_prefix(text, prefix, expected):
    assert with_prefix(text, TOKEN, prefix) == expected


def test_custom_prefix_and_postfix():
    caption = with_prefix("a man", TOKEN, "photo of {token}, ", ", high quality")
    assert caption == "photo of t0k3n, a man, high quality"
    assert with_prefix(caption, TOKEN, "photo of {token}, ", ", high quality") == caption


def test_prefix_template_with_unknown_field_is_refused():
    with pytest.raises(ValueError, match="only \\{token\\}"):
        CaptionSettings(prefix="{name}, ")


# --- The model ------------------------------------------------------------------------


def test_tiny_blip_runs_the_real_generate_path(blip_captioner, count_blip):
    settings = CaptionSettings(model=TINY_BLIP)
    pictures = [photo((400, 300), seed) for seed in range(3)]
    batch = blip_captioner.caption(pictures, settings)
    assert count_blip == [3]
    assert len(batch) == 3 and all(text and not text.startswith("a picture of") for text in batch)
    assert len(set(batch)) > 1  # different images, different words
    assert blip_captioner.caption(pictures[:1], settings) == batch[:1]  # batching does not change a caption
    tokenizer = blip_captioner.load()[0].tokenizer
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) >= 15 - 4 for t in batch)  # min_length


def test_a_local_model_folder_loads_and_its_identity_tracks_its_files(builtin_models_home, tmp_path):
    import shutil

    folder = shutil.copytree(materialize(TINY_BLIP), tmp_path / "my-blip")
    captioner = BlipCaptioner(str(folder), device="cpu")
    before = captioner.identity
    assert captioner.caption([photo((300, 300), 1)], CaptionSettings(model=str(folder)))
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")
    assert BlipCaptioner(str(folder)).identity != before


@pytest.mark.parametrize("kind", ["missing", "file", "no-config"])
def test_a_bad_local_model_path_is_named(tmp_path, kind):
    path = tmp_path / "blip"
    if kind == "file":
        path.write_bytes(b"not a model")
    elif kind == "no-config":
        path.mkdir()
    spec = str(path)
    with pytest.raises(CaptionModelError, match=re.escape(spec)):
        BlipCaptioner(spec).load()


@pytest.mark.parametrize("offline", [True, False])
def test_unreachable_hub_fails_fast_and_says_how_to_use_a_local_copy(monkeypatch, tmp_path, offline):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # online mode, but the hub is a closed port: one quick probe, no retries
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # belt and braces: never download
    start = time.monotonic()
    with pytest.raises(CaptionModelError) as caught:
        BlipCaptioner("Salesforce/blip-image-captioning-large").load()
    assert time.monotonic() - start < 20
    message = str(caught.value)
    assert "--caption-model DIR" in message and "hf download Salesforce/blip-image-captioning-large" in message


def test_a_repo_the_hub_does_not_serve_is_a_model_error(monkeypatch, tmp_path):
    """The hub answers (say 401 for a typo'd id) but gives no model: a clear error, not an OSError retried."""
    import huggingface_hub.constants

    import lora_core.dataset.blip

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(lora_core.dataset.blip, "hub_unreachable", lambda repo: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the download itself fails here
    with pytest.raises(CaptionModelError, match="cannot download it"):
        BlipCaptioner("Salesforce/blip-image-captioning-typo").load()


# --- The stage ------------------------------------------------------------------------


@pytest.fixture
def subject(tmp_path, make_photo) -> SubjectLayout:
    """Six ingested photos; the first came with a caption file."""
    folder = tmp_path / "photos"
    for i in range(6):
        make_photo(folder / f"img{i}.jpg", size=(500 + 40 * i, 600), seed=300 + i)
    (folder / "img0.txt").write_text("a man with a hat\nsmiling\n")
    layout = SubjectLayout(tmp_path / "work", TOKEN)
    ingest(folder, layout, show_progress=False)
    return layout


def _caption(layout, captioner, **settings) -> object:
    return caption_subject(
        layout, CaptionSettings(model=TINY_BLIP, **settings), captioner=captioner, show_progress=False
    )


def _files(layout: SubjectLayout) -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(layout.training_images.glob("*/*.txt"))}


def test_every_image_gets_a_prefixed_caption_and_a_user_caption_wins(subject, blip_captioner, count_blip):
    result = _caption(subject, blip_captioner)
    files = _files(subject)
    assert sorted(files) == [f"{i:04d}" for i in range(1, 7)]
    for text in files.values():
        assert text.startswith(PREFIX) and not text[len(PREFIX) :].startswith(TOKEN) and text.endswith("\n")
    assert files["0001"] == "t0k3n, a man with a hat smiling\n"  # the user's caption, on one line
    assert result.by_source == {"blip": 5, "user": 1, "edited": 0}
    assert sum(count_blip) == 5 and max(count_blip) <= 4  # the user's image is not captioned; batches of 4
    records = read_captions(subject.captions_csv)
    assert [r.source for r in records] == ["user"] + ["blip"] * 5
    assert all(r.blip_caption for r in records[1:]) and captions_intact(subject)


def test_recaption_replaces_the_user_caption_but_never_an_edit(subject, blip_captioner):
    _caption(subject, blip_captioner)
    edited = next(subject.training_images.glob("*/0004.txt"))
    edited.write_text("t0k3n, my words\n")
    result = _caption(subject, blip_captioner, recaption=True)
    assert result.by_source == {"blip": 5, "user": 0, "edited": 1}
    assert "a man with a hat" not in _files(subject)["0001"]
    assert edited.read_text() == "t0k3n, my words\n"
    # And back: without recaption the user's caption returns.
    _caption(subject, blip_captioner)
    assert _files(subject)["0001"] == "t0k3n, a man with a hat smiling\n"


def test_a_caption_edited_in_another_encoding_is_kept_and_made_utf8(subject, blip_captioner):
    _caption(subject, blip_captioner)
    edited = next(subject.training_images.glob("*/0002.txt"))
    edited.write_bytes("t0k3n, un café à Paris\r\n".encode("cp1252"))
    assert not captions_intact(subject)
    result = _caption(subject, blip_captioner)
    assert result.by_source["edited"] == 1
    assert edited.read_bytes() == "t0k3n, un café à Paris\n".encode()
    assert captions_intact(subject)


def test_captions_made_with_other_settings_are_not_intact(subject, blip_captioner):
    settings = CaptionSettings(model=TINY_BLIP)
    caption_subject(subject, settings, captioner=blip_captioner, show_progress=False)
    assert captions_intact(subject, ".txt", settings)
    assert not captions_intact(subject, ".txt", settings.model_copy(update={"recaption": True}))
    assert not captions_intact(subject, ".txt", settings.model_copy(update={"num_beams": 2}))


@pytest.mark.parametrize("extension", [".png", ".JPG", ".safetensors"])
def test_a_caption_extension_that_names_an_image_is_refused(extension):
    from lora_core.config.lora_config import LoraConfig

    with pytest.raises(ValueError, match=r"captions use \.txt"):
        LoraConfig(caption_extension=extension)


def test_cache_captions_each_image_once(subject, blip_captioner, count_blip, make_photo, tmp_path):
    _caption(subject, blip_captioner)
    assert sum(count_blip) == 5
    count_blip.clear()
    again = _caption(subject, blip_captioner)
    assert count_blip == [] and again.generated == 0  # nothing new: BLIP is not even called
    # Settings that change BLIP's words invalidate the cache; a prefix change does not.
    _caption(subject, blip_captioner, prefix="photo of {token}, ")
    assert count_blip == []
    assert all(t.startswith("photo of t0k3n, ") for t in _files(subject).values())
    _caption(subject, blip_captioner, num_beams=3)
    assert sum(count_blip) == 5


def test_adding_a_photo_captions_only_that_photo(subject, blip_captioner, count_blip, make_photo, tmp_path):
    _caption(subject, blip_captioner)
    before = _files(subject)
    count_blip.clear()
    make_photo(tmp_path / "photos" / "img9.jpg", size=(640, 640), seed=999)
    ingest(tmp_path / "photos", subject, show_progress=False)
    _caption(subject, blip_captioner)
    assert sum(count_blip) == 1
    after = _files(subject)
    assert len(after) == 7 and set(before.values()) <= set(after.values())


def test_an_edited_caption_is_kept_even_when_photos_are_renumbered(
    subject, blip_captioner, count_blip, make_photo, tmp_path
):
    _caption(subject, blip_captioner)
    edited = next(subject.training_images.glob("*/0003.txt"))
    edited.write_text("t0k3n, a man in a grey suit, hand-written\n")
    assert not captions_intact(subject)
    result = _caption(subject, blip_captioner)
    assert result.by_source["edited"] == 1 and captions_intact(subject)
    assert edited.read_text() == "t0k3n, a man in a grey suit, hand-written\n"
    # A photo sorting first renumbers every image: the edit must follow its photo.
    make_photo(tmp_path / "photos" / "a-first.jpg", size=(640, 640), seed=4242)
    ingest(tmp_path / "photos", subject, show_progress=False)
    _caption(subject, blip_captioner)
    assert _files(subject)["0004"] == "t0k3n, a man in a grey suit, hand-written\n"
    assert sum(r.source == "edited" for r in read_captions(subject.captions_csv)) == 1
    # Still kept on a later run with nothing changed.
    _caption(subject, blip_captioner)
    assert _files(subject)["0004"] == "t0k3n, a man in a grey suit, hand-written\n"


def test_a_caption_file_from_a_run_cut_short_is_recognised_as_ours(subject, blip_captioner):
    _caption(subject, blip_captioner)
    subject.captions_csv.unlink()  # as if the run died before writing its record
    result = _caption(subject, blip_captioner)
    assert result.by_source == {"blip": 5, "user": 1, "edited": 0}


def test_a_damaged_cache_entry_is_redone(subject, blip_captioner, count_blip):
    _caption(subject, blip_captioner)
    for entry in list(subject.caption_cache.glob("*.json"))[:2]:
        entry.write_text("{not json")
    for caption in subject.training_images.glob("*/*.txt"):
        caption.unlink()
    count_blip.clear()
    _caption(subject, blip_captioner)
    assert sum(count_blip) == 2 and len(_files(subject)) == 6


def test_phrases_removed_are_recorded_per_caption(subject, blip_captioner):
    settings = CaptionSettings(model=TINY_BLIP)
    _caption(subject, blip_captioner)
    # Strip a word the tiny model is sure to use, so the report has something to say.
    words = [w for r in read_captions(subject.captions_csv)[1:] for w in r.blip_caption.split()]
    common = max(set(words), key=words.count)
    _caption(subject, blip_captioner, strip_phrases=[*settings.strip_phrases, common])
    records = read_captions(subject.captions_csv)
    hit = [r for r in records if r.source == "blip" and re.search(rf"\b{common}\b", r.blip_caption)]
    assert hit and all(common in r.removed.split("; ") for r in hit)
    assert all(not re.search(rf"\b{common}\b", r.caption) for r in hit)


def test_caption_files_use_the_configured_extension(subject, blip_captioner):
    caption_subject(
        subject,
        CaptionSettings(model=TINY_BLIP),
        caption_extension=".caption",
        captioner=blip_captioner,
        show_progress=False,
    )
    assert len(list(subject.training_images.glob("*/*.caption"))) == 6
    assert not list(subject.training_images.glob("*/*.txt"))
    assert captions_intact(subject, ".caption") and not captions_intact(subject, ".txt")


def test_builtin_model_is_built_once(builtin_models_home):
    first = materialize(TINY_BLIP)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert materialize(TINY_BLIP) == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="builtin:tiny-blip"):
        materialize("builtin:tiny-nothing")
