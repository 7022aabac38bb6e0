"""Training data side: synthetic camera, InvISP/FiveK pairs, cache, crops (rawdiff_train)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rawdiff_infer.camera import CAMERAS
from rawdiff_infer.rawspace import RawEncoding
from rawdiff_train import camera_isp, data, fivek
from rawdiff_train.camera_isp import IspParams, IspRandomization, SyntheticCamera

DATA = Path(os.environ.get("RAWDIFF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
PHOTOS = DATA / "photos"
RAWS = DATA / "raw"
CANON = RAWS / "canon_eos550d_magiclantern_colorchart.dng"
LINEAR_DNG = RAWS / "lg_h815_linearraw_lossy_600x338.dng"
GPR = RAWS / "gopro_hero6_GOPR0024_unsupported_by_rawpy.GPR"

needs_photos = pytest.mark.skipif(not PHOTOS.is_dir(), reason="shared/data/photos not available")
needs_raws = pytest.mark.skipif(not CANON.is_file(), reason="shared/data/raw not available")
PHOTO_NAMES = ["kodim03.png", "kodim05.png", "kodim13.png", "skimage_coffee.png", "skimage_rocket.jpg"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tensors are tiny: with intra-op threads on a busy 2-core machine each op waits on its pool (seen:
    600 ms instead of 5 ms per pair). One thread for this module, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _photo(name: str, size: int = 128) -> np.ndarray:
    im = np.asarray(Image.open(PHOTOS / name).convert("RGB"))
    h, w = im.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(im[y:y + size, x:x + size])


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic camera
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CAMERAS))
def test_cam_to_srgb_keeps_white(name):
    cam = SyntheticCamera(CAMERAS[name])
    ones = torch.ones(3)
    assert torch.allclose(cam.matrix("srgb_from_cam") @ ones, ones, atol=1e-5)
    assert torch.allclose(cam.matrix("cam_from_srgb") @ ones, ones, atol=1e-5)
    # a grey RAW renders grey, and camera white renders sRGB white
    grey = torch.full((1, 3, 4, 4), 0.18)
    out = cam.render(grey, quantize=False)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)
    assert torch.allclose(cam.render(torch.ones(1, 3, 2, 2)), torch.ones(1, 3, 2, 2))
    # the matrix is not the identity: saturated camera primaries do change
    assert not torch.allclose(cam.matrix("srgb_from_cam"), torch.eye(3), atol=0.05)


def test_curves_invert():
    x = torch.linspace(0, 1, 20001)
    assert torch.allclose(camera_isp.srgb_to_linear(camera_isp.linear_to_srgb(x)), x, atol=2e-6)
    assert abs(float(camera_isp.linear_to_srgb(torch.tensor(0.5))) - 0.735357) < 1e-5
    for k in (0.0, 1e-4, 0.3, 0.7, 1.0):
        y = camera_isp.tone_curve(x, k)
        assert torch.all(y[1:] >= y[:-1])  # monotonic
        assert torch.allclose(camera_isp.tone_curve(camera_isp.inverse_tone_curve(y, k), k), y, atol=1e-6)
        if k < 1.0:
            assert torch.allclose(camera_isp.inverse_tone_curve(y, k), x, atol=1e-5)
    # k = 1 is Brooks et al.'s smoothstep and its closed-form inverse
    brooks = 0.5 - torch.sin(torch.asin(1.0 - 2.0 * x.double()) / 3.0)
    assert torch.allclose(camera_isp.inverse_tone_curve(x, 1.0).double(), brooks, atol=2e-6)
    # per-image strengths broadcast over a batch
    batch = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([0.2, 0.9]).view(2, 1, 1, 1)
    assert torch.allclose(camera_isp.inverse_tone_curve(camera_isp.tone_curve(batch, k), k), batch, atol=1e-4)


@needs_photos
@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_make_pair_is_isp_of_target_without_jpeg(name):
    cam = SyntheticCamera()
    photo = _photo(name)
    r = IspRandomization(jpeg_probability=0.0)
    for seed in range(3):
        srgb, raw, params = cam.make_pair(photo, seed, randomization=r, return_params=True)
        assert srgb.shape == raw.shape == photo.shape and srgb.dtype == raw.dtype == np.float32
        assert 0.0 <= raw.min() and raw.max() <= 1.0 and 0.0 <= srgb.min() and srgb.max() <= 1.0
        assert np.allclose(srgb * 255.0, np.round(srgb * 255.0), atol=1e-3)  # 8-bit levels
        again = cam.render(_chw(raw), exposure=params.exposure, tone=params.tone)[0].permute(1, 2, 0).numpy()
        assert np.abs(again - srgb).max() <= 1.0 / 255.0 + 1e-6
        assert params.jpeg_quality == (None,)


@needs_photos
@pytest.mark.parametrize("name", PHOTO_NAMES[:3])
def test_make_pair_with_jpeg_stays_close_to_isp_of_target(name):
    cam = SyntheticCamera()
    photo = _photo(name)
    r = IspRandomization(jpeg_probability=1.0, jpeg_quality=(70, 98))
    srgb, raw, params = cam.make_pair(photo, 5, randomization=r, return_params=True)
    q = params.jpeg_quality[0]
    assert q is not None and 70 <= q <= 98
    again = cam.render(_chw(raw), exposure=params.exposure, tone=params.tone)[0].permute(1, 2, 0).numpy()
    assert not np.array_equal(again, srgb)  # JPEG really ran
    assert _psnr(again, srgb) > 30.0


@needs_photos
@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_unprocess_then_render_reproduces_the_photo(name):
    cam = SyntheticCamera()
    photo = _chw(_photo(name))
    unit = photo.float() / 255.0
    for exposure, tone in ((1.0, 0.0), (2.5, 0.5), (4.0, 1.0)):
        raw_free = cam.unprocess(photo, exposure=exposure, tone=tone, clip=False)
        inside = ((raw_free >= 0) & (raw_free <= 1)).all(dim=1, keepdim=True).expand_as(unit)
        # Saturated dark colours with a channel near 0 need slightly negative camera RGB (clipped); kodim13 and
        # the rocket crop have none, kodim03's crop has 30 % at exposure 1 (its red and blue hats).
        if name in ("kodim13.png", "skimage_rocket.jpg"):
            assert bool(inside.all())
        assert inside.float().mean() > 0.6
        back = cam.render(cam.unprocess(photo, exposure=exposure, tone=tone), exposure=exposure, tone=tone)
        err = (back - unit).abs()[inside]
        assert err.max() <= 1.0 / 255.0 + 1e-6
        assert (err < 1e-6).float().mean() > 0.99  # almost every value comes back exactly


@needs_photos
def test_unprocess_round_trip_exact_on_an_in_gamut_image():
    cam = SyntheticCamera()
    rng = np.random.default_rng(0)
    raw = torch.from_numpy(rng.uniform(0.05, 0.2, size=(1, 3, 32, 32)).astype(np.float32))
    srgb = cam.render(raw, exposure=3.0, tone=0.8)
    assert srgb.max() < 1.0  # nothing clips
    assert torch.equal(cam.render(cam.unprocess(srgb, exposure=3.0, tone=0.8), exposure=3.0, tone=0.8), srgb)


@needs_photos
def test_highlights_clip_when_overexposed():
    cam = SyntheticCamera()
    photo = _photo("kodim03.png", 192)
    hot = IspRandomization(highlight_probability=1.0, clip_fraction=(0.03, 0.05), jpeg_probability=0.0)
    srgb, raw, params = cam.make_pair(photo, 1, randomization=hot, return_params=True)
    assert float(params.overexposure[0]) > 1.0
    clipped_srgb = (srgb >= 1.0).any(axis=2)
    detail_in_raw = (raw < 0.999).all(axis=2)
    frac = float((clipped_srgb & detail_in_raw).mean())
    assert 0.01 < frac < 0.2, frac  # clipped in sRGB, not in RAW: about the requested fraction
    # the RAW keeps gradations where the sRGB is flat white
    assert np.unique(np.round(raw[clipped_srgb & detail_in_raw][:, 1], 4)).size > 10

    cold = IspRandomization(highlight_probability=0.0, jpeg_probability=0.0)
    srgb0, raw0, p0 = cam.make_pair(photo, 1, randomization=cold, return_params=True)
    assert float(p0.overexposure[0]) == pytest.approx(1.0)
    photo_clipped = float((photo >= 255).any(axis=2).mean())
    assert float((srgb0 >= 1.0).any(axis=2).mean()) <= photo_clipped + 0.002


@needs_photos
def test_make_pair_deterministic_and_batch_path_matches():
    cam = SyntheticCamera(CAMERAS["canon-eos-5d"])
    photos = np.stack([_photo(n, 64) for n in PHOTO_NAMES[:3]])
    a = cam.make_pair(photos[0], 11, return_params=True)
    b = cam.make_pair(photos[0], 11, return_params=True)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = cam.make_pair(photos[0], 12, return_params=True)
    assert float(c[2].overexposure[0]) != float(a[2].overexposure[0]) or c[2].jpeg_quality != a[2].jpeg_quality

    batch = torch.from_numpy(photos).permute(0, 3, 1, 2)
    s, r, p = cam.make_pair(batch, torch.Generator().manual_seed(3), return_params=True)
    assert s.shape == r.shape == (3, 3, 64, 64) and p.exposure.shape == (3,)
    for i in range(3):
        one = IspParams(p.exposure[i:i + 1], p.raw_white[i:i + 1], p.tone[i:i + 1], (None,),
                        scene_gain=p.overexposure[i:i + 1])
        s1, r1 = cam.make_pair(photos[i], params=one)
        assert np.allclose(r[i].permute(1, 2, 0).numpy(), r1, atol=1e-6)
        assert np.allclose(s[i].permute(1, 2, 0).numpy(), s1, atol=1e-6)
    # JPEG on the batched path only when asked
    sj, _ = cam.make_pair(batch, params=IspParams.fixed(3, exposure=2.0, raw_white=0.5, tone=0.3,
                                                         jpeg_quality=80), jpeg=True)
    sn, _ = cam.make_pair(batch, params=IspParams.fixed(3, exposure=2.0, raw_white=0.5, tone=0.3,
                                                         jpeg_quality=80))
    assert not torch.equal(sj, sn) and _psnr(sj.numpy(), sn.numpy()) > 30


def test_randomization_validates():
    with pytest.raises(ValueError):
        IspRandomization(tone_strength=(0.0, 1.5))
    with pytest.raises(ValueError):
        IspRandomization(raw_white=(0.0, 1.0))
    with pytest.raises(ValueError):
        IspRandomization(jpeg_quality=(50, 120))


# ---------------------------------------------------------------------------------------------------------------
# InvISP / FiveK protocol on a real RAW file
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def canon_pair():
    pytest.importorskip("rawpy")
    if not CANON.is_file():
        pytest.skip("shared/data/raw not available")
    return fivek.load_raw_pair(CANON)


def _bt709(x: np.ndarray) -> np.ndarray:
    """LibRaw's default output curve, gamma (2.222, 4.5) (BT.709-shaped)."""
    return np.where(x < 0.018, 4.5 * x, 1.099 * np.clip(x, 0.018, 1.0) ** 0.45 - 0.099)


