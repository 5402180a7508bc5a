"""Ingest: every rejection reason, every mode, EXIF, zips, symlinks, bombs, layout and manifest."""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lora_core.foundation.sources
from lora_core.config.settings import IngestSettings
from lora_core.dataset.decoding import decode_image, to_rgb8
from lora_core.dataset.ingest import InputError, TooFewImagesError, ingest, layout_intact
from lora_core.dataset.manifest import ALL_COLUMNS, read_manifest
from lora_core.foundation.layout import InvalidTokenError, SubjectLayout
from lora_core.foundation.sources import fingerprint_input
from tests.conftest import encode, photo


def run(photos: Path, workdir: Path, token: str = "t0k3n", **kwargs):
    return ingest(photos, SubjectLayout(workdir, token), show_progress=False, **kwargs)


def row_of(result, source: str) -> dict:
    matches = [r for r in result.rows if r["source"] == source]
    assert len(matches) == 1, f"{source} has {len(matches)} rows"
    return matches[0]


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims width x height (CRC fixed)."""
    data = encode(Image.new("RGB", (1, 1)), "PNG")
    ihdr = bytearray(data[8:33])
    ihdr[8:12], ihdr[12:16] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    ihdr[21:25] = zlib.crc32(bytes(ihdr[4:21])).to_bytes(4, "big")
    return data[:8] + bytes(ihdr) + data[33:]


REJECTIONS = {
    "empty.jpg": (lambda f: (f / "empty.jpg").write_bytes(b""), "empty file"),
    "garbage.jpg": (lambda f: (f / "garbage.jpg").write_bytes(os.urandom(5000)), "not an image"),
    "truncated.jpg": (
        lambda f: (f / "truncated.jpg").write_bytes(encode(photo((800, 600), 7))[:6000]),
        "truncated or corrupt",
    ),
    "notes.txt": (lambda f: (f / "notes.txt").write_text("shopping list"), "not an image"),
    "small.jpg": (
        lambda f: (f / "small.jpg").write_bytes(encode(photo((300, 200), 8))),
        "too small: 300x200, short side under 256 px",
    ),
    "zz-copy.jpg": (
        lambda f: (f / "zz-copy.jpg").write_bytes((f / "img0.jpg").read_bytes()),
        "exact duplicate of img0.jpg",
    ),
    "img0-resized.jpg": (
        lambda f: (f / "img0-resized.jpg").write_bytes(
            encode(Image.open(f / "img0.jpg").resize((480, 360), Image.Resampling.LANCZOS), quality=80)
        ),
        "near-duplicate of img0.jpg",
    ),
    "img0-reencoded.webp": (
        lambda f: (f / "img0-reencoded.webp").write_bytes(encode(Image.open(f / "img0.jpg"), "WEBP", quality=60)),
        "near-duplicate of img0.jpg",
    ),
    "bomb.png": (lambda f: (f / "bomb.png").write_bytes(png_declaring(12000, 9000)), "decompression bomb guard"),
    "huge-bomb.png": (lambda f: (f / "huge-bomb.png").write_bytes(png_declaring(40000, 40000)), "decompression bomb"),
}


@pytest.mark.parametrize("name", sorted(REJECTIONS))
def test_each_rejection_reason(tmp_path, good_folder, name):
    write, reason = REJECTIONS[name]
    write(good_folder)
    result = run(good_folder, tmp_path / "work")
    row = row_of(result, name)
    assert row["status"] == "rejected"
    assert reason in row["reason"]
    assert result.accepted == 6  # the run went on with the good photos


def test_same_pixels_in_other_bytes_is_a_duplicate_and_the_larger_file_wins(tmp_path, make_photo):
    folder = tmp_path / "photos"
    for i in range(5):
        make_photo(folder / f"p{i}.jpg", seed=i)
    image = photo((600, 400), 99)
    (folder / "a.png").write_bytes(encode(image, "PNG", compress_level=1))
    (folder / "b.png").write_bytes(encode(image, "PNG", compress_level=9))
    # a downscaled copy sorts first by name but loses to the original
    (folder / "0-small.jpg").write_bytes(encode(image.resize((450, 300)), quality=95))
    result = run(folder, tmp_path / "work")
    assert row_of(result, "a.png")["status"] == "accepted"
    assert row_of(result, "b.png")["reason"] == "same pixels as a.png"
    assert row_of(result, "0-small.jpg")["reason"].startswith("near-duplicate of a.png")


def test_distinct_photos_are_not_near_duplicates(tmp_path, make_photo):
    folder = tmp_path / "photos"
    for i in range(20):
        make_photo(folder / f"p{i:02d}.jpg", seed=1000 + i)
    assert run(folder, tmp_path / "work").accepted == 20


def test_bomb_is_refused_before_decoding(monkeypatch):
    bomb = png_declaring(12000, 9000)

    def no_decode(self):
        raise AssertionError("pixels of a bomb were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    from lora_core.dataset.decoding import RejectedImage

    with pytest.raises(RejectedImage, match=r"12000x9000 \(108 MP\), over the 100 MP limit"):
        decode_image(bomb, IngestSettings())


def _alpha_image(mode: str) -> Image.Image:
    rgba = photo((300, 300), 3).convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, 100, 100))  # transparent top-left corner
    rgba.putalpha(alpha)
    return rgba.convert(mode) if mode != "RGBA" else rgba


def _palette_transparent() -> Image.Image:
    image = photo((300, 300), 4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.paste(15, (0, 0, 100, 100))
    image.info["transparency"] = 15
    return image


MODES = {
    "RGBA": lambda: encode(_alpha_image("RGBA"), "PNG"),
    "LA": lambda: encode(_alpha_image("LA"), "PNG"),
    "P+transparency": lambda: encode(_palette_transparent(), "PNG", transparency=15),
    "P": lambda: encode(photo((300, 300), 5).convert("P"), "GIF"),
    "CMYK": lambda: encode(photo((300, 300), 6).convert("CMYK"), "JPEG"),
    "L": lambda: encode(photo((300, 300), 7).convert("L"), "PNG"),
    "1": lambda: encode(photo((300, 300), 8).convert("1"), "BMP"),
    "I;16": lambda: encode(Image.fromarray(np.full((300, 300), 32768, dtype=np.uint16)), "PNG"),
    "F": lambda: encode(Image.fromarray(np.full((300, 300), 0.5, dtype=np.float32)), "TIFF"),
    "YCbCr-TIFF": lambda: encode(photo((300, 300), 9), "TIFF", compression="jpeg"),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_becomes_8bit_rgb(mode):
    decoded = decode_image(MODES[mode](), IngestSettings())
    assert decoded.image.mode == "RGB"
    pixels = np.asarray(decoded.image)
    assert pixels.dtype == np.uint8 and pixels.shape == (300, 300, 3)
    if mode in ("RGBA", "LA", "P+transparency"):
        assert (pixels[:100, :100] == 255).all(), "transparency is flattened onto white"
        assert not (pixels[150:, 150:] == 255).all()
    if mode == "I;16":
        assert abs(int(pixels.mean()) - 128) <= 1, "16-bit is scaled, not clipped"
    if mode == "F":
        assert abs(int(pixels.mean()) - 128) <= 1


def test_to_rgb8_keeps_plain_rgb_untouched():
    image = photo((64, 64), 1)
    assert np.array_equal(np.asarray(to_rgb8(image)), np.asarray(image))


def test_exif_orientation_is_applied(tmp_path, good_folder):
    stored = photo((640, 480), 11)
    stored.paste((255, 0, 0), (0, 0, 40, 40))  # red marker top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90 degrees clockwise
    (good_folder / "rotated.jpg").write_bytes(encode(stored, quality=95, exif=exif.tobytes()))
    result = run(good_folder, tmp_path / "work")
    row = row_of(result, "rotated.jpg")
    assert row["exif_rotated"] is True and (row["width"], row["height"]) == (480, 640)
    written = np.asarray(Image.open(result.subject_dir / row["image"]))
    assert written[5:30, -30:-5, 0].mean() > 200 and written[5:30, -30:-5, 1].mean() < 60  # marker now top-right


def test_large_images_are_downscaled_not_rejected(tmp_path, good_folder):
    (good_folder / "big.jpg").write_bytes(encode(photo((3000, 2000), 12)))
    row = row_of(run(good_folder, tmp_path / "work"), "big.jpg")
    assert row["status"] == "accepted" and row["resized"] is True
    assert (row["width"], row["height"], row["source_width"], row["source_height"]) == (2048, 1365, 3000, 2000)


def test_special_files_are_never_opened(tmp_path, good_folder):
    os.mkfifo(good_folder / "pipe.jpg")  # reading it would block forever
    row = row_of(run(good_folder, tmp_path / "work"), "pipe.jpg")
    assert row["status"] == "rejected" and "not a regular file" in row["reason"]


def test_fingerprint_follows_content_not_timestamps(tmp_path, good_folder):
    first = fingerprint_input(good_folder)
    os.utime(good_folder / "img0.jpg", (1, 1))
    assert fingerprint_input(good_folder) == first
    (good_folder / "img0.jpg").write_bytes((good_folder / "img0.jpg").read_bytes() + b"\0")
    assert fingerprint_input(good_folder) != first


def test_hidden_and_system_files_are_ignored(tmp_path, good_folder):
    (good_folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (good_folder / "Thumbs.db").write_bytes(b"junk")
    (good_folder / "__MACOSX").mkdir()
    (good_folder / "__MACOSX" / "._img0.jpg").write_bytes(b"\0\5\26\7")
    result = run(good_folder, tmp_path / "work")
    for name in (".DS_Store", "Thumbs.db", "__MACOSX/._img0.jpg"):
        assert row_of(result, name)["status"] == "ignored"


def test_caption_files_travel_with_their_image(tmp_path, good_folder):
    (good_folder / "img1.txt").write_text("a man in a blue suit\n")
    (good_folder / "img2.caption").write_bytes("\ufeffsmiling,  outdoors".encode())
    result = run(good_folder, tmp_path / "work")
    assert row_of(result, "img1.jpg")["user_caption"] == "a man in a blue suit"
    assert row_of(result, "img2.jpg")["user_caption"] == "smiling, outdoors"
    assert row_of(result, "img1.txt")["status"] == "ignored"
    assert "caption file of img1.jpg" in row_of(result, "img1.txt")["reason"]
    manifest = read_manifest(result.manifest).set_index("source")
    assert manifest.loc["img1.jpg", "user_caption"] == "a man in a blue suit"


def test_layout_manifest_and_repeats(tmp_path, good_folder):
    (good_folder / "sub").mkdir()
    (good_folder / "sub" / "notes.txt").write_text("x")
    result = run(good_folder, tmp_path / "work")
    root = tmp_path / "work" / "t0k3n"
    assert result.repeats == 400 // 6 == 66
    assert result.class_dir == root / "training_images" / "66_t0k3n"
    assert sorted(p.name for p in result.class_dir.iterdir()) == [f"{i:04d}.png" for i in range(1, 7)]
    assert (root / "result_current").is_dir() and (root / "txt2img-images").is_dir()
    frame = read_manifest(root / "manifest.csv")
    assert list(frame.columns) == ALL_COLUMNS  # the check columns stay empty until the checks run
    assert sorted(frame["source"]) == sorted(
        p.relative_to(good_folder).as_posix() for p in good_folder.rglob("*") if p.is_file()
    )
    accepted = frame[frame["status"] == "accepted"].sort_values("source")
    assert list(accepted["image"]) == [f"training_images/66_t0k3n/{i:04d}.png" for i in range(1, 7)]
    for _, r in accepted.iterrows():
        with Image.open(root / r["image"]) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (r["width"], r["height"])
    assert layout_intact(SubjectLayout(tmp_path / "work", "t0k3n"))


def test_num_repeats_from_config_names_the_folder(tmp_path, good_folder):
    result = run(good_folder, tmp_path / "work", num_repeats=12)
    assert result.class_dir.name == "12_t0k3n"


def test_too_few_images_fails_with_every_reason(tmp_path, make_photo):
    folder = tmp_path / "photos"
    for i in range(3):
        make_photo(folder / f"p{i}.jpg", seed=i)
    (folder / "tiny.png").write_bytes(encode(photo((100, 100), 9), "PNG"))
    with pytest.raises(TooFewImagesError) as info:
        run(folder, tmp_path / "work")
    message = str(info.value)
    assert "only 3 usable photo(s)" in message and "at least 5" in message
    assert "tiny.png: rejected: too small" in message
    assert {r["source"] for r in info.value.rows} == {"p0.jpg", "p1.jpg", "p2.jpg", "tiny.png"}
    assert not (tmp_path / "work" / "t0k3n" / "manifest.csv").exists()


def test_more_than_100_images_warns(tmp_path, good_folder):
    result = run(good_folder, tmp_path / "work", settings=IngestSettings(warn_above_images=5))
    assert any("waste of work" in note for note in result.warnings)


def test_rerun_with_one_more_photo_keeps_captions_beside_the_same_photo(tmp_path, good_folder, make_photo):
    first = run(good_folder, tmp_path / "work")
    img3 = tmp_path / "work" / "t0k3n" / row_of(first, "img3.jpg")["image"]
    img3.with_suffix(".txt").write_text("edited caption of img3")
    make_photo(good_folder / "img0a.jpg", seed=555)  # sorts before img3: renumbers it
    second = run(good_folder, tmp_path / "work")
    new_img3 = tmp_path / "work" / "t0k3n" / row_of(second, "img3.jpg")["image"]
    assert (img3.name, new_img3.name) == ("0004.png", "0005.png")  # renumbered by the new photo
    assert new_img3.with_suffix(".txt").read_text() == "edited caption of img3"
    assert [p.name for p in (tmp_path / "work" / "t0k3n" / "training_images").iterdir()] == ["57_t0k3n"]
    assert second.accepted == 7


def test_symlink_outside_the_input_is_never_read(tmp_path, good_folder, monkeypatch, make_photo):
    secret = make_photo(tmp_path / "outside" / "secret.jpg", seed=77)
    (good_folder / "link.jpg").symlink_to(secret)
    (good_folder / "linkdir").symlink_to(secret.parent, target_is_directory=True)
    (good_folder / "inner.jpg").symlink_to(good_folder / "img0.jpg")
    opened: list[str] = []
    real_open = os.open

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(lora_core.foundation.sources.os, "open", spy)
    result = run(good_folder, tmp_path / "work")
    assert row_of(result, "link.jpg")["reason"] == "symlink points outside the input (not read)"
    assert row_of(result, "linkdir")["status"] == "rejected"
    assert "exact duplicate of img0.jpg" in row_of(result, "inner.jpg")["reason"]
    assert any(p.endswith("img0.jpg") for p in opened)  # the spy sees reads
    assert not [p for p in opened if Path(p).resolve().is_relative_to(secret.parent.resolve())]


def _zip_with(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def test_zip_input_with_hostile_members(tmp_path):
    members = {f"photos/p{i}.jpg": encode(photo((640, 480), 200 + i)) for i in range(5)}
    members |= {
        "/etc/evil.jpg": encode(photo((640, 480), 300)),
        "../evil.jpg": encode(photo((640, 480), 301)),
        "photos/../../evil2.jpg": encode(photo((640, 480), 302)),
        "C:\\evil3.jpg": encode(photo((640, 480), 303)),
        "__MACOSX/photos/._p0.jpg": b"\0\5\26\7",
        "photos/p1.txt": b"caption from the zip",
    }
    archive = tmp_path / "in.zip"
    archive.write_bytes(_zip_with(members, symlinks={"photos/link.jpg": "/etc/passwd"}))
    work = tmp_path / "work"
    result = run(archive, work)
    assert result.accepted == 5
    for name in ("/etc/evil.jpg", "../evil.jpg", "photos/../../evil2.jpg", "C:\\evil3.jpg"):
        assert "unsafe path in zip" in row_of(result, name)["reason"]
    assert row_of(result, "photos/link.jpg")["reason"] == "symlink inside the zip (not followed)"
    assert row_of(result, "__MACOSX/photos/._p0.jpg")["status"] == "ignored"
    assert row_of(result, "photos/p1.jpg")["user_caption"] == "caption from the zip"
    assert not list(tmp_path.rglob("evil*"))
    assert all(p.resolve().is_relative_to(tmp_path.resolve()) for p in tmp_path.rglob("*"))


def test_zip_bomb_member_is_cut_at_the_size_limit(tmp_path):
    members = {f"p{i}.jpg": encode(photo((640, 480), 400 + i)) for i in range(5)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr("zeros.jpg", b"\0" * (3 * 2**20))
    (tmp_path / "in.zip").write_bytes(buffer.getvalue())
    result = run(tmp_path / "in.zip", tmp_path / "work", settings=IngestSettings(max_file_bytes=2**20))
    assert "larger than" in row_of(result, "zeros.jpg")["reason"]


def test_work_folder_inside_the_input_is_not_ingested(tmp_path, good_folder):
    work = good_folder / "work"
    first = run(good_folder, work)
    second = run(good_folder, work)
    assert not any(r["source"].startswith("work/") for r in second.rows)
    assert second.accepted == first.accepted == 6


@pytest.mark.parametrize("token", ["", "../up", "a/b", "a\\b", ".hidden", "-flag", "with space", "x" * 65, "tök"])
def test_bad_tokens_are_refused(tmp_path, good_folder, token):
    with pytest.raises(InvalidTokenError):
        run(good_folder, tmp_path / "work", token=token)


def test_missing_or_wrong_input_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        run(tmp_path / "nope", tmp_path / "work")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match=r"folder of photos or a \.zip"):
        run(tmp_path / "file.jpg", tmp_path / "work")


def test_layout_intact_notices_a_deleted_image(tmp_path, good_folder):
    result = run(good_folder, tmp_path / "work")
    layout = SubjectLayout(tmp_path / "work", "t0k3n")
    assert layout_intact(layout)
    next(result.class_dir.glob("*.png")).unlink()
    assert not layout_intact(layout)


def test_a_manifest_is_validated_once_per_version_of_the_file(tmp_path, good_folder, monkeypatch):
    """A cached re-run checks the manifest at every stage: validated once, and again whenever the file changed,
    an edit in place of the same length included."""
    import lora_core.dataset.manifest as manifest

    layout = SubjectLayout(tmp_path / "work", "t0k3n")
    ingest(good_folder, layout, show_progress=False)
    reads = []
    real = manifest._read_manifest
    monkeypatch.setattr(manifest, "_read_manifest", lambda path: reads.append(path) or real(path))
    first = read_manifest(layout.manifest)
    second = read_manifest(layout.manifest)
    assert len(reads) == 1 and first.equals(second)
    second.loc[0, "status"] = "changed by the caller"  # each caller gets its own copy
    assert read_manifest(layout.manifest).equals(first)
    text = layout.manifest.read_text()
    damaged = text.replace(",accepted,", ",acceptex,", 1)
    assert len(damaged) == len(text) and damaged != text
    layout.manifest.write_text(damaged)  # in place, same length
    with pytest.raises(Exception, match="acceptex"):
        read_manifest(layout.manifest)
    assert not layout_intact(layout)
