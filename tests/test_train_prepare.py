"""Training data for a model beyond the closed form: the multi-scale copies (rawdiff_train.prepare), the held-out
rule over them, and the pair pool's clipped-patch over-sampling."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rawdiff_train.heldout import is_held_out
from rawdiff_train.pool import PairPool
from rawdiff_train.prepare import cli, plan_sizes, prepare


def _photo(path: Path, w: int, h: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_plan_sizes_never_upscales_and_keeps_every_photo() -> None:
    assert plan_sizes(4000, 3000, [2560, 1280, 640]) == [2560, 1280, 640]
    assert plan_sizes(1000, 700, [2560, 1280, 640]) == [640]
    assert plan_sizes(500, 300, [2560, 1280, 640]) == [500]  # smaller than every size: its own size, once


def test_prepare_skips_held_out_photos_and_names_the_sources(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _photo(src / "scene.png", 900, 600, 0)
    _photo(src / "kodim03.png", 768, 512, 1)  # a held-out name
    copies, manifest = prepare([src], [640, 320])
    assert [c.name for c in copies] == ["scene.s640.jpg", "scene.s320.jpg"]
    assert [(c.width, c.height) for c in copies] == [(640, 427), (320, 213)]
    assert manifest["held_out_skipped"] == ["kodim03.png"]
    assert manifest["sources"][0]["file"] == "scene.png" and len(manifest["sources"][0]["sha256"]) == 64


def test_scaled_copies_of_held_out_photos_stay_held_out(tmp_path: Path) -> None:
    assert is_held_out(tmp_path / "kodim03.s768.jpg", check_content=False)
    assert is_held_out(tmp_path / "mate_Aqua.s2560.jpg", check_content=False)
    assert not is_held_out(tmp_path / "kodim030.s768.jpg", check_content=False)


def test_prepare_cli_writes_copies_refuses_over_budget_and_never_replaces(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _photo(src / "a.png", 700, 500, 2)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["--photos", str(src), "--out", str(out), "--sizes", "512,256", "--budget-mb", "0.1"])
    assert r.exit_code == 2 and "budget" in r.output and not out.exists()
    r = CliRunner().invoke(cli, ["--photos", str(src), "--out", str(out), "--sizes", "512,256"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["a.s256.jpg", "a.s512.jpg", "manifest.json"]
    assert json.loads((out / "manifest.json").read_text())["sources"][0]["copies"] == ["a.s512.jpg", "a.s256.jpg"]
    before = (out / "a.s512.jpg").read_bytes()
    r = CliRunner().invoke(cli, ["--photos", str(src), "--out", str(out), "--sizes", "512,256", "--quality", "60"])
    assert r.exit_code == 1 and (out / "a.s512.jpg").read_bytes() == before
    r = CliRunner().invoke(cli, ["--photos", str(src), "--out", str(out), "--sizes", "12"])
    assert r.exit_code == 2


def _pool(fraction: float) -> PairPool:
    rng = np.random.default_rng(0)
    s = (rng.random((100, 120, 3)) * 200).astype(np.uint8)
    s[70:75, 10:14] = 255  # one small clipped highlight
    r = rng.random((100, 120, 3)).astype(np.float32)
    return PairPool([SimpleNamespace(srgb=s, raw=r)], patch=32, clipped_fraction=fraction)


def test_pool_over_samples_clipped_patches_and_keeps_the_default_draws() -> None:
    pool = _pool(0.5)
    cond, _ = pool.batch(64, torch.Generator().manual_seed(0))
    has = (cond >= 1.0).any(dim=1).flatten(1).any(dim=1)
    assert bool(has[32:].all())  # every over-sampled patch holds a clipped pixel
    assert float(has[:32].float().mean()) < 0.5  # uniform patches mostly do not
    plain, _ = _pool(0.0).batch(64, torch.Generator().manual_seed(0))
    assert torch.equal(plain[:32], cond[:32])  # the uniform part draws exactly as before
    with pytest.raises(ValueError, match="clipped_fraction"):
        _pool(1.5)


def test_training_curve_plot_from_session_results(tmp_path: Path) -> None:
    from rawdiff_bench.curve import curve_points, plot_curve

    results = {"phases": {"train": {"log": [{"step": 10, "loss": 0.5}, {"step": 20, "loss": float("nan")},
                                            {"step": 30, "loss": 0.2}],
                                    "curve": [{"step": 0, "val_psnr": 30.0, "val_psnr_clipped": None},
                                              {"step": 30, "val_psnr": 35.0, "val_psnr_clipped": 25.0}]}}}
    pts = curve_points(results)
    assert pts == {"loss": [(10, 0.5), (30, 0.2)], "psnr": [(0, 30.0), (30, 35.0)], "psnr_clipped": [(30, 25.0)]}
    out = tmp_path / "c.png"
    plot_curve(results, out, closed_form={"all": 33.0, "clipped": 27.0})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError):
        plot_curve(results, out)
    with pytest.raises(ValueError, match="nothing|no training"):
        plot_curve({"phases": {}}, tmp_path / "d.png")


def test_gpu_session_names_the_prepared_sources_in_the_provenance(tmp_path: Path) -> None:
    from rawdiff_bench.gpu_session import prepared_sources

    src = tmp_path / "src"
    src.mkdir()
    _photo(src / "scene.png", 700, 500, 3)
    out = tmp_path / "out"
    assert CliRunner().invoke(cli, ["--photos", str(src), "--out", str(out), "--sizes", "512,256"]).exit_code == 0
    got = prepared_sources([out, src])  # src has no manifest: nothing from it
    assert [(s["file"], s["copies"]) for s in got] == [("scene.png", ["scene.s512.jpg", "scene.s256.jpg"])]
    assert len(got[0]["sha256"]) == 64
