"""BLIP captions beside every training image, starting with the trigger token.

The recipe runs kohya_ss's BLIP tool with a prefix of "<token>, ", 9 beams and a
minimum length of 15, then fixes what BLIP invents. Here:

- BLIP (`lora_core.dataset.blip`) continues a prompt ("a picture of ", as kohya's
  BLIP does) and the prompt is removed.
- Phrases BLIP likes to invent are stripped, and each removal is reported
  (the text rules are `lora_core.dataset.caption_text`).
- A caption that came with a photo wins over BLIP, unless `recaption`.
- The prefix appears exactly once, at the start.
- BLIP's output is cached per image content, model and settings, so adding a
  photo captions only that photo; a caption file the user edited is kept.

`captions.csv` records what was written and why; a caption file whose text
differs from its record was edited by hand and is never overwritten, not even
by `recaption` (delete the file to get BLIP's words back). A stamp of the
settings beside it lets the flow tell a current set of captions from one made
with other settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import pandera.pandas as pa
from PIL import Image
from pydantic import BaseModel
from rich.progress import Progress

from lora_core.config.settings import CaptionSettings
from lora_core.dataset.blip import BlipCaptioner
from lora_core.dataset.caption_text import read_caption, strip_phrases, with_prefix
from lora_core.dataset.manifest import accepted_images
from lora_core.foundation.errors import DAMAGED_FILE_ERRORS
from lora_core.foundation.fs import (
    JsonCache,
    atomic_output,
    atomic_write_text,
    ensure_inside,
    sha256_file,
    stamp_matches,
)
from lora_core.foundation.layout import SubjectLayout

__all__ = [
    "CAPTIONS_COLUMNS",
    "CaptionRecord",
    "CaptionResult",
    "caption_subject",
    "captions_intact",
    "read_captions",
]

Source = Literal["blip", "user", "edited"]


# --- Records --------------------------------------------------------------------

CAPTIONS_COLUMNS = ["image", "image_sha256", "source", "caption", "blip_caption", "removed"]

CAPTIONS_SCHEMA = pa.DataFrameSchema(
    {
        "image": pa.Column(str, pa.Check.str_length(min_value=1), unique=True),
        "image_sha256": pa.Column(str, pa.Check.str_matches(r"^[0-9a-f]{64}$")),
        "source": pa.Column(str, pa.Check.isin(["blip", "user", "edited"])),
        "caption": pa.Column(str),
        "blip_caption": pa.Column(str),
        "removed": pa.Column(str),
    },
    strict=True,
    ordered=True,
    coerce=True,
)


@dataclass(frozen=True)
class CaptionRecord:
    """One row of `captions.csv`: the caption file's text and where it came from."""

    image: str
    image_sha256: str
    source: Source
    caption: str
    blip_caption: str = ""  # BLIP's words before stripping and prefix; empty when BLIP was not asked
    removed: str = ""  # phrases stripped from BLIP's words, "; "-separated


def read_captions(path: Path) -> list[CaptionRecord]:
    frame = CAPTIONS_SCHEMA.validate(pd.read_csv(path, dtype=str, keep_default_na=False))
    return [CaptionRecord(**row) for row in frame.to_dict(orient="records")]


def _write_captions(path: Path, records: list[CaptionRecord]) -> None:
    frame = CAPTIONS_SCHEMA.validate(pd.DataFrame([asdict(r) for r in records], columns=CAPTIONS_COLUMNS))
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False)


class CaptionResult(BaseModel):
    """What the captions stage wrote; `records` feeds the review artifact."""

    captions_csv: Path
    generated: int  # images BLIP ran on in this run
    by_source: dict[str, int]
    records: list[dict]


# --- The stage ------------------------------------------------------------------