def test_canon_pair_shape_levels_metadata(canon_pair):
    p = canon_pair
    assert p.srgb.shape == (1156, 1734, 3) and p.srgb.dtype == np.uint8  # visible area, flip 0
    assert p.raw_linear.shape == (1156, 1734, 3) and p.raw_linear.dtype == np.float32
    assert 0.0 <= float(p.raw_linear.min()) and float(p.raw_linear.max()) <= 1.0
    # black level really subtracted: without it the darkest values would sit near 2056 / 15000 = 0.137
    assert float(p.raw_linear.min()) == 0.0
    assert float(np.percentile(p.raw_linear, 0.5)) < 0.003
    assert float(np.median(p.raw_linear[..., 1])) < 0.1
    assert (p.make, p.model) == ("Canon", "Canon EOS Kiss X4")
    assert p.cfa_pattern == "RGGB" and p.black_levels == (2056,) * 4 and p.white_level == 15000
    assert p.flip == 0 and p.wb == "camera" and p.jpeg_quality == 90
    assert p.wb_multipliers[1] == 1.0 and p.wb_multipliers == pytest.approx((2.477, 1.0, 1.694), abs=2e-3)
    assert len(p.cam_to_srgb) == 9 and np.allclose(np.reshape(p.cam_to_srgb, (3, 3)).sum(1), 1.0, atol=1e-3)
    cam = p.camera()  # usable by the synthetic camera / DNG writer: its matrix keeps white
    assert (cam.make, cam.cfa_pattern, cam.black_level, cam.white_level) == ("Canon", "RGGB", 2056, 15000)
    assert np.allclose(SyntheticCamera(cam).matrix("srgb_from_cam").numpy(), np.reshape(p.cam_to_srgb, (3, 3)),
                       atol=1e-4)  # derived XYZ->cam matrix gives back LibRaw's render matrix
    assert p.metadata()["camera_description"] == cam.to_dict()
    # at every photosite the measured sample is kept, in the channel of the file's own CFA (G2 = index 3 -> G)
    rawpy = pytest.importorskip("rawpy")
    with rawpy.imread(str(CANON)) as r:
        vis = r.raw_image_visible.astype(np.float64)
        col = r.raw_colors_visible.copy()
    expect = np.clip((vis - 2056.0) / (15000.0 - 2056.0), 0, 1)
    mult = np.asarray(p.wb_multipliers)[np.where(col == 3, 1, col)]
    expect = np.clip(expect * mult, 0, 1)
    got = np.take_along_axis(p.raw_linear, np.where(col == 3, 1, col)[..., None], axis=2)[..., 0]
    assert np.abs(got - expect).max() < 1e-5
    assert set(np.unique(col).tolist()) == {0, 1, 2, 3}


