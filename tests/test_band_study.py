"""benchmarks/band_study.py without the model: the report-path check, the JPEG round trip through the decoder, the
camera render without its JPEG step, the closed form, the summary and its table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rawdiff_bench import band_study
from rawdiff_infer.checkpoint import load_checkpoint
from rawdiff_infer.metrics import psnr_regions

WEIGHTS = Path(band_study.__file__).resolve().parents[1] / "rawdiff_infer" / "weights"


@pytest.fixture(scope="module")
def meta():
    return load_checkpoint(WEIGHTS)[1]


def test_existing_report_is_refused_before_compute(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text("keep me")
    res = CliRunner().invoke(band_study.main, ["--photos", str(tmp_path), "--json", str(report)])
    assert res.exit_code == 2 and "exists, not overwritten (use --force)" in res.output
    assert report.read_text() == "keep me"


@pytest.mark.parametrize("quality", [50, 98])
def test_jpeg_roundtrip_reports_the_quality(tmp_path: Path, quality: int) -> None:
    rng = np.random.default_rng(0)
    srgb = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    decoded, est = band_study.jpeg_roundtrip_file(srgb, quality, tmp_path)
    assert est == quality and decoded.shape == srgb.shape and decoded.dtype == np.uint8
    assert not list(tmp_path.iterdir())  # the temporary JPEG is removed


def test_render_without_jpeg_is_inverted_by_the_closed_form(tmp_path: Path, meta) -> None:
    """No JPEG in the camera's render: the ISP's closed form recovers the RAW wherever the input is determined."""
    y, x = np.mgrid[0:160, 0:200]
    photo = np.stack([x * 255 / 200, y * 255 / 160, (x + y) * 127 / 360], axis=-1).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "p.png")
    (crop,) = band_study.rendered_crops(tmp_path, meta, 64)
    assert crop.name == "p" and crop.srgb.shape == (64, 64, 3) and crop.target.shape == (64, 64, 3)
    p = psnr_regions(band_study.closed_form(meta, crop.srgb), crop.target, crop.srgb)
    assert p["determined"] is not None and p["determined"] > 40.0


def test_summary_and_table() -> None:
    cases = [("closed form", "a", 0.0, 40.0, 42.0, None), ("closed form", "b", 0.0, 30.0, 32.0, 20.0),
             ("band 1", "a", 2.0, 41.0, 43.0, None), ("band 1", "b", 4.0, 31.0, 33.0, 22.0)]
    rows = [{"quality": 50, "config": c, "image": i, "seconds": s, "all": a, "determined": d, "clipped": k}
            for c, i, s, a, d, k in cases]
    summary = band_study.summarise(rows)
    assert [(s["config"], s["all"], s["determined"], s["clipped"], s["clipped_images"]) for s in summary] == [
        ("closed form", 35.0, 37.0, 20.0, 1), ("band 1", 36.0, 38.0, 22.0, 1)]
    table = band_study.markdown_table(summary).splitlines()
    assert len(table) == 4 and table[3] == "| 50 | band 1 | 36.00 | 38.00 | +1.00 | 22.00 | 3.0 |"
