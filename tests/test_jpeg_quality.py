"""The JPEG quality the decoder reports (``DecodedImage.jpeg_quality``) and its estimator
(``rawdiff_infer.io.jpeg.estimate_jpeg_quality``)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from PIL.JpegImagePlugin import zigzag_index

from rawdiff_infer.io import ImageError, read_image
from rawdiff_infer.io.jpeg import estimate_jpeg_quality, ijg_table

QUALITIES = (10, 30, 50, 75, 90, 95, 100)


def textured_rgb(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus noise, uint8 H x W x 3 (every quantiser sees some energy)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def save_jpeg(path: Path, pixels: np.ndarray, **options) -> Path:
    Image.fromarray(pixels).save(path, "JPEG", **options)
    return path


# ---------------------------------------------------------------------------------------------- through read_image


@pytest.mark.parametrize("quality", QUALITIES)
@pytest.mark.parametrize("subsampling", [0, 1, 2])
def test_pillow_quality_is_recovered_exactly(tmp_path: Path, quality: int, subsampling: int) -> None:
    path = save_jpeg(tmp_path / "q.jpg", textured_rgb(), quality=quality, subsampling=subsampling)
    img = read_image(path)
    assert img.format == "JPEG"
    assert img.jpeg_quality == quality  # Pillow writes IJG's tables: the estimate is exact


@pytest.mark.parametrize("quality", [5, 10, 50, 75, 98, 100])
def test_greyscale_jpeg_one_table(tmp_path: Path, quality: int) -> None:
    path = tmp_path / "grey.jpg"
    Image.fromarray(textured_rgb()[..., 0]).save(path, "JPEG", quality=quality)
    with Image.open(path) as im:
        assert len(im.quantization) == 1
    img = read_image(path)
    assert img.pixels.shape[2] == 3 and img.jpeg_quality == quality


def test_every_pillow_quality_is_exact(tmp_path: Path) -> None:
    pixels = textured_rgb(16, 16)
    for quality in range(1, 101):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
        with Image.open(buf) as im:
            assert estimate_jpeg_quality(im.quantization) == quality


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("TIFF", ".tif"), ("WEBP", ".webp")])
def test_other_formats_have_no_quality(tmp_path: Path, fmt: str, suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    Image.fromarray(textured_rgb()).save(path, fmt)
    img = read_image(path)
    assert img.jpeg_quality is None


def test_sixteen_bit_tiff_has_no_quality(tmp_path: Path) -> None:
    path = tmp_path / "x16.tif"
    tifffile.imwrite(path, (textured_rgb().astype(np.uint16) * 257), photometric="rgb")
    img = read_image(path)
    assert img.bit_depth == 16 and img.jpeg_quality is None


def test_jpeg_compressed_tiff_has_no_quality(tmp_path: Path) -> None:
    """jpeg_quality describes JPEG files; a TIFF with JPEG compression is a TIFF."""
    path = tmp_path / "j.tif"
    Image.fromarray(textured_rgb()).save(path, "TIFF", compression="jpeg", quality=60)
    img = read_image(path)
    assert img.format == "TIFF" and img.jpeg_quality is None


def test_mpo_like_multi_frame_jpeg_reports_quality(tmp_path: Path) -> None:
    path = tmp_path / "m.jpg"
    frames = [Image.fromarray(textured_rgb(seed=s)) for s in (0, 1)]
    frames[0].save(path, "MPO", save_all=True, append_images=frames[1:], quality=80)
    img = read_image(path)
    assert img.format == "JPEG" and img.jpeg_quality == 80


def test_custom_qtables_give_a_sane_quality(tmp_path: Path) -> None:
    """A flat table of 8 (not IJG-shaped): the IJG quality whose luminance table has the closest mean."""
    path = save_jpeg(tmp_path / "flat.jpg", textured_rgb(), qtables=[[8] * 64, [12] * 64])
    img = read_image(path)
    means = [np.mean(ijg_table(q)) for q in range(1, 101)]
    assert img.jpeg_quality is not None and 1 <= img.jpeg_quality <= 100
    assert abs(means[img.jpeg_quality - 1] - 8.0) == pytest.approx(min(abs(m - 8.0) for m in means))
    assert img.jpeg_quality == 93  # IJG's luminance mean at 93 is 8.09 (at 92: 9.25, at 94: 6.89)


def test_custom_qtables_ijg_luma_other_chroma(tmp_path: Path) -> None:
    """IJG's luminance table at 70 with a hand-made chrominance table: the luminance table decides."""
    path = save_jpeg(tmp_path / "mix.jpg", textured_rgb(), qtables=[ijg_table(70), [30] * 64])
    assert read_image(path).jpeg_quality == 70