def test_canon_raw_target_rerenders_to_the_srgb_target(canon_pair):
    """Matrix (LibRaw's cam->sRGB for this file), clip, gamma: the RAW target must look like the sRGB target.

    Measured: 38.3 dB with LibRaw's BT.709-shaped curve (what rawpy's render uses; the rest is AHD vs bilinear
    demosaicing and JPEG 90), 25.1 dB with the sRGB OETF (a different curve). The scene is out of focus, so
    a 1-pixel shift costs only about 1 dB; the unshifted pair must still be the best (alignment check).
    """
    p = canon_pair
    m = np.reshape(p.cam_to_srgb, (3, 3))
    lin = np.clip(p.raw_linear.astype(np.float64) @ m.T, 0.0, 1.0)
    target = p.srgb.astype(np.float64) / 255.0
    psnr_709 = _psnr(np.round(_bt709(lin) * 255) / 255, target)
    srgb_curve = camera_isp.linear_to_srgb(torch.from_numpy(lin)).numpy()
    psnr_srgb = _psnr(np.round(srgb_curve * 255) / 255, target)
    print(f"Canon 550D re-render PSNR: {psnr_709:.2f} dB (BT.709 curve), {psnr_srgb:.2f} dB (sRGB OETF)")
    assert psnr_709 > 35.0
    assert psnr_srgb > 22.0
    out = np.round(_bt709(lin) * 255) / 255
    h, w = target.shape[:2]
    centre = _psnr(out[1:h - 1, 1:w - 1], target[1:h - 1, 1:w - 1])
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1)):
        shifted = _psnr(out[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx], target[1:h - 1, 1:w - 1])
        assert shifted < centre - 0.5, (dy, dx, shifted, centre)


