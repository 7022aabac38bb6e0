"""The prepared GPU session script (benchmarks/gpu_session.py) on the CPU: held-out photos never train, the
command line is click and validated, and a tiny train phase runs end to end with its held-out PSNR curve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rawdiff_bench import gpu_session
from rawdiff_train.data import BUNDLED_PHOTOS_DIR


def _photo(path: Path, seed: int, size: int = 160) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    base = np.stack([yy, xx, 1 - 0.5 * (yy + xx)], -1) * rng.uniform(0.3, 1.0, 3)
    img = np.clip(base + 0.08 * rng.standard_normal(base.shape), 0, 1)
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path)


@pytest.fixture()
def folders(tmp_path: Path) -> list[Path]:
    """Two folders: ordinary photos, held-out names (small stand-ins) and a renamed copy of grace_hopper.jpg."""
    a, b = tmp_path / "shared", tmp_path / "repo"
    a.mkdir()
    b.mkdir()
    for i, name in enumerate(["kodim01.png", "kodim13.png", "kodim03.png"]):
        _photo(a / name, i)
    _photo(b / "mine.png", 7)
    shutil.copyfile(BUNDLED_PHOTOS_DIR / "grace_hopper.jpg", b / "renamed.jpg")
    return [a, b]


def test_select_photos_splits_off_held_out_ones_in_the_held_out_order(folders: list[Path]) -> None:
    train, held = gpu_session.select_photos(folders)
    assert [p.name for p in train] == ["kodim01.png", "mine.png"]
    assert [p.name for p in held] == ["kodim03.png", "kodim13.png", "renamed.jpg"]
    with pytest.raises(ValueError, match="held-out photo"):
        gpu_session.make_pairs(held[:1], camera=None, seed=0, variants=1, workers=1)


def test_command_line_is_click_and_validated(folders: list[Path], tmp_path: Path) -> None:
    r = CliRunner().invoke(gpu_session.cli, ["--photos", str(folders[0]), "--out", str(tmp_path / "o"), "--lr", "nan"])
    assert r.exit_code == 2 and "is not a finite number" in r.output
    r = CliRunner().invoke(gpu_session.cli, ["--photos", str(folders[0]), "--out", str(tmp_path / "o"),
                                             "--train-until", "inf"])
    assert r.exit_code == 2
    r = CliRunner().invoke(gpu_session.cli, ["--photos", str(folders[0]), "--out", str(tmp_path / "o"), "--resume-run",
                                             "--run-dir", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "holds no trainer state" in r.output
    assert not (tmp_path / "o").exists()


def test_tiny_train_phase_end_to_end_with_curve(folders: list[Path], tmp_path: Path) -> None:
    out, run = tmp_path / "out", tmp_path / "run"
    args = ["--photos", str(folders[0]), "--photos", str(folders[1]), "--out", str(out), "--run-dir", str(run),
            "--tiny", "--steps", "6", "--batch", "4", "--warmup", "2", "--variants", "2", "--workers", "2",
            "--log-every", "3", "--val-every", "3", "--val-crop", "64", "--val-steps", "2", "--train-until", "600",
            "--skip", "eval", "--skip", "bench"]
    threads = torch.get_num_threads()
    try:
        r = CliRunner().invoke(gpu_session.cli, args, catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["errors"] == [], res["errors"]
    train = res["phases"]["train"]
    assert train["train_files"] == ["kodim01.png", "mine.png"] and train["pool_images"] == 4  # 2 photos x 2
    assert train["val_files"] == ["kodim03.png", "kodim13.png", "renamed.jpg"]
    assert [p["step"] for p in train["curve"]] == [0, 3, 6]
    assert set(train["curve"][-1]["psnr_each"]) == {"kodim03.png", "kodim13.png", "renamed.jpg"}
    assert all(np.isfinite(p["val_psnr"]) for p in train["curve"])
    assert (out / "train_log.csv").read_text().splitlines()[0].startswith("step,loss")
    from rawdiff_infer.checkpoint import read_meta

    prov = read_meta(out / "weights").provenance
    assert prov["train_steps"] == 6 and prov["scene_augmentation"]["probability"] == 0.8
    assert "kodim03.png" not in prov["train_files"] and "renamed.jpg" not in prov["train_files"]
