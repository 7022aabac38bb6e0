"""rawdiff-eval (benchmarks/evaluate.py): the closed-form baseline, PSNR per region, the inputs' bands, the
consistency rows and the side-by-side figure, on a tiny model and tiny photos (seconds, not minutes)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import TINY_CONFIG
from rawdiff_bench import evaluate
from rawdiff_infer.backends import default_checkpoint
from rawdiff_infer.checkpoint import ModelMeta, read_meta, save_checkpoint
from rawdiff_infer.consistency import MODES, Band, ConsistencyConfig
from rawdiff_infer.isp import IspCurve, IspModel
from rawdiff_infer.model import UNet


def _bundled_meta() -> ModelMeta:
    path = default_checkpoint()
    if path is None:
        pytest.skip("this build has no bundled model (its camera and ISP describe the tiny test model)")
    meta = read_meta(path)
    assert meta.isp is not None
    return meta


def _save_tiny(path: Path, meta: ModelMeta) -> Path:
    """The tiny U-Net with ``meta``'s camera, encoding and ISP."""
    torch.manual_seed(0)
    save_checkpoint(UNet(TINY_CONFIG), path,
                    meta=ModelMeta(model=TINY_CONFIG, encoding=meta.encoding, camera=meta.camera, isp=meta.isp))
    assert read_meta(path).isp == meta.isp
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-isp.safetensors", _bundled_meta())


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small photos: smooth colour gradients with texture, the first with a white blob (clipped pixels)."""
    d = tmp_path_factory.mktemp("photos")
    for k, (h, w) in enumerate([(72, 80), (64, 70)]):
        rng = np.random.default_rng(k)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([x / w, y / h, 0.5 + 0.25 * np.sin(x / 7.0) * np.cos(y / 5.0)], axis=-1) * 200 + 20
        img = img + rng.normal(0, 4, img.shape)
        if k == 0:
            img[(y - 30) ** 2 + (x - 40) ** 2 < 120] = 255
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"p{k}.png")
    return d


def _invoke(*args: object):
    return CliRunner().invoke(evaluate.cli, [str(a) for a in args])


def _one_error(res, needle: str) -> None:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.output
    assert "Traceback" not in res.output


# ---- the baselines ----------------------------------------------------------------------------------------------

def test_closed_form_inverts_the_isp_where_nothing_is_clipped() -> None:
    """A RAW rendered by an ISP to 8 bits comes back through the closed form to within the quantisation, on the
    determined pixels; the naive baseline does not come near."""
    from rawdiff_infer.metrics import psnr_regions
    from rawdiff_infer.rawspace import RawEncoding

    isp = IspModel(gain=2.0, srgb_from_cam=(1.6, -0.5, -0.1, -0.1, 1.3, -0.2, 0.0, -0.3, 1.3),
                   curve=IspCurve(kind="srgb", tone=0.5))
    # a RAW whose linear sRGB lies inside the gamut (nothing black-clipped), with a block over the white point
    lin = 0.01 + 0.44 * torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0))
    raw = torch.einsum("ij,jhw->ihw", isp.inverse_matrix(lin), lin)
    assert 0.0 <= float(raw.min()) and float(raw.max()) <= 1.0
    raw[:, :5, :5] = 1.0
    srgb = (isp.render(raw) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    target = RawEncoding().encode(raw.permute(1, 2, 0).numpy())
    case = evaluate.EvalCase("c", srgb, target)
    cf = evaluate.closed_form(isp, srgb)
    assert cf.shape == target.shape and cf.dtype == np.float32
    p = psnr_regions(cf, target, srgb)
    assert p["clipped"] is not None and p["determined"] is not None  # both regions present
    assert p["determined"] > 38.0
    (cf_row,) = evaluate.closed_form_rows([case], isp)
    (naive,) = evaluate.baseline_rows([case])
    assert cf_row.label == evaluate.CLOSED_FORM and naive.label == evaluate.NAIVE
    assert cf_row.psnr_determined == pytest.approx(p["determined"])
    assert cf_row.psnr_determined > naive.psnr_determined + 10.0


def test_closed_form_beats_the_naive_row_on_synthetic_photos(photos: Path) -> None:
    meta = _bundled_meta()
    cases = evaluate.photo_cases(photos, meta.camera, crop=48)
    cf = evaluate.closed_form_rows(cases, meta.isp)
    naive = evaluate.baseline_rows(cases)
    assert len(cf) == len(naive) == len(cases) == 2
    for a, b in zip(cf, naive):  # (on clipped pixels neither knows the RAW: no claim there)
        assert a.psnr > b.psnr + 5.0, (a, b)
        assert a.psnr_determined is not None and b.psnr_determined is not None
        assert a.psnr_determined > max(30.0, b.psnr_determined + 15.0), (a, b)
    assert cf[0].psnr_clipped is not None  # the white blob


def test_closed_form_uses_each_case_own_isp_and_skips_unknown_ones() -> None:
    isp = IspModel(gain=1.0, srgb_from_cam=(1, 0, 0, 0, 1, 0, 0, 0, 1), curve=IspCurve(kind="gamma"))
    srgb = np.full((8, 8, 3), 128, np.uint8)
    own = evaluate.EvalCase("own", srgb, np.zeros((8, 8, 3), np.float32), isp=isp)
    unknown = evaluate.EvalCase("unknown", srgb, np.zeros((8, 8, 3), np.float32))
    rows = evaluate.closed_form_rows([own, unknown], None)
    assert [r.image for r in rows] == ["own"] and "render" in rows[0].method
    assert len(evaluate.closed_form_rows([own, unknown], isp)) == 2


def test_photo_cases_carry_the_band_of_the_cameras_jpeg_draw(photos: Path) -> None:
    from rawdiff_train.data import PhotoPairSource, list_files

    meta = _bundled_meta()
    cases = evaluate.photo_cases(photos, meta.camera, crop=32, per_side=2)
    src = PhotoPairSource(list_files(photos), camera=meta.camera, seed=10_000)
    for i, f in enumerate(list_files(photos)):
        q = src[i].meta["jpeg_quality"]
        for c in cases:
            if c.name.startswith(f.stem + "#"):
                assert c.band == Band.for_input(255, jpeg_quality=q)


def test_raw_closed_form_uses_libraw_isp_when_there_and_says_so_when_not(monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    from rawdiff_train import fivek

    isp = IspModel(gain=1.0, srgb_from_cam=(1, 0, 0, 0, 1, 0, 0, 0, 1), curve=IspCurve(kind="gamma"))
    seen = []
    monkeypatch.setattr(fivek, "libraw_isp", lambda path, wb: seen.append((path, wb)) or isp, raising=False)
    evaluate._libraw_isp.cache_clear()
    try:
        assert evaluate.render_isp("x.dng") is isp and seen == [("x.dng", "camera")]
        monkeypatch.delattr(fivek, "libraw_isp")
        evaluate._libraw_isp.cache_clear()
        with caplog.at_level(logging.WARNING):
            assert evaluate.render_isp("x.dng") is None
            assert evaluate.render_isp("y.dng") is None
        said = [r for r in caplog.records if "libraw_isp" in r.getMessage()]
        assert len(said) == 1 and "closed-form row is left out" in said[0].getMessage()
    finally:
        evaluate._libraw_isp.cache_clear()


def test_raw_files_get_the_closed_form_of_their_own_render(shared_data: Path, ckpt: Path, tmp_path: Path) -> None:
    """--raw: the closed form inverts each file's LibRaw render (``fivek.libraw_isp``), not the model's ISP; files
    the protocol refuses are skipped with a warning; the band is that of the protocol's JPEG (quality 90)."""
    pytest.importorskip("rawpy")
    from rawdiff_train import fivek

    if not hasattr(fivek, "libraw_isp"):
        pytest.skip("this build has no fivek.libraw_isp")
    report = tmp_path / "raw.json"
    res = _invoke("--raw", shared_data / "raw", "--ckpt", ckpt, "--crop", 64, "--sampler", "ddim:1", "--json",
                  report)
    assert res.exit_code == 0, res.output
    data = json.loads(report.read_text())
    assert data["bands"] and set(data["bands"]) == {Band.for_input(255, jpeg_quality=90).width}
    cf = [r for r in data["rows"] if r["label"] == evaluate.CLOSED_FORM]
    naive = [r for r in data["rows"] if r["label"] == evaluate.NAIVE]
    assert cf and len(cf) == len(naive) == len(data["images"])
    assert all("render" in r["method"] for r in cf)
    for a, b in zip(cf, naive):  # measured: 37.9 against 26.6 dB on the Canon 550D file's 64 x 64 centre crop
        assert a["psnr_determined"] > max(35.0, b["psnr_determined"] + 10.0)


