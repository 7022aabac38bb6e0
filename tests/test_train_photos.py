"""Photos shipped in train/photos (provenance) and the held-out rule (rawdiff_train.heldout)."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rawdiff_train.data import BUNDLED_PHOTOS_DIR, PhotoError, list_photos
from rawdiff_train.heldout import HELD_OUT_PHOTOS, is_held_out, sort_held_out, split_held_out

SOURCES = BUNDLED_PHOTOS_DIR / "SOURCES.md"


def _rows() -> dict[str, dict[str, str]]:
    """The SOURCES.md table: file name -> {bytes, size, licence, use, sha256}."""
    rows = {}
    for line in SOURCES.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = {"bytes": cells[1], "size": cells[2], "licence": cells[5],
                                         "use": cells[6], "sha256": cells[7].strip("`")}
    return rows


def test_every_shipped_photo_matches_its_sources_row() -> None:
    rows = _rows()
    files = sorted(p.name for p in BUNDLED_PHOTOS_DIR.iterdir() if p.name != "SOURCES.md")
    assert files == sorted(rows), "every photo needs a row in SOURCES.md and every row a photo"
    assert len(files) >= 4
    for name, row in rows.items():
        data = (BUNDLED_PHOTOS_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"], name
        assert len(data) == int(row["bytes"]), name
        with Image.open(BUNDLED_PHOTOS_DIR / name) as im:
            assert f"{im.width} x {im.height}" == row["size"], name
            assert im.mode == "RGB", name
        assert row["licence"] and row["licence"] != "-", name
        assert not name.lower().startswith("kodim"), "no Kodak photo beyond those in shared/data/photos"


def test_grace_hopper_is_shipped_held_out_and_marked_so() -> None:
    rows = _rows()
    assert "HELD OUT" in rows["grace_hopper.jpg"]["use"]
    assert HELD_OUT_PHOTOS["grace_hopper.jpg"] == rows["grace_hopper.jpg"]["sha256"]
    for name, row in rows.items():
        assert ("HELD OUT" in row["use"]) == is_held_out(BUNDLED_PHOTOS_DIR / name), name


def test_held_out_digests_are_those_of_the_real_files(shared_data: Path) -> None:
    for name, digest in HELD_OUT_PHOTOS.items():
        bundled = BUNDLED_PHOTOS_DIR / name
        path = (shared_data / "photos" / name if name.startswith("kodim")
                else bundled if bundled.exists() else shared_data / "train-photos" / name)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
    listed = re.findall(r"`photos/(kodim\d\d\.png)`", (shared_data / "SOURCES.md").read_text())
    assert {"kodim03.png", "kodim07.png", "kodim13.png"} <= set(listed)


def test_held_out_by_name_stem_and_by_content(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "mine.png")
    for name in ("kodim03.png", "KODIM07.PNG", "kodim13.jpg", "grace_hopper.webp"):
        (tmp_path / name).write_bytes(b"whatever")  # matched by stem, the content is not read
        assert is_held_out(tmp_path / name)
    copy = tmp_path / "portrait.jpg"
    shutil.copyfile(BUNDLED_PHOTOS_DIR / "grace_hopper.jpg", copy)  # a renamed copy: caught by its sha256
    assert is_held_out(copy) and not is_held_out(copy, check_content=False)
    assert not is_held_out(tmp_path / "mine.png") and not is_held_out(tmp_path / "kodim01.png", check_content=False)
    train, held = split_held_out(sorted(tmp_path.iterdir()))
    assert [p.name for p in train] == ["mine.png"]
    assert [p.name for p in sort_held_out(held)] == ["kodim03.png", "KODIM07.PNG", "kodim13.jpg",
                                                     "grace_hopper.webp", "portrait.jpg"]


def test_list_photos_combines_folders_and_refuses_name_clashes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for d, n in ((a, "x.png"), (a, "y.jpg"), (b, "z.png")):
        Image.new("RGB", (8, 8)).save(d / n)
    (a / "notes.txt").write_text("not a photo")
    assert [p.name for p in list_photos([a, b])] == ["x.png", "y.jpg", "z.png"]
    assert [p.name for p in list_photos([a, a])] == ["x.png", "y.jpg"]  # the same folder twice is harmless
    Image.new("RGB", (8, 8)).save(b / "x.png")
    with pytest.raises(PhotoError, match="two photos named x.png"):
        list_photos([a, b])


def _small_photos(shared_data: Path, folder: Path, names: list[str], size: int = 96) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        im = np.asarray(Image.open(shared_data / "photos" / n).convert("RGB"))
        Image.fromarray(np.ascontiguousarray(im[100:100 + size, 200:200 + size])).save(folder / n)


def test_build_data_keeps_held_out_photos_out_of_the_training_pool(shared_data: Path, tmp_path: Path) -> None:
    """Two folders, held-out photos by name and a renamed byte-identical copy of one: none of them is a training
    pair; the named ones become the validation photos, in the held-out order."""
    from rawdiff_train.cli import build_data
    from rawdiff_train.pool import PairPool
    from rawdiff_train.scene_aug import SceneAugmentation

    _small_photos(shared_data, tmp_path / "a", ["kodim13.png", "kodim01.png", "kodim03.png"])
    _small_photos(shared_data, tmp_path / "b", ["kodim02.png"])
    shutil.copyfile(BUNDLED_PHOTOS_DIR / "grace_hopper.jpg", tmp_path / "b" / "zz_copy.jpg")
    pairs, val, _, desc = build_data([tmp_path / "a", tmp_path / "b"], None, None, camera="nikon-d700",
                                     variants=2, wb="camera", train_list=None, test_list=None, val_count=3,
                                     seed=0, cache=None, augmentation=SceneAugmentation())
    assert desc["train_files"] == ["kodim01.png", "kodim02.png"]
    assert desc["held_out_files"] == ["kodim03.png", "kodim13.png", "zz_copy.jpg"]
    assert desc["val_files"] == ["kodim03.png", "kodim13.png", "zz_copy.jpg"]
    used = {Path(p.meta["path"]).name for p in pairs}
    assert used == {"kodim01.png", "kodim02.png"} and len(pairs) == 4
    assert all(p.meta["scene"] is not None for p in pairs) and all(v.meta["scene"] is None for v in val)
    assert desc["scene_augmentation"] == SceneAugmentation().to_dict()
    pool = PairPool(pairs, patch=64)
    assert len(pool) == 4
    # only held-out photos: nothing to train on, said in one line
    _small_photos(shared_data, tmp_path / "c", ["kodim03.png", "kodim07.png"])
    with pytest.raises(PhotoError, match="no photos to train on") as e:
        build_data([tmp_path / "c"], None, None, camera="nikon-d700", variants=1, wb="camera", train_list=None,
                   test_list=None, val_count=1, seed=0, cache=None)
    assert "\n" not in str(e.value)