def test_pillow_presets_are_estimated(tmp_path: Path) -> None:
    """Pillow's Photoshop-derived presets (not IJG tables): a quality that rises with the preset's fidelity."""
    found = []
    for preset in ("web_low", "web_medium", "web_high", "web_very_high", "web_maximum"):
        path = save_jpeg(tmp_path / f"{preset}.jpg", textured_rgb(), quality=preset)
        q = read_image(path).jpeg_quality
        assert q is not None and 1 <= q <= 100
        found.append(q)
    assert found == sorted(found) and found[0] < found[-1]


def test_sixteen_bit_tables(tmp_path: Path) -> None:
    """Entries above 255 make 16-bit DQT tables (an extended, non-baseline file): IJG's non-baseline quality 5."""
    tables = [ijg_table(5, baseline=False), ijg_table(5, chroma=True, baseline=False)]
    assert max(tables[0]) > 255
    path = save_jpeg(tmp_path / "t16.jpg", textured_rgb(), qtables=tables)
    with Image.open(path) as im:
        assert max(im.quantization[0]) > 255
    assert read_image(path).jpeg_quality == 5


def test_all_ones_tables_are_quality_100(tmp_path: Path) -> None:
    path = save_jpeg(tmp_path / "ones.jpg", textured_rgb(), qtables=[[1] * 64, [1] * 64])
    assert read_image(path).jpeg_quality == 100


def test_corrupt_jpeg_is_still_one_error_line(tmp_path: Path) -> None:
    """A DQT that is cut short: the decoder's error policy (one ImageError line), no traceback from the estimate."""
    good = (save_jpeg(tmp_path / "g.jpg", textured_rgb(), quality=75)).read_bytes()
    at = good.index(b"\xff\xdb")
    bad = good[: at + 4] + good[at + 4: at + 20]  # the DQT's length says 67+ bytes, the file ends after 16
    path = tmp_path / "bad.jpg"
    path.write_bytes(bad)
    with pytest.raises(ImageError) as info:
        read_image(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- the estimator


def test_ijg_table_matches_libjpeg_at_50_and_100() -> None:
    assert ijg_table(50)[:8] == [16, 11, 10, 16, 24, 40, 51, 61]
    assert ijg_table(100) == [1] * 64 and ijg_table(100, chroma=True) == [1] * 64
    assert max(ijg_table(1)) == 255 and max(ijg_table(1, baseline=False)) > 255
    with pytest.raises(ValueError):
        ijg_table(0)


@pytest.mark.parametrize("quality", [1, 10, 37, 50, 51, 75, 90, 99, 100])
def test_zigzag_order_is_recognised(quality: int) -> None:
    """Pillow before 8.3 gave the tables in the file's zigzag order."""
    natural = [ijg_table(quality), ijg_table(quality, chroma=True)]
    zigzag = [[0] * 64 for _ in natural]
    for t, z in zip(natural, zigzag):
        for k in range(64):
            z[zigzag_index[k]] = t[k]
    assert estimate_jpeg_quality({0: zigzag[0], 1: zigzag[1]}) == quality
    assert estimate_jpeg_quality({0: natural[0], 1: natural[1]}) == quality


def test_luminance_is_the_lowest_table_id() -> None:
    assert estimate_jpeg_quality({1: ijg_table(40, chroma=True), 0: ijg_table(40)}) == 40
    assert estimate_jpeg_quality([ijg_table(60), ijg_table(60, chroma=True)]) == 60  # a sequence, in order


@pytest.mark.parametrize("tables", [None, {}, [], {0: []}, {0: "abc"}, {0: [math.nan] * 64}, {0: [-1] * 64},
                                    {0: None}, "not tables", b"\x00" * 64, 42, {0: [[1, 2], [3]]}])
def test_unusable_tables_give_none(tables) -> None:
    assert estimate_jpeg_quality(tables) is None


@pytest.mark.parametrize("tables", [{0: [0] * 64}, {0: [65535] * 64}, {0: [7] * 10}, {0: [1e30] * 64},
                                    {0: [3] * 64, 1: "junk"}, {"a": [5] * 64, 0: [9] * 64}, {0: [1] * 64}])
def test_odd_tables_never_raise(tables) -> None:
    q = estimate_jpeg_quality(tables)
    assert q is not None and 1 <= q <= 100


def test_coarser_tables_give_lower_quality() -> None:
    qs = [estimate_jpeg_quality({0: [v] * 64}) for v in (1, 2, 4, 8, 16, 32, 64, 128, 255)]
    assert qs[0] == 100 and qs == sorted(qs, reverse=True) and qs[-1] == 1
    # 16-bit entries are compared with IJG's 16-bit (non-baseline) tables: a mean of 1000 is about quality 3
    assert estimate_jpeg_quality({0: [1000] * 64}) <= 5