# ---- labels and summaries -----------------------------------------------------------------------------------------

def test_modes_and_row_labels() -> None:
    assert evaluate._MODES == MODES
    cfg = ConsistencyConfig
    assert evaluate.row_label("dpm:10", cfg("auto"), True) == "dpm:10 [consistency auto: on, skip]"
    assert evaluate.row_label("dpm:10", cfg("auto"), False) == "dpm:10 [consistency auto: off]"
    assert evaluate.row_label("dpm:10", cfg("on", skip=False), True) == "dpm:10 [consistency on, no skip]"
    assert evaluate.row_label("dpm:10", cfg("off"), True) == "dpm:10 [consistency off]"


def test_region_means_are_image_level_over_the_images_that_have_the_region() -> None:
    rows = [evaluate.EvalRow("r", "s", "m", 1, "a", 0, 30.0, 1.0, 0.0, psnr_determined=32.0, psnr_clipped=None),
            evaluate.EvalRow("r", "s", "m", 1, "b", 0, 20.0, 1.0, 0.0, psnr_determined=24.0, psnr_clipped=12.0),
            evaluate.EvalRow("r", "s", "m", 1, "a", 1, 31.0, 1.0, 0.0, psnr_determined=33.0, psnr_clipped=None),
            evaluate.EvalRow("r", "s", "m", 1, "b", 1, 21.0, 1.0, 0.0, psnr_determined=25.0, psnr_clipped=14.0)]
    (s,) = evaluate.summarise(rows)
    assert s["psnr"] == pytest.approx(25.5) and s["seed_spread"] == pytest.approx(1.0)
    assert s["psnr_determined"] == pytest.approx(28.5) and s["images_determined"] == 2
    assert s["psnr_clipped"] == pytest.approx(13.0) and s["images_clipped"] == 1
    assert s["images"] == 2 and s["seeds"] == 2
    text = evaluate.table([s])
    assert "1 of 2" in text and "2 of 2" in text