@needs_raws
def test_orient_matches_libraw():
    rawpy = pytest.importorskip("rawpy")
    kw = dict(use_camera_wb=True, no_auto_bright=True, output_bps=8, half_size=True)
    with rawpy.imread(str(CANON)) as r:
        base = r.postprocess(user_flip=0, **kw)
    for flip in (3, 5, 6):
        with rawpy.imread(str(CANON)) as r:
            ref = r.postprocess(user_flip=flip, **kw)
        assert np.array_equal(fivek.orient(base, flip), ref), flip


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_demosaic_bilinear_is_exact_on_planes(pattern):
    letters = {"R": 0, "G": 1, "B": 2}
    cell = np.array([letters[c] for c in pattern]).reshape(2, 2)
    h, w = 12, 16
    colors = np.tile(cell, (h // 2, w // 2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    planes = np.stack([0.01 * yy + 0.02 * xx, 0.3 + 0.005 * xx, 0.9 - 0.01 * yy], axis=-1)  # linear in x, y
    mosaic = np.take_along_axis(planes, colors[..., None], axis=2)[..., 0]
    out = fivek.demosaic_bilinear(mosaic, colors)
    assert out.shape == (h, w, 3)
    assert np.allclose(out[1:-1, 1:-1], planes[1:-1, 1:-1], atol=1e-5)  # bilinear is exact on linear ramps
    assert np.array_equal(np.take_along_axis(out, colors[..., None], axis=2)[..., 0], mosaic)  # samples kept
    flat = fivek.demosaic_bilinear(np.full((h, w), 0.25, np.float32), colors)
    assert np.allclose(flat, 0.25)  # borders too


@needs_raws
@pytest.mark.parametrize("path, match", [
    (LINEAR_DNG, "not a colour-filter-array RAW"),
    (GPR, "not a RAW file this LibRaw build can decode"),
])
def test_clear_errors_for_unusable_files(path, match):
    pytest.importorskip("rawpy")
    with pytest.raises(fivek.RawFileError, match=match) as e:
        fivek.load_raw_pair(path)
    assert "\n" not in str(e.value) and path.name in str(e.value)


def test_clear_errors_for_text_and_missing_files(tmp_path):
    pytest.importorskip("rawpy")
    text = tmp_path / "notes.dng"
    text.write_text("not a raw file\n" * 100)
    with pytest.raises(fivek.RawFileError, match="notes.dng") as e:
        fivek.load_raw_pair(text)
    assert "\n" not in str(e.value)
    with pytest.raises(fivek.RawFileError, match="no such file"):
        fivek.load_raw_pair(tmp_path / "missing.dng")
    with pytest.raises(ValueError):
        fivek.load_raw_pair(text, wb="auto")


def test_split_files_deterministic():
    files = [f"/data/a{i:04d}-x.dng" for i in range(100)]
    train, test = fivek.split_files(files, test_fraction=0.15, seed=0)
    assert len(test) == 15 and len(train) == 85 and not set(train) & set(test)
    assert set(train) | set(test) == {Path(f) for f in files}
    again = fivek.split_files(list(reversed(files)), test_fraction=0.15, seed=0)
    assert again == (train, test)  # independent of the order given
    other = fivek.split_files(files, test_fraction=0.15, seed=1)
    assert other[1] != test


def test_read_list_file_accepts_invisp_formats(tmp_path):
    lst = tmp_path / "NIKON_D700_test.txt"
    lst.write_bytes(b"a4331-_DGW0241\r\na0433-dgw_008\n\n# a comment\n  a3928-_DSC6415  \n"
                    b"https://data.csail.mit.edu/graphics/fivek/img/dng/a2754-_DSC7455.dng\n"
                    b"NIKON_D700/RAW/a0002-dgw_005.npz\na0433-dgw_008\n")
    names = fivek.read_list_file(lst)
    assert names == ["a4331-_DGW0241", "a0433-dgw_008", "a3928-_DSC6415", "a2754-_DSC7455", "a0002-dgw_005"]
    files = [tmp_path / f"{n}.dng" for n in ("a0433-dgw_008", "a2754-_DSC7455", "zzz")]
    assert fivek.select_by_stem(files, ["a2754-_DSC7455", "a0433-dgw_008"]) == [files[1], files[0]]
    with pytest.raises(FileNotFoundError):
        fivek.select_by_stem(files, names)
    assert fivek.select_by_stem(files, names, missing="skip") == [files[0], files[1]]


# ---------------------------------------------------------------------------------------------------------------
# Cache and sources
# ---------------------------------------------------------------------------------------------------------------

@needs_raws
def test_pair_cache_serves_second_load_and_invalidates_on_change(tmp_path, monkeypatch, canon_pair):
    copy = tmp_path / "raw" / "canon.dng"
    copy.parent.mkdir()
    shutil.copyfile(CANON, copy)
    calls = []
    real = fivek.load_raw_pair

    def counting(path, **kw):
        calls.append(Path(path))
        return real(path, **kw)

    monkeypatch.setattr(fivek, "load_raw_pair", counting)
    cache_dir = tmp_path / "cache"
    src = data.RawPairSource(copy.parent, cache=cache_dir)
    assert len(src) == 1

    first = src[0]
    assert len(calls) == 1 and src.cache.misses == 1
    second = src[0]
    assert len(calls) == 1 and src.cache.hits == 1
    assert np.array_equal(first.srgb, second.srgb) and np.array_equal(first.raw, second.raw)
    assert first.srgb.dtype == first.raw.dtype == np.float32 and first.name == "canon"
    assert np.array_equal(np.round(first.srgb * 255).astype(np.uint8), canon_pair.srgb)
    enc = RawEncoding()
    assert np.abs(enc.encode(first.raw) - enc.encode(canon_pair.raw_linear)).max() < 2e-5
    entries = list(cache_dir.glob("*/*"))
    assert len(entries) == 1 and entries[0].suffix == ".npz"  # no temporary files left

    # a new cache object over the same folder (another process, next epoch) is served too
    src2 = data.RawPairSource([copy], cache_dir=cache_dir)
    src2[0]
    assert len(calls) == 1 and src2.cache.hits == 1
    # other protocol parameters are another entry
    other = data.RawPairSource([copy], cache=cache_dir, jpeg_quality=None)
    assert other.cache.entry(copy, other.params) != src.cache.entry(copy, src.params)

    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    src[0]
    assert len(calls) == 2 and src.cache.misses == 2

    srgb_u8, raw_u16, meta = src.load_encoded(0)
    assert srgb_u8.dtype == np.uint8 and raw_u16.dtype == np.uint16 and meta["cfa_pattern"] == "RGGB"


@needs_photos
def test_photo_pair_source(tmp_path):
    for n in PHOTO_NAMES[:2]:
        Image.fromarray(_photo(n, 96)).save(tmp_path / f"{Path(n).stem}.png")
    (tmp_path / "readme.txt").write_text("not a photo")
    src = data.PhotoPairSource(tmp_path, seed=7)
    assert len(src) == 2
    a = src[1]
    assert a.srgb.shape == a.raw.shape == (96, 96, 3) and a.name == src.files[1].stem
    assert np.array_equal(src[1].raw, a.raw)  # reproducible
    src.set_epoch(1)
    assert not np.array_equal(src[1].raw, a.raw)  # a new draw each epoch
    assert {"exposure", "raw_white", "tone", "jpeg_quality"} <= set(a.meta)


# ---------------------------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------------------------

def _coordinate_image(h: int, w: int, tag: float = 0.5) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([yy / 255.0, xx / 255.0, torch.full((h, w), tag)]).float()


def _decode_coords(model: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    unit = (model + 1.0) / 2.0
    return torch.round(unit[:, 0] * 255).long(), torch.round(unit[:, 1] * 255).long()


def test_random_crops_identical_transform_shapes_determinism():
    h, w, p, n = 50, 70, 8, 64
    img = _coordinate_image(h, w)
    s, r = data.random_crops(img, img.clone(), n, patch=p, generator=torch.Generator().manual_seed(0),
                             raw_space="encoded")
    assert s.shape == r.shape == (n, 3, p, p) and s.dtype == torch.float32
    assert torch.equal(s, r)  # the same crop, flip and rotation for both
    ys, xs = _decode_coords(s)
    seen = set()
    for k in range(n):
        y, x = ys[k], xs[k]
        assert y.max() - y.min() == p - 1 and x.max() - x.min() == p - 1 and y.max() < h and x.max() < w
        block = {(int(a), int(b)) for a, b in zip(y.flatten(), x.flatten())}
        assert len(block) == p * p  # a whole p x p window, each pixel once
        # a dihedral transform: the first row runs along one axis, the first column along the other
        dy, dx = int(y[0, 1] - y[0, 0]), int(x[0, 1] - x[0, 0])
        ey, ex = int(y[1, 0] - y[0, 0]), int(x[1, 0] - x[0, 0])
        seen.add((dy, dx, ey, ex))
        assert abs(dy) + abs(dx) == 1 and abs(ey) + abs(ex) == 1 and (dy == 0) != (ey == 0)
    assert len(seen) == 8  # all 8 flips / rotations occur

    s2, _ = data.random_crops(img, img, n, patch=p, generator=torch.Generator().manual_seed(0),
                              raw_space="encoded")
    assert torch.equal(s, s2)
    s3, _ = data.random_crops(img, img, n, patch=p, generator=torch.Generator().manual_seed(1),
                              raw_space="encoded")
    assert not torch.equal(s, s3)

    s4, _ = data.random_crops(img, img, 16, patch=p, generator=torch.Generator().manual_seed(0), augment=False,
                              raw_space="encoded")
    ys, xs = _decode_coords(s4)
    assert torch.equal(ys - ys[:, :1, :1], torch.arange(p).view(1, p, 1).expand(16, p, p))
    assert torch.equal(xs - xs[:, :1, :1], torch.arange(p).view(1, 1, p).expand(16, p, p))


def test_random_crops_model_space_dtypes_and_batches():
    enc = RawEncoding()
    srgb = torch.full((3, 20, 20), 200, dtype=torch.uint8)
    raw = torch.full((3, 20, 20), 0.25)
    s, r = data.random_crops(srgb, raw, 4, patch=16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(s, torch.full_like(s, 200 / 255 * 2 - 1))
    assert torch.allclose(r, torch.full_like(r, 0.25 ** (1 / 2.2) * 2 - 1))
    u16 = torch.from_numpy(np.full((20, 20, 3), 30000, np.uint16))
    _, r16 = data.random_crops(srgb.permute(1, 2, 0).numpy(), u16.numpy(), 2, patch=16, raw_space="encoded")
    assert torch.allclose(r16, torch.full_like(r16, 30000 / 65535 * 2 - 1))
    assert float(r.min()) >= -1 and float(r.max()) <= 1 and enc.gamma == 2.2
    # a batch of images: each crop comes from one image, the same for both tensors
    batch = torch.stack([_coordinate_image(30, 30, tag) for tag in (0.1, 0.6, 0.9)])
    s, r = data.random_crops(batch, batch, 32, patch=8, generator=torch.Generator().manual_seed(2),
                             raw_space="encoded")
    tags = ((s[:, 2] + 1) / 2)
    assert torch.equal(s, r)
    assert torch.all(tags.amax(dim=(1, 2)) == tags.amin(dim=(1, 2)))
    assert len({round(float(t), 3) for t in tags[:, 0, 0]}) == 3
    with pytest.raises(ValueError):
        data.random_crops(batch, batch[:, :, :20], 2, patch=8)
    with pytest.raises(ValueError):
        data.random_crops(batch, batch, 2, patch=64)


@needs_photos
def test_synthetic_crops():
    photos = torch.from_numpy(np.stack([_photo(n, 96) for n in PHOTO_NAMES[:2]])).permute(0, 3, 1, 2)
    s, r = data.synthetic_crops(photos, 8, patch=32, generator=torch.Generator().manual_seed(0))
    assert s.shape == r.shape == (8, 3, 32, 32)
    assert float(s.min()) >= -1 and float(s.max()) <= 1 and float(r.min()) >= -1 and float(r.max()) <= 1
    s2, r2 = data.synthetic_crops(photos, 8, patch=32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, s2) and torch.equal(r, r2)


# ---------------------------------------------------------------------------------------------------------------
# The same on a GPU
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    cam = SyntheticCamera()
    g = torch.Generator().manual_seed(9)  # smooth colourful images with bright spots (no shared data needed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 128), torch.linspace(0, 1, 128), indexing="ij")
    base = torch.stack([yy, xx, 1 - 0.5 * (yy + xx)])[None] * torch.rand(5, 3, 1, 1, generator=g) * 1.3
    photos = torch.round((base + 0.05 * torch.rand(5, 3, 128, 128, generator=g)).clamp(0, 1) * 255).to(torch.uint8)
    r = IspRandomization(jpeg_probability=0.0, highlight_probability=1.0)
    s_cpu, raw_cpu, p_cpu = cam.make_pair(photos, torch.Generator().manual_seed(0), randomization=r,
                                          return_params=True)
    s_gpu, raw_gpu, p_gpu = cam.make_pair(photos.cuda(), torch.Generator().manual_seed(0), randomization=r,
                                          return_params=True)
    assert s_gpu.is_cuda and raw_gpu.is_cuda
    assert torch.allclose(p_cpu.exposure, p_gpu.exposure, rtol=1e-5)
    assert torch.allclose(raw_gpu.cpu(), raw_cpu, atol=1e-5)
    diff = (s_gpu.cpu() - s_cpu).abs()
    assert diff.max() <= 1 / 255 + 1e-6 and (diff > 1e-6).float().mean() < 1e-3  # rounding ties only
    again = cam.render(raw_gpu, exposure=p_gpu.exposure, tone=p_gpu.tone)
    assert (again - s_gpu).abs().max() <= 1 / 255 + 1e-6
    sj, _ = cam.make_pair(photos.cuda(), params=IspParams.fixed(5, exposure=2, raw_white=0.5, jpeg_quality=85),
                          jpeg=True)
    assert sj.is_cuda

    img = torch.stack([_coordinate_image(60, 80, t) for t in (0.2, 0.7)])
    u8 = torch.round(img * 255).to(torch.uint8)
    u16 = torch.round(img * 65535).to(torch.int32).to(torch.uint16)
    for a, b in ((img, img), (u8, u16)):
        c = data.random_crops(a, b, 32, patch=16, generator=torch.Generator().manual_seed(4), raw_space="encoded")
        g = data.random_crops(a.cuda(), b.cuda(), 32, patch=16, generator=torch.Generator().manual_seed(4),
                              raw_space="encoded")
        # the same crops; values equal up to float rounding (CUDA divides by a scalar via its reciprocal)
        assert g[0].is_cuda and torch.allclose(g[0].cpu(), c[0], atol=1e-6, rtol=0)
        assert torch.allclose(g[1].cpu(), c[1], atol=1e-6, rtol=0)
    sc, rc = data.synthetic_crops(photos.cuda(), 64, patch=64, generator=torch.Generator().manual_seed(1))
    assert sc.is_cuda and sc.shape == (64, 3, 64, 64) and rc.is_cuda


def test_camera_isp_is_fixed_so_the_raw_is_recoverable_from_the_srgb() -> None:
    """One camera, one ISP: gain and tone curve are the same for every draw; only the scene (exposure, hence
    clipping) and the JPEG quality vary. So, away from clipped pixels, inverting the camera's ISP on the sRGB
    input recovers the RAW target whatever the draw (the learning problem is well posed)."""
    cam = SyntheticCamera()
    photo = _photo(PHOTO_NAMES[0], 64)
    draws = [cam.make_pair(photo, seed, jpeg=False, return_params=True) for seed in range(6)]
    gains = {float(p.exposure[0]) for _, _, p in draws}
    tones = {float(p.tone[0]) for _, _, p in draws}
    assert len(gains) == 1 and len(tones) == 1
    assert len({round(float(p.overexposure[0]), 4) for _, _, p in draws}) > 1  # the scene does vary
    for srgb, raw, p in draws:
        back = cam.unprocess(torch.from_numpy(srgb).permute(2, 0, 1)[None], exposure=p.exposure,
                             tone=p.tone)[0].permute(1, 2, 0).numpy()
        ok = (srgb > 2 / 255).all(-1) & (srgb < 253 / 255).all(-1)  # neither clipped nor crushed by 8 bits
        assert ok.mean() > 0.5
        assert np.abs(back - raw)[ok].max() < 0.02


def test_described_camera_carries_the_isp_gain_as_baseline_exposure() -> None:
    cam = camera_isp.described_camera(CAMERAS["nikon-d700"])
    assert cam.baseline_exposure == pytest.approx(1.0)  # default raw_white 0.5: gain 2 = +1 EV
    assert cam.color_matrix == CAMERAS["nikon-d700"].color_matrix
    r = IspRandomization(raw_white=(0.25, 0.25))
    assert camera_isp.described_camera(CAMERAS["nikon-d700"], r).baseline_exposure == pytest.approx(2.0)


# --------------------------------------------------------------------------------------------------------------
# Photos: one decoder for training and inference
# --------------------------------------------------------------------------------------------------------------

def test_load_photo_reads_a_16bit_grey_png_like_rawdiff_infer(tmp_path):
    """A 16-bit grey PNG (Pillow mode I;16) was read as all white by rawdiff-train (Pillow's convert('RGB')
    clips I;16 at 255); load_photo is read_image rounded to 8 bits."""
    from rawdiff_infer.io import read_image

    ramp16 = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 65535 // (64 * 48 - 1)).astype(np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "g16.png")
    px = data.load_photo(tmp_path / "g16.png")
    decoded = read_image(tmp_path / "g16.png")
    assert decoded.bit_depth == 16 and px.dtype == np.uint8 and px.shape == (48, 64, 3)
    expected = ((ramp16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    assert np.array_equal(px, np.repeat(expected[..., None], 3, axis=2))
    assert px.min() == 0 and px.max() == 255 and len(np.unique(px)) == 256


def test_load_photo_shares_the_decoders_refusals_and_orientation(tmp_path):
    rgb = (np.random.default_rng(1).random((12, 20, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "o.png", exif=exif.tobytes())
    assert np.array_equal(data.load_photo(tmp_path / "o.png"), np.rot90(rgb, -1))
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(data.PhotoError) as e:
        data.load_photo(tmp_path / "x.png")
    assert str(e.value).startswith(f"{tmp_path / 'x.png'}: cannot read the photo (") and "\n" not in str(e.value)
    assert set(data.PHOTO_EXTENSIONS) >= {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"}