def caption_subject(
    layout: SubjectLayout,
    settings: CaptionSettings,
    *,
    caption_extension: str = ".txt",
    captioner: BlipCaptioner | None = None,
    show_progress: bool = True,
) -> CaptionResult:
    """Write a caption file beside every accepted image of `layout`'s manifest, and `captions.csv`."""
    token = layout.token
    captioner = captioner or BlipCaptioner(settings.model)
    cache = _BlipCache(layout.caption_cache, captioner.identity, settings)
    previous = {r.image_sha256: r for r in read_captions(layout.captions_csv)} if layout.captions_csv.is_file() else {}

    def blip_text(raw: str) -> tuple[str, list[str]]:
        body, removed = strip_phrases(raw, settings.strip_phrases)
        return with_prefix(body, token, settings.prefix, settings.postfix), removed

    def source_of(user_caption: str, sha: str, on_disk: str | None) -> Source:
        wanted: Source = "blip" if settings.recaption or not user_caption else "user"
        if on_disk is None:
            return wanted
        if sha in previous:  # we wrote this file: kept unless it changed since
            last = previous[sha]
            return "edited" if last.caption != on_disk or last.source == "edited" else wanted
        # A caption file with no record (a run cut short, or the user's own): ours only if we could have written it.
        ours = {with_prefix(user_caption, token, settings.prefix)} if user_caption else set()
        if (raw := cache.get(sha)) is not None:
            ours.add(blip_text(raw)[0])
        return wanted if on_disk in ours else "edited"

    plans = []
    for item in accepted_images(layout.manifest):
        path = ensure_inside(layout.root, layout.root / item.image)
        caption_path = path.with_suffix(caption_extension)
        on_disk, utf8 = read_caption(caption_path) if caption_path.is_file() else (None, True)
        sha = sha256_file(path)
        plans.append((item, sha, caption_path, on_disk, utf8, source_of(item.user_caption, sha, on_disk)))

    wanted = {sha: item.image for item, sha, _, _, _, source in plans if source == "blip"}
    blip, generated = cache.fill(wanted, layout.root, captioner, show_progress)

    records: list[CaptionRecord] = []
    for item, sha, caption_path, on_disk, utf8, source in plans:
        if source == "edited":
            record = CaptionRecord(item.image, sha, source, on_disk or "")
        elif source == "user":
            record = CaptionRecord(item.image, sha, source, with_prefix(item.user_caption, token, settings.prefix))
        else:
            text, removed = blip_text(blip[sha])
            record = CaptionRecord(item.image, sha, source, text, blip[sha], "; ".join(removed))
        if record.caption != on_disk or not utf8:
            atomic_write_text(caption_path, record.caption + "\n")
        records.append(record)
    _write_captions(layout.captions_csv, records)
    atomic_write_text(layout.captions_settings, settings_stamp(settings, captioner.identity, caption_extension))
    return CaptionResult(
        captions_csv=layout.captions_csv,
        generated=generated,
        by_source={s: sum(r.source == s for r in records) for s in ("blip", "user", "edited")},
        records=[asdict(r) for r in records],
    )


def settings_stamp(settings: CaptionSettings, identity: str, caption_extension: str) -> str:
    """What the caption files depend on besides the images: compared by `captions_intact`."""
    payload = json.dumps([settings.model_dump(mode="json"), identity, caption_extension], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def captions_intact(
    layout: SubjectLayout, caption_extension: str = ".txt", settings: CaptionSettings | None = None
) -> bool:
    """True when `captions.csv` lists exactly the accepted images and every caption file still says so.

    A cached captions stage is only trusted when this holds; an edited, missing
    or renumbered caption file makes the stage run again (and keep the edit),
    and so do `settings` other than those of the run that wrote the captions.
    """
    if settings is not None:
        identity = BlipCaptioner(settings.model).identity
        stamp = layout.captions_settings
        if not stamp_matches(stamp, settings_stamp(settings, identity, caption_extension)):
            return False
    try:
        records = {r.image: r.caption for r in read_captions(layout.captions_csv)}
        images = {item.image for item in accepted_images(layout.manifest)}
    except DAMAGED_FILE_ERRORS:
        return False
    if set(records) != images:
        return False
    for image, caption in records.items():
        path = (layout.root / image).with_suffix(caption_extension)
        if not path.is_file() or read_caption(path) != (caption, True):
            return False
    return True


class _BlipCache:
    """BLIP's words per image content, model and generation settings: one small JSON file each.

    One file per image means a run cut short keeps every caption it made.
    """

    def __init__(self, folder: Path, identity: str, settings: CaptionSettings) -> None:
        self.folder, self.identity, self.settings = folder, identity, settings
        knobs = settings.model_dump(include={"prompt", "beam_search", "num_beams", "top_p", "min_length", "max_length"})
        self._entries = JsonCache(folder, json.dumps({"model": identity, **knobs}, sort_keys=True))

    def get(self, sha: str) -> str | None:
        entry = self._entries.get(sha)
        text = entry.get("blip_caption") if isinstance(entry, dict) else None
        return text if isinstance(text, str) else None  # missing or damaged: captioned again

    def fill(
        self, wanted: dict[str, str], root: Path, captioner: BlipCaptioner, show_progress: bool
    ) -> tuple[dict[str, str], int]:
        """BLIP's words for each `{sha: image}`: cached, else generated in batches and cached at once."""
        out = {sha: text for sha in wanted if (text := self.get(sha)) is not None}
        todo = [(sha, image) for sha, image in wanted.items() if sha not in out]
        size = self.settings.batch_size
        with Progress(disable=not show_progress or not todo, transient=True) as progress:
            bar = progress.add_task(f"captions: BLIP on {len(todo)} image(s)", total=len(todo))
            for start in range(0, len(todo), size):
                batch = todo[start : start + size]
                pictures = []
                for _, image in batch:
                    with Image.open(root / image) as picture:
                        pictures.append(picture.convert("RGB"))
                for (sha, _), text in zip(batch, captioner.caption(pictures, self.settings), strict=True):
                    self._entries.put(sha, {"blip_caption": text, "model": self.identity})
                    out[sha] = text
                progress.advance(bar, len(batch))
        return out, len(todo)