# ---- the command line -------------------------------------------------------------------------------------------

def test_consistency_on_and_off_side_by_side_with_regions_plot_and_figure(photos: Path, ckpt: Path,
                                                                          tmp_path: Path) -> None:
    report, plot, fig = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "maps.png"
    res = _invoke("--photos", photos, "--ckpt", ckpt, "--crop", 64, "--sampler", "ddim:2", "--consistency", "on",
                  "--consistency", "off", "--no-skip", "--json", report, "--plot", plot, "--figure", fig)
    assert res.exit_code == 0, res.output
    data = json.loads(report.read_text())
    labels = [s["label"] for s in data["summary"]]
    assert labels == [evaluate.CLOSED_FORM, evaluate.NAIVE, "ddim:2 [consistency on, no skip]",
                      "ddim:2 [consistency off]"]
    by = {s["label"]: s for s in data["summary"]}
    assert by[evaluate.CLOSED_FORM]["psnr"] > by[evaluate.NAIVE]["psnr"] + 5.0
    for s in data["summary"]:
        assert s["images"] == 2 and s["images_determined"] == 2 and s["images_clipped"] >= 1
        assert isinstance(s["psnr_determined"], float) and isinstance(s["psnr_clipped"], float)
    assert by["ddim:2 [consistency on, no skip]"]["consistent"] is True
    assert by["ddim:2 [consistency off]"]["consistent"] is False
    # the projection keeps an untrained model on the input's consistent set: close to the closed form where
    # determined, far above the same model unprojected
    on, off = by["ddim:2 [consistency on, no skip]"], by["ddim:2 [consistency off]"]
    assert on["psnr_determined"] > off["psnr_determined"] + 10.0
    assert on["psnr_determined"] > by[evaluate.CLOSED_FORM]["psnr_determined"] - 3.0
    rows = data["rows"]
    assert len(rows) == 2 * 4 and {"psnr_determined", "psnr_clipped", "consistency", "skip"} <= set(rows[0])
    assert data["consistency"] == ["on", "off"] and data["skip"] is False
    assert len(data["bands"]) == 2 and all(b is not None and 0.0 <= b <= 64.0 for b in data["bands"])
    assert data["figure"]["row"] == "ddim:2 [consistency on, no skip]" and data["figure"]["seed"] == 0
    for png in (plot, fig):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "determined" in res.output and "[consistency off]" in res.output


