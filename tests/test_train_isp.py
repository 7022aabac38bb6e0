"""The ISP rawdiff-train writes into every model description (``ModelMeta.isp``): the synthetic camera's exact ISP,
LibRaw's render under the InvISP protocol (``fivek.libraw_isp``), and the fitted ISP for pairs whose renderer is
unknown (``isp_fit.fit_isp``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import generated_photos
import torch
from click.testing import CliRunner

from rawdiff_infer.camera import CAMERAS, get_camera
from rawdiff_infer.checkpoint import load_checkpoint, read_meta, save_checkpoint
from rawdiff_infer.isp import IspCurve, IspModel
from rawdiff_train import fivek
from rawdiff_train.camera_isp import IspRandomization, SyntheticCamera, described_camera, jpeg_roundtrip
from rawdiff_train.cli import cli, training_isp
from rawdiff_train.data import ImagePair, RawPairSource
from rawdiff_train.isp_fit import common_isp, fit_isp, isotonic, isp_close, isp_residual, isp_summary

DATA = Path(os.environ.get("RAWDIFF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
CANON = DATA / "raw" / "canon_eos550d_magiclantern_colorchart.dng"
WEIGHTS = Path(__file__).resolve().parents[1] / "rawdiff_infer" / "weights"

needs_rawpy = pytest.mark.skipif(importlib.util.find_spec("rawpy") is None,
                                 reason="rawpy is not installed (pip install 'rawdiff[raw]')")
needs_canon = pytest.mark.skipif(not CANON.is_file(), reason=f"{CANON} not available (shared/data/raw)")
FAST = ["--config", "tiny", "--batch-size", "2", "--variants", "1", "--val-count", "0", "--device", "cpu", "-q"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Small tensors on a busy 2-core machine: one intra-op thread is faster (see test_train_data)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _levels(x: torch.Tensor) -> np.ndarray:
    """[0, 1] values -> 8-bit levels 0..255 (float)."""
    return np.round(x.numpy() * 255.0)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic camera: the description's ISP is the camera's render
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CAMERAS))
def test_synthetic_isp_renders_exactly_like_the_camera(name: str) -> None:
    cam = SyntheticCamera(described_camera(CAMERAS[name]))
    raw = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1)) * 1.3  # some values saturate
    raw[:, :, :4] = 1.0
    isp = cam.isp_model()  # the default draws: raw_white 0.5 (gain 2, a power of two), tone 0.5
    assert (isp.gain, isp.curve.kind, isp.curve.tone, isp.bits, isp.clip) == (2.0, "srgb", 0.5, 8, 1.0)
    assert torch.equal(isp.render(raw), cam.render(raw, exposure=2.0, tone=0.5))  # bit for bit
    assert torch.equal(isp.render(raw, quantize=False), cam.render(raw, exposure=2.0, tone=0.5, quantize=False))
    # any other fixed ISP: the gain is no power of two, so fp32 rounds the product differently (1e-6)
    r = IspRandomization(raw_white=(0.7, 0.7), tone_strength=(0.3, 0.3))
    isp = cam.isp_model(r)
    a, b = isp.render(raw, quantize=False), cam.render(raw, exposure=1 / 0.7, tone=0.3, quantize=False)
    assert float((a - b).abs().max()) < 2e-6
    qa, qb = _levels(isp.render(raw)), _levels(cam.render(raw, exposure=1 / 0.7, tone=0.3))
    assert np.mean(qa != qb) < 1e-4 and np.abs(qa - qb).max() <= 1
    # and its closed form is the camera's inverse, where nothing is clipped
    srgb = cam.render(raw * 0.4, exposure=1 / 0.7, tone=0.3, quantize=False)
    back = cam.unprocess(srgb, exposure=1 / 0.7, tone=0.3)
    assert float((isp.closed_form(srgb) - back).abs().max()) < 2e-5
    # no single ISP when the gain or the tone is drawn per image
    assert cam.isp_model(IspRandomization(raw_white=(0.25, 1.0))) is None
    assert cam.isp_model(IspRandomization(tone_strength=(0.0, 1.0))) is None


def test_synthetic_training_pairs_are_rendered_by_the_stated_isp() -> None:
    """make_pair's sRGB input (no JPEG) is the ISP's render of its RAW target, with scene augmentation too."""
    from rawdiff_train.scene_aug import SceneAugmentation

    cam = SyntheticCamera(described_camera(get_camera("nikon-d700")))
    photos = torch.randint(0, 256, (3, 3, 40, 40), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    for aug in (None, SceneAugmentation()):
        srgb, raw = cam.make_pair(photos, 7, jpeg=False, augmentation=aug)
        assert torch.equal(srgb, cam.isp_model().render(raw))


def test_bundled_model_describes_its_synthetic_camera() -> None:
    meta = read_meta(WEIGHTS)
    assert meta.isp is not None
    assert isp_close(meta.isp, SyntheticCamera(meta.camera).isp_model())


# ---------------------------------------------------------------------------------------------------------------
# rawdiff-train writes it (and --resume keeps it)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small generated photos, no held-out names."""
    return generated_photos(tmp_path_factory.mktemp("photos"), 3)


