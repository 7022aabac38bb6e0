"""Scene augmentation before the fixed synthetic ISP (rawdiff_train.scene_aug, camera_isp, data)."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rawdiff_train import scene_aug
from rawdiff_train.camera_isp import IspRandomization, SyntheticCamera, inverse_tone_curve, srgb_to_linear
from rawdiff_train.data import PhotoPairSource, load_photo, synthetic_crops
from rawdiff_train.scene_aug import SceneAugmentation

DATA = Path(os.environ.get("RAWDIFF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
PHOTOS = DATA / "photos"
needs_photos = pytest.mark.skipif(not PHOTOS.is_dir(), reason="shared/data/photos not available")
NO_JPEG = IspRandomization(jpeg_probability=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _h(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def _crop(name: str, size: int = 96) -> np.ndarray:
    im = load_photo(PHOTOS / name)
    h, w = im.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(im[y:y + size, x:x + size])


def _cam64(cam: SyntheticCamera) -> torch.Tensor:
    return torch.tensor(cam.cam_from_srgb, dtype=torch.float64).view(3, 3)


# ---------------------------------------------------------------------------------------------------------------
# The factors and the draw
# ---------------------------------------------------------------------------------------------------------------

def test_factors_keep_greys_and_luminance_where_they_should() -> None:
    grey = torch.ones(3, dtype=torch.float64)
    angles = torch.tensor([-170.0, -10.0, 0.0, 33.0, 120.0])
    rot = scene_aug.hue_rotation(angles)
    assert torch.allclose(rot @ grey, grey.expand(5, 3), atol=1e-12)  # greys stay grey
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(5, 3, 3), atol=1e-12)
    assert torch.allclose(scene_aug.hue_rotation(torch.tensor([120.0]))[0] @ torch.tensor([1.0, 0, 0]).double(),
                          torch.tensor([0.0, 1, 0]).double(), atol=1e-12)  # 120 degrees: R -> G, a hue turn
    y = torch.tensor(scene_aug.LUMA_709, dtype=torch.float64)
    sat = scene_aug.saturation_matrix(torch.tensor([0.0, 0.5, 1.0, 2.0]))
    colour = torch.tensor([0.8, 0.2, 0.1], dtype=torch.float64)
    assert torch.allclose(y @ sat @ colour, (y @ colour).expand(4), atol=1e-12)  # luminance kept
    assert torch.allclose(sat[2], torch.eye(3, dtype=torch.float64))
    assert torch.allclose(sat[0] @ colour, (y @ colour) * grey)  # factor 0: greyscale
    g = scene_aug.illuminant_gains(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.3]))
    assert torch.allclose(g.prod(dim=1), torch.ones(2, dtype=torch.float64))  # geometric mean 1
    assert float(g[0, 0] / g[0, 2]) == pytest.approx(2.0)  # +1 stop warmer: R/B doubles
    assert float(g[1, 1] / g[1, 0]) == pytest.approx(2 ** 0.3) and float(g[1, 0]) == pytest.approx(float(g[1, 2]))


def test_draw_respects_ranges_probability_and_the_generator() -> None:
    cam = SyntheticCamera()
    aug = SceneAugmentation(probability=0.5, exposure_ev=(-2.0, -1.0), illuminant_ev=(0.5, 1.0),
                            tint_ev=(-0.1, 0.1), hue_degrees=(5.0, 15.0), saturation=(0.5, 0.8), matrix_sigma=0.05)
    d = aug.draw(400, torch.Generator().manual_seed(1), cam_from_srgb=_cam64(cam))
    a = d.applied
    assert 120 < int(a.sum()) < 280  # about half
    assert bool(((d.exposure_ev[a] >= -2) & (d.exposure_ev[a] <= -1)).all())
    assert bool(((d.illuminant_ev[a] >= 0.5) & (d.illuminant_ev[a] <= 1.0)).all())
    assert bool(((d.hue_degrees[a] >= 5) & (d.hue_degrees[a] <= 15)).all())
    assert bool(((d.saturation[a] >= 0.5) & (d.saturation[a] <= 0.8)).all())
    eye = torch.eye(3, dtype=torch.float64)
    assert bool((d.matrix[~a] == eye).all())  # not applied: exactly the identity
    assert not torch.allclose(d.matrix[a], eye.expand(int(a.sum()), 3, 3), atol=0.05)
    # applied with exposure -1..-2 EV and warmer light: a grey of the photo becomes a darker, warmer scene
    cam_grey = _cam64(cam) @ d.matrix[a] @ torch.ones(3, dtype=torch.float64)  # camera RGB of a white patch
    assert bool((cam_grey.mean(dim=1) < 0.55).all()) and bool((cam_grey[:, 0] > cam_grey[:, 2]).all())
    again = aug.draw(400, torch.Generator().manual_seed(1), cam_from_srgb=_cam64(cam))
    assert torch.equal(again.matrix, d.matrix) and torch.equal(again.applied, d.applied)
    other = aug.draw(400, torch.Generator().manual_seed(2), cam_from_srgb=_cam64(cam))
    assert not torch.equal(other.matrix, d.matrix)
    # a fixed number of draws per image, whatever the ranges: the generator ends in the same state
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    aug.draw(7, g1, cam_from_srgb=_cam64(cam))
    SceneAugmentation(probability=0.0, matrix_sigma=0.0).draw(7, g2, cam_from_srgb=_cam64(cam))
    assert torch.equal(g1.get_state(), g2.get_state())
    rec = d.record(int(torch.nonzero(a)[0]))
    assert rec["applied"] and len(rec["matrix"]) == 9 and -2 <= rec["exposure_ev"] <= -1


def test_augmentation_validates_its_ranges() -> None:
    for bad in (dict(probability=1.5), dict(probability=math.nan), dict(exposure_ev=(0.5, -0.5)),
                dict(exposure_ev=(-9.0, 0.0)), dict(hue_degrees=(-10.0, math.inf)), dict(saturation=(0.0, 1.0)),
                dict(matrix_sigma=-0.1), dict(matrix_sigma=0.7), dict(tint_ev=(-2.0, 0.0))):
        with pytest.raises(ValueError):
            SceneAugmentation(**bad)
    assert SceneAugmentation().to_dict()["exposure_ev"] == [-1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# Pairs: still input = ISP(target), and the target is the augmented scene
# ---------------------------------------------------------------------------------------------------------------

@needs_photos
@pytest.mark.parametrize("name", ["kodim05.png", "skimage_coffee.png", "kodim13.png"])
def test_augmented_pairs_are_isp_of_target_and_target_is_the_augmented_scene(name) -> None:
    cam = SyntheticCamera()
    photo = _crop(name)
    aug = SceneAugmentation(probability=1.0, illuminant_ev=(-1.0, 1.0), hue_degrees=(-20.0, 20.0),
                            saturation=(0.6, 1.6), matrix_sigma=0.05)
    plain = cam.make_pair(photo, 0, randomization=NO_JPEG)
    for seed in range(3):
        srgb, raw, p = cam.make_pair(photo, seed, randomization=NO_JPEG, augmentation=aug, return_params=True)
        assert p.scene is not None and bool(p.scene.applied[0])
        assert 0.0 <= raw.min() and raw.max() <= 1.0 and np.allclose(srgb * 255, np.round(srgb * 255), atol=1e-3)
        # the input is the fixed ISP applied to the (clipped) RAW target
        again = cam.render(torch.from_numpy(raw).permute(2, 0, 1)[None], exposure=p.exposure,
                           tone=p.tone)[0].permute(1, 2, 0).numpy()
        assert np.abs(again - srgb).max() <= 1.0 / 255.0 + 1e-6
        # independent float64 oracle of the target: clip(k * C @ T @ lin(photo))
        lin = srgb_to_linear(inverse_tone_curve(torch.from_numpy(photo).double() / 255.0, float(p.tone[0])))
        k = float(p.raw_white[0]) * float(p.overexposure[0])
        m = _cam64(cam) @ p.scene.matrix[0]
        expect = (k * torch.einsum("ij,hwj->hwi", m, lin)).clamp(0, 1).numpy()
        assert np.abs(expect - raw).max() < 2e-5
        assert np.abs(raw - plain[1]).max() > 0.02  # the scene really changed


@needs_photos
def test_warm_illuminant_warms_the_rendered_photo() -> None:
    cam = SyntheticCamera()
    photo = _crop("kodim05.png", 128)
    r = IspRandomization(jpeg_probability=0.0, highlight_probability=0.0)
    means = {}
    for ev in (-1.0, 1.0):
        aug = SceneAugmentation(probability=1.0, exposure_ev=(0.0, 0.0), illuminant_ev=(ev, ev), tint_ev=(0, 0),
                                hue_degrees=(0, 0), saturation=(1, 1), matrix_sigma=0.0)
        srgb, _ = cam.make_pair(photo, 0, randomization=r, augmentation=aug)
        means[ev] = srgb.reshape(-1, 3).mean(axis=0)
    assert means[1.0][0] > means[-1.0][0] + 0.05 and means[1.0][2] < means[-1.0][2] - 0.05


@needs_photos
def test_augmentation_off_reproduces_the_unaugmented_pairs_bit_for_bit() -> None:
    """Golden hashes computed with the code before scene augmentation existed (same photos, seeds, epochs)."""
    files = [PHOTOS / "kodim05.png", PHOTOS / "skimage_coffee.png"]
    golden = {(False, 0, 0): ("c678d43f56967ef0", "5d0a2152e8217422", None),
              (False, 0, 1): ("5fb488309e218054", "62d1c5b8756b4761", None),
              (False, 1, 1): ("dd110633192919ce", "dae1b0e6a1c356e6", None),
              (True, 0, 0): ("32569072a374a87e", "5d0a2152e8217422", 96),
              (True, 1, 1): ("8c237ac98f15babc", "dae1b0e6a1c356e6", 87)}
    for (jpeg, epoch, i), (hs, hr, q) in golden.items():
        src = PhotoPairSource(files, seed=3, jpeg=jpeg, augmentation=None)
        src.set_epoch(epoch)
        p = src[i]
        assert (_h(p.srgb), _h(p.raw), p.meta["jpeg_quality"]) == (hs, hr, q), (jpeg, epoch, i)
        assert p.meta["scene"] is None
    photos = np.stack([load_photo(PHOTOS / "kodim05.png")[:256, :256], load_photo(PHOTOS / "kodim11.png")[:256, :256]])
    s, r = synthetic_crops(torch.from_numpy(photos).permute(0, 3, 1, 2), 16, generator=torch.Generator().manual_seed(5),
                           randomization=IspRandomization(highlight_probability=1.0))
    assert (_h(s.numpy()), _h(r.numpy())) == ("bb383d64d50293b8", "f91e791d5d6b8bf8")


@needs_photos
def test_photo_source_with_augmentation_is_seeded_and_records_the_scene(tmp_path: Path) -> None:
    for n in ("kodim05.png", "skimage_coffee.png"):
        Image.fromarray(_crop(n, 80)).save(tmp_path / n)
    aug = SceneAugmentation(probability=1.0)
    src = PhotoPairSource(tmp_path, seed=4, jpeg=False, augmentation=aug)
    a = src[0]
    b = PhotoPairSource(tmp_path, seed=4, jpeg=False, augmentation=aug)[0]
    assert np.array_equal(a.srgb, b.srgb) and np.array_equal(a.raw, b.raw)
    plain = PhotoPairSource(tmp_path, seed=4, jpeg=False)[0]
    # the ISP draw comes first and is untouched by the augmentation (drawn after it, same generator)
    assert a.meta["exposure"] == plain.meta["exposure"] and a.meta["tone"] == plain.meta["tone"]
    assert not np.array_equal(a.raw, plain.raw)
    scene = a.meta["scene"]
    assert scene["applied"] and set(scene) >= {"exposure_ev", "illuminant_ev", "hue_degrees", "saturation", "matrix"}
    src.set_epoch(1)
    assert src[0].meta["scene"]["matrix"] != scene["matrix"]  # a new scene each epoch


def test_synthetic_crops_with_augmentation_consistent_and_seeded() -> None:
    g = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    base = torch.stack([yy, xx, 1 - 0.5 * (yy + xx)])[None] * torch.rand(3, 3, 1, 1, generator=g)
    photos = torch.round(base.clamp(0, 1) * 255).to(torch.uint8)
    aug = SceneAugmentation(probability=1.0)
    s1, r1 = synthetic_crops(photos, 12, patch=32, generator=torch.Generator().manual_seed(0), augmentation=aug)
    s2, r2 = synthetic_crops(photos, 12, patch=32, generator=torch.Generator().manual_seed(0), augmentation=aug)
    assert torch.equal(s1, s2) and torch.equal(r1, r2)
    s0, r0 = synthetic_crops(photos, 12, patch=32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s0, synthetic_crops(photos, 12, patch=32, generator=torch.Generator().manual_seed(0))[0])
    assert not torch.equal(r0, r1)
    assert s1.shape == r1.shape == (12, 3, 32, 32) and float(r1.min()) >= -1 and float(r1.max()) <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_augmented_pairs_match_between_cpu_and_cuda() -> None:
    cam = SyntheticCamera()
    g = torch.Generator().manual_seed(9)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    base = torch.stack([yy, xx, 1 - 0.5 * (yy + xx)])[None] * torch.rand(4, 3, 1, 1, generator=g) * 1.3
    photos = torch.round(base.clamp(0, 1) * 255).to(torch.uint8)
    r = IspRandomization(jpeg_probability=0.0, highlight_probability=1.0)
    aug = SceneAugmentation(probability=1.0)
    s_cpu, raw_cpu, p_cpu = cam.make_pair(photos, torch.Generator().manual_seed(0), randomization=r,
                                          augmentation=aug, return_params=True)
    s_gpu, raw_gpu, p_gpu = cam.make_pair(photos.cuda(), torch.Generator().manual_seed(0), randomization=r,
                                          augmentation=aug, return_params=True)
    assert torch.equal(p_cpu.scene.matrix, p_gpu.scene.matrix)  # drawn on the CPU: identical parameters
    assert torch.allclose(p_cpu.overexposure, p_gpu.overexposure, rtol=1e-5)
    assert torch.allclose(raw_gpu.cpu(), raw_cpu, atol=1e-5)
    diff = (s_gpu.cpu() - s_cpu).abs()
    assert diff.max() <= 1 / 255 + 1e-6 and (diff > 1e-6).float().mean() < 1e-3