def test_existing_figure_is_refused_before_compute_unless_forced(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    fig = tmp_path / "maps.png"
    fig.write_bytes(b"keep me")
    res = _invoke("--photos", photos, "--ckpt", ckpt, "--crop", 64, "--sampler", "ddim:1", "--figure", fig)
    _one_error(res, "exists, not overwritten (use --force)")
    assert fig.read_bytes() == b"keep me"
    res = _invoke("--photos", photos, "--ckpt", ckpt, "--crop", 64, "--sampler", "ddim:1", "--figure", fig,
                  "--force")
    assert res.exit_code == 0, res.output
    assert fig.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("how", ["same name", "hard link", "the model"])
def test_a_report_that_is_an_input_is_refused_even_with_force(how: str, photos: Path, ckpt: Path,
                                                              tmp_path: Path) -> None:
    victim = ckpt if how == "the model" else photos / "p1.png"
    before = victim.read_bytes()
    target = victim
    if how == "hard link":
        target = tmp_path / "other-name.png"
        os.link(victim, target)
    for option in ("--figure", "--json"):
        res = _invoke("--photos", photos, "--ckpt", ckpt, "--crop", 64, "--sampler", "ddim:1", option, target,
                      "--force")
        _one_error(res, "is a file this run reads")
    assert victim.read_bytes() == before


def test_same_file_for_two_reports_is_refused(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    res = _invoke("--photos", photos, "--ckpt", ckpt, "--sampler", "ddim:1", "--plot", tmp_path / "a.png",
                  "--figure", tmp_path / "a.png")
    _one_error(res, "given as two reports")


def test_consistency_on_needs_a_model_with_an_isp(photos: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = save_checkpoint(UNet(TINY_CONFIG), tmp_path / "plain.safetensors")
    res = _invoke("--photos", photos, "--ckpt", plain, "--sampler", "ddim:1", "--consistency", "on")
    _one_error(res, "does not describe its ISP")


@pytest.mark.parametrize("args, needle", [(["--consistency", "sometimes"], "--consistency"),
                                          (["--ckpt", "/nonexistent/model.safetensors"], "no such checkpoint")])
def test_bad_options_are_one_line(args: list[str], needle: str, photos: Path) -> None:
    res = _invoke("--photos", photos, "--sampler", "ddim:1", *args)
    _one_error(res, needle)