def _latest(out: Path) -> Path:
    """The model file of a run folder's latest checkpoint."""
    return out / (out / "latest").read_text().strip() / "model.safetensors"


def _description_json(path: Path) -> dict:
    """A checkpoint file's description as the JSON object stored in its safetensors header."""
    from rawdiff_infer.checkpoint import _header

    return json.loads(_header(path)[1]["rawdiff"])


def test_train_cli_saves_the_isp_and_resume_keeps_it(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["--photos", str(photos), "--out", str(out), *FAST, "--steps", "1"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    expect = SyntheticCamera(described_camera(get_camera("nikon-d700"))).isp_model()
    ckpt = _latest(out)
    meta = read_meta(ckpt)
    assert meta.isp == expect  # exactly, through the JSON description
    assert IspModel.from_dict(_description_json(ckpt)["isp"]) == expect
    assert "synthetic camera" in meta.provenance["isp"]["source"]

    # a run folder from before ISP descriptions: --resume gives it this run's ISP
    net, old = load_checkpoint(ckpt)
    save_checkpoint(net, ckpt, meta=dataclasses.replace(old, isp=None), overwrite=True)
    assert read_meta(ckpt).isp is None
    r = CliRunner().invoke(cli, ["--photos", str(photos), "--out", str(out), *FAST, "--steps", "2", "--resume"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert read_meta(_latest(out)).isp == expect

    # another camera's ISP: refused before training, one line, exit 2, nothing written
    before = sorted(p.name for p in out.iterdir())
    r = CliRunner().invoke(cli, ["--photos", str(photos), "--out", str(out), *FAST, "--steps", "3", "--resume",
                                 "--camera", "canon-eos-5d"], catch_exceptions=False)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("rawdiff-train: error: --resume: this run's ISP") and "--camera" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == before


# ---------------------------------------------------------------------------------------------------------------
# fit_isp: an ISP from pairs whose renderer is unknown
# ---------------------------------------------------------------------------------------------------------------

def _random_scene(n: int, rng: np.random.Generator) -> np.ndarray:
    """About n linear RAW pixels as an image [h, 200, 3] of 8 x 8 patches (log-uniform brightness, varied colours,
    some saturated) with per-pixel texture: the spatial structure of a photo, which the matrix fit averages over."""
    h = max(8, n // 200 // 8 * 8)
    cells = (h // 8) * 25
    bright = np.exp(rng.uniform(np.log(1e-3), np.log(0.9), cells))
    colour = rng.dirichlet([3.0, 3.0, 3.0], cells) * 3.0
    base = (bright[:, None] * colour).reshape(h // 8, 25, 3)
    img = np.repeat(np.repeat(base, 8, axis=0), 8, axis=1)
    return np.clip(img * rng.uniform(0.6, 1.0, img.shape), 0, 1)


def _render_u8(isp: IspModel, raw: np.ndarray) -> np.ndarray:
    """``isp.render`` of an H x W x 3 linear RAW in [0, 1] -> H x W x 3 uint8."""
    out = isp.render(torch.from_numpy(np.ascontiguousarray(raw.transpose(2, 0, 1))))
    return np.round(out.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)


@pytest.mark.parametrize("curve", [IspCurve(kind="srgb", tone=0.6), IspCurve(kind="gamma", power=2.222, slope=4.5)])
def test_fit_isp_recovers_a_known_isp(curve: IspCurve) -> None:
    rng = np.random.default_rng(3)
    m = np.eye(3) + rng.normal(0.0, 0.25, (3, 3))
    m /= m.sum(axis=1, keepdims=True)
    truth = IspModel(gain=1.8, srgb_from_cam=tuple(m.ravel()), curve=curve)
    raw = _random_scene(100_000, rng)
    model, res = fit_isp(_render_u8(truth, raw), raw)
    assert res["rms_levels"] < 0.2 and res["psnr_db"] > 60.0, res  # the residual goes into the provenance
    assert res["pixels"] == raw.shape[0] * raw.shape[1] and res["block"] == 8
    assert 0 < res["blocks_matrix"] < res["pixels"] // 64
    assert res["pixels_white"] > 0
    a_fit = np.reshape(model.srgb_from_cam, (3, 3)) * model.gain
    assert np.abs(a_fit - 1.8 * m).max() < 0.01 * np.abs(1.8 * m).max()  # 1 % of the largest entry
    lut = np.asarray(model.curve.lut)
    assert model.curve.kind == "lut" and len(lut) == 1024 and np.all(np.diff(lut) > 0)
    assert lut[0] >= 0.0 and lut[-1] <= 1.0
    u = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)
    assert float((model.curve.forward(u) - curve.forward(u)).abs().max()) * 255 < 1.0
    fresh = rng.uniform(0.0, 0.6, (50, 40, 3))  # pixels it never saw
    assert isp_residual(model, _render_u8(truth, fresh), fresh)["rms_levels"] < 0.2


def test_fit_isp_with_noise_and_several_pairs() -> None:
    """JPEG-like noise (2 levels RMS) on two pairs of different sizes: the matrix still within 1 %, the residual
    that of the true ISP (the noise)."""
    rng = np.random.default_rng(4)
    m = np.array([[1.6, -0.5, -0.1], [-0.2, 1.5, -0.3], [0.0, -0.4, 1.4]])
    truth = IspModel(gain=1.3, srgb_from_cam=tuple(m.ravel()), curve=IspCurve(kind="srgb", tone=0.3))
    raws = [_random_scene(60_000, rng), _random_scene(40_000, rng)]
    noisy = [np.clip(_render_u8(truth, r) + rng.normal(0.0, 2.0, r.shape), 0, 255).astype(np.float64) / 255
             for r in raws]
    model, res = fit_isp(noisy, raws)
    assert res["rms_levels"] < isp_residual(truth, noisy, raws)["rms_levels"] + 0.05, res
    assert np.abs(np.reshape(model.srgb_from_cam, (3, 3)) * model.gain - 1.3 * m).max() < 0.02
    clean = np.abs(_render_u8(model, raws[0]).astype(float) - _render_u8(truth, raws[0]))
    assert np.sqrt(np.mean(clean ** 2)) < 0.4  # against the noise-free render


def test_fit_isp_refuses_unusable_data() -> None:
    raw = np.full((20, 20, 3), 0.5)
    with pytest.raises(ValueError, match="not aligned"):
        fit_isp(np.zeros((20, 21, 3), np.uint8), raw)
    with pytest.raises(ValueError, match="cannot fit an ISP: only 0 pixels"):
        fit_isp(np.full((20, 20, 3), 255, np.uint8), raw)
    with pytest.raises(ValueError, match="bits"):
        fit_isp(np.zeros((20, 20, 3), np.uint8), raw, bits=10)


def test_isotonic_and_comparisons() -> None:
    assert np.allclose(isotonic([1.0, 3.0, 2.0, 4.0]), [1.0, 2.5, 2.5, 4.0])
    assert np.allclose(isotonic([1.0, 3.0, 2.0], [1.0, 1.0, 3.0]), [1.0, 2.25, 2.25])
    assert np.allclose(isotonic([3.0, 2.0, 1.0]), [2.0, 2.0, 2.0])
    a = IspModel(gain=2.0, srgb_from_cam=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    b = dataclasses.replace(a, gain=2.0 + 1e-9)
    c = dataclasses.replace(a, gain=2.1)
    assert isp_close(a, b) and not isp_close(a, c) and isp_close(None, None) and not isp_close(a, None)
    assert common_isp([a, b, a]) is a and common_isp([a, c]) is None and common_isp([]) is None
    assert "gain 2" in isp_summary(a) and "\n" not in isp_summary(a)


# ---------------------------------------------------------------------------------------------------------------
# LibRaw / InvISP protocol
# ---------------------------------------------------------------------------------------------------------------

def test_ispcurve_gamma_is_libraws_curve() -> None:
    """IspCurve 'gamma' (2.222, 4.5) and LibRaw's gamma_curve (dcraw's bisection) are the same function."""
    r_b, a = fivek._dcraw_gamma(*fivek.LIBRAW_GAMMA)
    assert abs(r_b - 0.018) < 1e-3 and abs(a - 0.099) < 1e-3  # the BT.709 numbers
    r = np.linspace(0.0, 1.0, 100_001)
    libraw = np.where(r < r_b, 4.5 * r, (1 + a) * r ** (1 / 2.222) - a)
    ours = IspCurve(kind="gamma", power=2.222, slope=4.5).forward(torch.from_numpy(r)).numpy()
    assert np.abs(ours - libraw).max() < 1e-9
    # the exact table: rounding it gives LibRaw's 8-bit output floor(256 f) at its 16-bit values
    table = np.asarray(fivek.libraw_curve_table())
    assert len(table) == fivek.LIBRAW_LUT_SIZE and np.all(np.diff(table) > 0) and 0 <= table[0] and table[-1] <= 1
    v = np.arange(65536)
    want = np.minimum(np.floor(256 * np.where(v / 65536 < r_b, 4.5 * v / 65536,
                                              (1 + a) * (v / 65536) ** (1 / 2.222) - a)), 255)
    got = np.round(255 * np.interp((v + 1) / 65535, np.linspace(0, 1, len(table)), table))
    assert np.mean(got == want) > 0.999 and np.abs(got - want).max() <= 1


@pytest.fixture(scope="module")
def canon() -> tuple:
    """(pair without JPEG, the protocol's sRGB with JPEG 90 4:2:2) of the Canon 550D file."""
    if importlib.util.find_spec("rawpy") is None:
        pytest.skip("rawpy is not installed (pip install 'rawdiff[raw]')")
    if not CANON.is_file():
        pytest.skip(f"{CANON} not available (shared/data/raw)")
    pair = fivek.load_raw_pair(CANON, jpeg_quality=None)
    return pair, jpeg_roundtrip(pair.srgb, 90, subsampling=1)


@needs_rawpy
@needs_canon
def test_libraw_isp_of_a_real_file(canon: tuple) -> None:
    import rawpy

    pair, _ = canon
    isp = fivek.libraw_isp(CANON)
    with rawpy.imread(str(CANON)) as raw:
        cmatrix = np.asarray(raw.color_matrix, np.float64)[:, :3]
        assert fivek.libraw_isp(raw) == isp  # an open file gives the same, and stays usable
        assert raw.postprocess(half_size=True).shape[2] == 3
    # a DNG: LibRaw renders with the file's own matrix (measured, then matched exactly)
    assert np.array_equal(np.reshape(isp.srgb_from_cam, (3, 3)), cmatrix)
    assert (isp.gain, isp.clip, isp.bits, isp.curve.kind) == (1.0, 1.0, 8, "lut")  # green is the smallest mult
    assert pair.isp == isp and IspModel.from_dict(pair.metadata()["isp"]) == isp
    assert pair.cam_to_srgb == isp.srgb_from_cam
    gamma = fivek.libraw_isp(CANON, curve="gamma")
    assert gamma.curve == IspCurve(kind="gamma", power=2.222, slope=4.5) and gamma.srgb_from_cam == isp.srgb_from_cam
    with pytest.raises(ValueError, match="curve"):
        fivek.libraw_isp(CANON, curve="srgb")


@needs_rawpy
@needs_canon
def test_libraw_isp_reproduces_libraws_render() -> None:
    """On LibRaw's own linear RAW (same demosaicing), the ISP is LibRaw's render: only its integer truncations
    are left (measured: 0.05 levels RMS, 0.3 % of values one level off; the plain gamma curve: 0.57, 32 %)."""
    import rawpy

    kw = dict(use_camera_wb=True, no_auto_bright=True, adjust_maximum_thr=0.0, half_size=True)
    with rawpy.imread(str(CANON)) as raw:
        ref = raw.postprocess(output_bps=8, **kw)
        lin = raw.postprocess(output_bps=16, gamma=(1, 1), output_color=rawpy.ColorSpace.raw, **kw)
    lin = lin.astype(np.float64) / 65535
    exact, gamma = fivek.libraw_isp(CANON), fivek.libraw_isp(CANON, curve="gamma")
    r_exact = isp_residual(exact, ref, lin, max_pixels=10**7)
    r_gamma = isp_residual(gamma, ref, lin, max_pixels=10**7)
    print(f"LibRaw's own RAW: exact table {r_exact['rms_levels']:.3f} levels ({r_exact['psnr_db']:.1f} dB), "
          f"gamma curve {r_gamma['rms_levels']:.3f} ({r_gamma['psnr_db']:.1f} dB)")
    assert r_exact["rms_levels"] < 0.1 and r_gamma["rms_levels"] < 0.7
    assert r_exact["rms_levels"] < r_gamma["rms_levels"] / 5
    out = _render_u8(exact, lin)
    assert np.mean(out != ref) < 0.01 and np.abs(out.astype(int) - ref).max() <= 1


@needs_rawpy
@needs_canon
def test_libraw_isp_on_the_raw_target(canon: tuple) -> None:
    """render(raw target) against the protocol's sRGB: what is left is AHD vs bilinear demosaicing (measured
    42.0 dB) and the JPEG round trip (38.3 dB together)."""
    pair, protocol = canon
    isp = fivek.libraw_isp(CANON)
    plain = isp_residual(isp, pair.srgb, pair.raw_linear, max_pixels=10**7)
    jpeg = isp_residual(isp, protocol, pair.raw_linear, max_pixels=10**7)
    print(f"Canon 550D, render(raw target): {plain['psnr_db']:.2f} dB against LibRaw's 8-bit render, "
          f"{jpeg['psnr_db']:.2f} dB against the protocol's sRGB (JPEG 90)")
    assert 40.0 < plain["psnr_db"] < 45.0 and 36.0 < jpeg["psnr_db"] < plain["psnr_db"]
    # the fallback for files that disagree, on this pair: as close as the true ISP, and near its matrix
    fitted, res = fit_isp(protocol, pair.raw_linear, max_pixels=300_000)
    print(f"fit_isp on it: {res['psnr_db']:.2f} dB")
    assert res["psnr_db"] > jpeg["psnr_db"] - 0.3
    a = np.reshape(fitted.srgb_from_cam, (3, 3)) * fitted.gain
    assert np.abs(a - np.reshape(isp.srgb_from_cam, (3, 3))).max() < 0.15


@needs_rawpy
@needs_canon
def test_training_isp_of_raw_pairs(canon: tuple, tmp_path: Path) -> None:
    pair, _ = canon
    src = RawPairSource([CANON], cache=tmp_path / "cache")
    pairs = [src[0]]
    isp, prov = training_isp(False, pairs, None)
    assert isp == fivek.libraw_isp(CANON) and "LibRaw" in prov["source"] and 35.0 < prov["psnr_db"] < 45.0
    # a pair cached before the ISP was stored: taken from the file
    old = ImagePair(srgb=pairs[0].srgb, raw=pairs[0].raw, name="old", meta={**pairs[0].meta, "isp": None})
    assert training_isp(False, [old], None)[0] == isp


def test_training_isp_fits_when_the_files_disagree() -> None:
    """Two files whose LibRaw renders differ (another gain): one ISP is fitted to all the pairs."""
    rng = np.random.default_rng(5)
    truth = IspModel(gain=1.0, srgb_from_cam=(1.5, -0.4, -0.1, -0.2, 1.4, -0.2, 0.0, -0.3, 1.3),
                     curve=IspCurve(kind="gamma", power=2.222, slope=4.5))
    pairs = []
    for i, gain in enumerate((1.0, 1.2)):
        raw = _random_scene(40_000, rng).astype(np.float32)
        meta = {"path": f"f{i}.dng", "isp": dataclasses.replace(truth, gain=gain).to_dict()}
        pairs.append(ImagePair(srgb=_render_u8(truth, raw).astype(np.float32) / 255, raw=raw, name=f"f{i}",
                               meta=meta))
    isp, prov = training_isp(False, pairs, None)
    assert "fitted" in prov["source"] and prov["rms_levels"] < 0.2 and prov["psnr_db"] > 60
    assert isp.curve.kind == "lut" and np.all(np.diff(isp.curve.lut) > 0)
