"""rawdiff-eval, the diagnosis and the grid study share one check of their report paths: an existing --json or
--plot is refused before any compute (exit 2, one line) unless --force, and crops are cut from rendered pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rawdiff_bench import diagnose, evaluate, grid_study


@pytest.mark.parametrize("command, extra", [(evaluate.cli, ["--sampler", "dpm:2"]), (diagnose.main, []),
                                            (grid_study.main, [])])
def test_existing_report_is_refused_before_compute(tmp_path: Path, command, extra) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()  # empty: any compute would fail differently
    report = tmp_path / "report.json"
    report.write_text("keep me")
    res = CliRunner().invoke(command, ["--photos", str(photos), "--json", str(report), *extra])
    assert res.exit_code == 2, res.output
    assert "exists, not overwritten (use --force)" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert report.read_text() == "keep me"


def test_crop_cases_are_the_evenly_spread_crops_of_the_pair() -> None:
    rng = np.random.default_rng(0)
    srgb = rng.integers(0, 256, (100, 140, 3), dtype=np.uint8)
    target = rng.random((100, 140, 3)).astype(np.float32)
    whole = evaluate.crop_cases("p", srgb, target, None)
    assert [c.name for c in whole] == ["p"] and whole[0].srgb is srgb
    centre = evaluate.crop_cases("p", srgb, target, 40)
    assert [c.name for c in centre] == ["p"]
    np.testing.assert_array_equal(centre[0].target, target[30:70, 50:90])
    four = evaluate.crop_cases("p", srgb, target, 40, per_side=2)
    assert [c.name for c in four] == ["p#0", "p#1", "p#2", "p#3"]
    np.testing.assert_array_equal(four[3].srgb, srgb[45:85, 75:115])
