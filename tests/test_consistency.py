"""ISP consistency: the forward ISP, its closed-form inverse, the consistent set and the projection onto it, and the
reconstruction that uses them (tiny random U-Net on the CPU, so nothing here depends on a trained model)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG

from rawdiff_infer.backends.torch import TorchBackend
from rawdiff_infer.checkpoint import ModelMeta
from rawdiff_infer.consistency import (JPEG_BANDS, LOSSLESS_BAND, QUANTISATION_BAND, Band, ConsistencyConfig,
                                       ConsistencySet, jpeg_band)
from rawdiff_infer.formulation import FormulatedEps
from rawdiff_infer.isp import IspCurve, IspModel
from rawdiff_infer.model import UNet
from rawdiff_infer.pipeline import RawReconstructor, SamplerConfig
from rawdiff_infer.schedule import Schedule
from rawdiff_infer.tiling import TileConfig, TiledDenoiser

#: the bundled model's camera (the synthetic Nikon D700 ISP: gain 2, tone 0.5)
NIKON = IspModel(gain=2.0, srgb_from_cam=(1.6694, -0.4847, -0.1847, -0.00096, 1.2527, -0.2517, 0.0471, -0.3001,
                                          1.2529), curve=IspCurve(kind="srgb", tone=0.5))


def random_isp(rng: np.random.Generator) -> IspModel:
    """A random invertible ISP: a colour matrix near the identity whose rows sum to 1, a gain, one of the three
    curve kinds, a clip level and a bit depth."""
    m = np.eye(3) + rng.normal(0, 0.25, (3, 3))
    m = m / m.sum(axis=1, keepdims=True)
    kind = rng.choice(["srgb", "gamma", "lut"])
    if kind == "srgb":
        curve = IspCurve(kind="srgb", tone=float(rng.uniform(0, 1)))
    elif kind == "gamma":
        curve = IspCurve(kind="gamma", power=float(rng.uniform(1.5, 3.0)), slope=float(rng.uniform(0, 10)))
    else:
        lut = np.cumsum(rng.uniform(0.2, 1.0, 33))
        curve = IspCurve(kind="lut", lut=tuple(np.concatenate([[0.0], lut / lut[-1]]).tolist()))
    return IspModel(gain=float(rng.uniform(0.8, 4.0)), srgb_from_cam=tuple(m.ravel().tolist()), curve=curve,
                    clip=float(rng.uniform(0.7, 1.0)), bits=int(rng.choice([8, 16])))


def rendered(isp: IspModel, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear RAW [3, H, W], its render on the ISP's levels [3, H, W] in [0, 1]); a smooth, mostly muted scene with
    noise whose brightest corner clips."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = 0.08 + torch.stack([xx, yy, 0.5 * (xx + yy)]) * 0.2 + 0.5 * (xx * yy) ** 4
    raw = (base + 0.02 * torch.randn((3, h, w), generator=g)).clamp(0, 1)
    return raw, isp.render(raw)


def in_band(isp: IspModel, raw: torch.Tensor, srgb: torch.Tensor, band: Band) -> torch.Tensor:
    """[3, H, W] bool: the channel of raw's render lies in the input's band (its level +- the width, in the band's
    levels), or at or above white where the input is white (clipped). The slack is fp32's rounding through the colour
    matrix and its inverse, amplified by a steep curve toe (4e-6 of full scale: a quarter of a 16-bit level, 0.001
    of an 8-bit one)."""
    L = band.levels
    slack = 1e-3 + 4e-6 * L
    v = torch.round(srgb * L)
    y = isp.render(raw, quantize=False) * L
    inside = (y >= v - band.width - slack) & (y <= v + band.width + slack)
    clipped = (v + band.width >= L) & (y >= L - band.width - slack)
    dark = (v - band.width <= 0) & (y <= band.width + slack)
    return inside | clipped | dark


# ---- the ISP -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_curve_inverse_is_exact(seed: int) -> None:
    isp = random_isp(np.random.default_rng(seed))
    x = torch.linspace(0, 1, 4097, dtype=torch.float64)
    y = isp.curve.forward(x)
    assert bool((y[1:] >= y[:-1]).all()), "the curve must be monotone"
    np.testing.assert_allclose(isp.curve.inverse(y).numpy(), x.numpy(), atol=2e-6)


def test_closed_form_inverts_the_render_where_nothing_clips() -> None:
    raw, srgb = rendered(NIKON, 32, 48, seed=1)
    back = NIKON.closed_form(srgb)
    unclipped = (srgb < 1.0).all(dim=0) & (srgb > 0.0).all(dim=0)
    assert unclipped.float().mean() > 0.5
    # the render quantises to 8 bits: the closed form is exact up to that step
    assert torch.equal(NIKON.render(back)[:, unclipped], srgb[:, unclipped])


def test_isp_round_trips_through_its_description() -> None:
    for seed in range(4):
        isp = random_isp(np.random.default_rng(seed))
        assert IspModel.from_dict(isp.to_dict()) == isp
    meta = ModelMeta(model=TINY_CONFIG, isp=NIKON)
    assert ModelMeta.from_dict(meta.to_dict()).isp == NIKON
    assert "isp" not in ModelMeta(model=TINY_CONFIG).to_dict()


# ---- bands -------------------------------------------------------------------------------------------------------

def test_band_follows_the_input() -> None:
    assert Band.for_input(255) == Band(LOSSLESS_BAND, 255)
    assert Band.for_input(65535) == Band(LOSSLESS_BAND, 65535)
    assert 0.0 <= LOSSLESS_BAND <= QUANTISATION_BAND
    q = [jpeg_band(k) for k in range(1, 101)]
    assert all(a >= b for a, b in zip(q, q[1:])), "a lower JPEG quality never narrows the band"
    assert jpeg_band(100) <= jpeg_band(JPEG_BANDS[0][0])
    jp = Band.for_input(255, jpeg_quality=75)
    assert jp.width == pytest.approx(jpeg_band(75))
    assert Band.for_input(255, jpeg_quality=JPEG_BANDS[0][0]).width == pytest.approx(JPEG_BANDS[0][1])
    # the user's width wins, scaled from 8-bit levels to the input's own
    assert Band.for_input(65535, jpeg_quality=75, width_8bit=2.0).width == pytest.approx(2.0 * 257)
    with pytest.raises(ValueError):
        Band(float("nan"), 255)
    with pytest.raises(ValueError):
        ConsistencyConfig(mode="sometimes")
    with pytest.raises(ValueError):
        ConsistencyConfig(band=-1.0)


# ---- the projection ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_projection_lands_in_the_set_and_is_idempotent(seed: int) -> None:
    """Property test over random ISPs, images and bands: any RAW, projected, renders into the input's band at every
    determined channel and at white where the input is clipped; projecting again changes nothing."""
    rng = np.random.default_rng(100 + seed)
    isp = random_isp(rng)
    _, srgb = rendered(isp, 24, 40, seed)
    band = Band(width=float(rng.choice([0.5, 1.0, 3.0])) * (isp.levels / 255.0), levels=isp.levels)
    cs = ConsistencySet(isp, srgb, band)
    assert cs.inconsistent == 0  # the input was rendered by this ISP, so a consistent RAW exists everywhere
    g = torch.Generator().manual_seed(seed)
    for raw in (torch.rand((3, 24, 40), generator=g), torch.rand((3, 24, 40), generator=g) * 1.6 - 0.3, cs.q):
        p = cs.project(raw)
        assert p.min() >= 0.0 and p.max() <= 1.0
        ok = in_band(isp, p, srgb, band)
        assert bool(ok.all()), f"{int((~ok).sum())} channels outside the band"
        np.testing.assert_allclose(cs.project(p).numpy(), p.numpy(), atol=1e-6)


def test_projection_keeps_consistent_pixels_bit_for_bit() -> None:
    raw, srgb = rendered(NIKON, 20, 30, seed=3)
    cs = ConsistencySet(NIKON, srgb, Band(QUANTISATION_BAND))
    inside = cs.violation(raw) == 0
    assert inside.float().mean() > 0.5
    p = cs.project(raw)
    assert torch.equal(p[:, inside], raw[:, inside])


def test_projection_in_model_space_matches_linear_space() -> None:
    raw, srgb = rendered(NIKON, 16, 16, seed=4)
    cs = ConsistencySet(NIKON, srgb, Band())
    x = torch.rand((3, 16, 16)) * 2 - 1
    lin = ((x + 1) / 2) ** 2.2
    np.testing.assert_allclose((((cs.project_model(x, 2.2) + 1) / 2) ** 2.2).numpy(), cs.project(lin).numpy(),
                               atol=2e-6)


def test_clipped_pixels_may_rise_above_the_clip_level() -> None:
    """Where the input is white the set is open upwards: a brighter RAW stays as it is, a darker one is lifted."""
    srgb = torch.ones((3, 2, 2))
    cs = ConsistencySet(NIKON, srgb, Band())
    assert bool(cs.clipped.all())
    bright = torch.ones((3, 2, 2))
    assert torch.equal(cs.project(bright), bright)
    lifted = cs.project(torch.full((3, 2, 2), 0.1))
    assert bool((NIKON.render(lifted) == 1.0).all())


def test_impossible_input_is_counted_not_fatal() -> None:
    """A colour no RAW in [0, 1] renders to under this ISP: counted, kept at the nearest point found, finite."""
    isp = IspModel(gain=1.0, srgb_from_cam=(2.0, -1.0, 0.0, -1.0, 2.0, 0.0, 0.0, 0.0, 1.0))
    srgb = torch.zeros((3, 1, 1))
    srgb[0] = 1.0  # pure red: would need a negative camera channel through this matrix... or not; it must not crash
    srgb[1] = 0.5
    cs = ConsistencySet(isp, srgb, Band())
    p = cs.project(torch.rand((3, 1, 1)))
    assert torch.isfinite(p).all() and cs.inconsistent in (0, 1)


def test_consistent_eps_recovers_the_projected_x0() -> None:
    raw, srgb = rendered(NIKON, 16, 24, seed=5)
    cs = ConsistencySet(NIKON, srgb, Band(QUANTISATION_BAND))
    sched = Schedule(ModelMeta(model=TINY_CONFIG).schedule)
    gen = torch.Generator().manual_seed(0)
    eps_model = lambda x, t: torch.randn(x.shape, generator=gen)  # noqa: E731
    wrapped = FormulatedEps(eps_model, sched, prediction="eps",
                            transform=lambda x0: torch.stack([cs.project_model(c, 2.2) for c in x0]),
                            device=torch.device("cpu"))
    x = torch.randn((1, 3, 16, 24), generator=gen)
    t = torch.tensor([300.0])
    eps = wrapped(x, t)
    a, s = (float(v) for v in sched.alpha_sigma(300.0))
    x0 = (x - s * eps) / a
    # the recovered x0 is consistent (projecting it again moves it by fp32 rounding only)
    np.testing.assert_allclose(cs.project_model(x0[0], 2.2).numpy(), x0[0].numpy(), atol=1e-4)


# ---- the reconstruction ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model() -> UNet:
    torch.manual_seed(0)
    return UNet(TINY_CONFIG).eval()


def _backend(model: UNet, isp: IspModel | None) -> TorchBackend:
    return TorchBackend(model, ModelMeta(model=TINY_CONFIG, isp=isp), device="cpu")


def _rec(be: TorchBackend, steps: int = 3, **consistency: object) -> RawReconstructor:
    return RawReconstructor(be, sampler=SamplerConfig(method="dpm", steps=steps),
                            tiles=TileConfig(patch_size=64, stride=48, batch_size=8),
                            consistency=ConsistencyConfig(**consistency))  # type: ignore[arg-type]


def _uint8(srgb: torch.Tensor) -> np.ndarray:
    return np.round(srgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def test_model_without_isp_keeps_todays_output_bit_for_bit(model: UNet) -> None:
    _, srgb = rendered(NIKON, 40, 70, seed=6)
    img = _uint8(srgb)
    plain = _rec(_backend(model, None))
    assert not plain.consistent
    out_auto = plain.reconstruct(img, seed=3).encoded
    out_off = _rec(_backend(model, NIKON), mode="off").reconstruct(img, seed=3).encoded
    assert np.array_equal(out_auto, out_off)
    with pytest.raises(ValueError, match="isp"):
        _rec(_backend(model, None), mode="on")


@pytest.mark.parametrize("grid,merge,skip", [("overlap", "step", False), ("overlap", "step", True),
                                             ("shifted", "step", True), ("overlap", "end", True)])
def test_output_is_consistent_with_its_input(model: UNet, grid: str, merge: str, skip: bool) -> None:
    """The random U-Net predicts nonsense; the output, rendered through the ISP, still lands in the input's band at
    every pixel (determined ones) and at white where the input is clipped."""
    _, srgb = rendered(NIKON, 48, 100, seed=7)
    img = _uint8(srgb)
    rec = RawReconstructor(_backend(model, NIKON), sampler=SamplerConfig(method="dpm", steps=3),
                           tiles=TileConfig(patch_size=64, stride=48 if grid == "overlap" else 64, batch_size=8,
                                            grid=grid, merge=merge),  # type: ignore[arg-type]
                           consistency=ConsistencyConfig(skip=skip))
    out = rec.reconstruct(img, seed=1)
    assert out.extra["consistent"]
    lin = torch.from_numpy(out.linear).permute(2, 0, 1)
    ok = in_band(NIKON, lin, torch.from_numpy(img).permute(2, 0, 1).float() / 255, Band())
    assert bool(ok.all()), f"{int((~ok).sum())} channels outside the band"
    free = _rec(_backend(model, NIKON), mode="off").reconstruct(img, seed=1)
    free_ok = in_band(NIKON, torch.from_numpy(free.linear).permute(2, 0, 1),
                      torch.from_numpy(img).permute(2, 0, 1).float() / 255, Band())
    assert not bool(free_ok.all())  # the unprojected model is not consistent: the test above can fail


def test_packed_images_are_each_consistent_and_as_alone(model: UNet) -> None:
    imgs = [_uint8(rendered(NIKON, h, w, seed=s)[1]) for h, w, s in ((30, 40, 8), (50, 20, 9))]
    rec = _rec(_backend(model, NIKON), skip=False)
    many = rec.reconstruct_many(imgs, seeds=[4, 5])
    for img, out, seed in zip(imgs, many, (4, 5)):
        alone = rec.reconstruct(img, seed=seed)
        # the U-Net's CPU kernels round differently per batch size (about 1e-6 in eps); the encoding's steep toe
        # (x^(1/2.2) near black) turns that into up to a few 1e-4 on the darkest pixels
        np.testing.assert_allclose(out.encoded, alone.encoded, atol=5e-4)


def test_skipping_spends_the_model_only_where_information_was_lost(model: UNet) -> None:
    """A photo with one clipped corner: only the patches touching it are evaluated; the rest is the closed form."""
    raw, srgb = rendered(NIKON, 96, 160, seed=10)
    raw = raw * 0.4
    raw[:, :20, :20] = 1.0  # a blown-out corner
    srgb = NIKON.render(raw)
    img = _uint8(srgb)
    grid_patches = _rec(_backend(model, NIKON)).patches_for(96, 160)
    skip = _rec(_backend(model, NIKON), skip=True)
    out = skip.reconstruct(img, seed=0)
    assert 0 < out.extra["evaluated_patches"] < grid_patches
    cf = NIKON.closed_form(torch.from_numpy(img).permute(2, 0, 1).float() / 255)
    lin = torch.from_numpy(out.linear).permute(2, 0, 1)
    far = (slice(None), slice(60, None), slice(80, None))  # covered by skipped patches only
    np.testing.assert_allclose(lin[far].numpy(), cf[far].numpy(), atol=2e-5)
    # without skipping every patch is evaluated, and the far corner is no longer the closed form exactly
    full = _rec(_backend(model, NIKON), skip=False).reconstruct(img, seed=0, band=Band(3.0, 255))
    assert full.extra["evaluated_patches"] == grid_patches
    assert not np.allclose(torch.from_numpy(full.linear).permute(2, 0, 1)[far].numpy(), cf[far].numpy(), atol=2e-5)


def test_tiler_skips_patches_without_needed_pixels() -> None:
    calls: list[int] = []

    def patch_fn(x, c, t):
        calls.append(int((x.abs().sum(dim=(1, 2, 3)) > 0).sum()))
        return torch.ones_like(x)

    cond = torch.zeros((3, 64, 160))
    needed = torch.zeros((64, 160), dtype=torch.bool)
    needed[10, 150] = True
    den = TiledDenoiser(patch_fn, [cond], TileConfig(patch_size=64, stride=48, batch_size=4), needed=[needed])
    assert den.skipping and den.num_patches == 1
    eps = den(torch.ones((1, 3 * 64 * 160)), torch.tensor([10.0]))
    cover = den.coverage()[0]
    assert cover[0, 10, 150] > 0.99 and cover[0, 10, 5] == 0
    assert float(eps.view(3, 64, 160)[0, 10, 5]) == 0.0


def test_hostile_isp_is_refused_before_compute() -> None:
    from rawdiff_infer.validate import SchemaError

    for bad in ({"gain": -1, "srgb_from_cam": [1, 0, 0, 0, 1, 0, 0, 0, 1]},
                {"gain": 1, "srgb_from_cam": [1] * 9},
                {"gain": 1, "srgb_from_cam": [1, 0, 0, 0, 1, 0, 0, 0, 1], "curve": {"kind": "lut", "lut": [1, 0]}},
                {"gain": math.inf, "srgb_from_cam": [1, 0, 0, 0, 1, 0, 0, 0, 1]}):
        with pytest.raises(SchemaError):
            IspModel.from_dict(bad)


@pytest.mark.gpu
def test_step_graph_with_projection_equals_eager(model: UNet) -> None:
    """The whole-step CUDA graph records the projection with the U-Net; replay equals the eager path, and a second
    image of the same size reuses the graph with its own consistent set."""
    be = TorchBackend(model, ModelMeta(model=TINY_CONFIG, isp=NIKON), device="cuda")
    tiles = TileConfig(patch_size=64, stride=48, batch_size=8)
    cfg = ConsistencyConfig(skip=False)
    graphed = RawReconstructor(be, sampler=SamplerConfig(method="dpm", steps=4), tiles=tiles, step_graph=True,
                               consistency=cfg)
    eager = RawReconstructor(be, sampler=SamplerConfig(method="dpm", steps=4), tiles=tiles, consistency=cfg)
    for seed in (11, 12):
        img = _uint8(rendered(NIKON, 64, 96, seed=seed)[1])
        np.testing.assert_allclose(graphed.reconstruct(img, seed=seed).encoded,
                                   eager.reconstruct(img, seed=seed).encoded, atol=1e-4)


def test_reconstructor_reports_it(model: UNet) -> None:
    rec = _rec(_backend(model, NIKON))
    out = rec.reconstruct(_uint8(rendered(NIKON, 20, 20, seed=13)[1]), seed=0)
    assert out.extra["consistent"] and out.extra["inconsistent_pixels"] == 0
    assert dataclasses.replace(rec.consistency, mode="off").mode == "off"


# ---- backends ----------------------------------------------------------------------------------------------------

def test_onnx_backend_gives_the_same_consistent_output(tmp_path) -> None:
    """The ISP travels in the exported file's description, and the projection runs on the runtime's side of the
    backend contract: onnxruntime and torch give the same consistent output."""
    pytest.importorskip("onnxruntime")
    from conftest import perturbed_tiny_model
    from rawdiff_export import export_checkpoint
    from rawdiff_infer.backends import open_backend
    from rawdiff_infer.checkpoint import save_checkpoint

    model = perturbed_tiny_model(4)
    meta = ModelMeta(model=TINY_CONFIG, isp=NIKON)
    ckpt = save_checkpoint(model, tmp_path / "tiny.safetensors", meta=meta)
    res = export_checkpoint(ckpt, tmp_path / "out")
    img = _uint8(rendered(NIKON, 48, 80, seed=14)[1])
    outs = []
    for be in (TorchBackend(model, meta, device="cpu"), open_backend("onnx", res.fp32_path)):
        assert be.meta.isp == NIKON
        rec = _rec(be, steps=3)
        assert rec.consistent
        outs.append(rec.reconstruct(img, seed=2))
    np.testing.assert_allclose(outs[0].encoded, outs[1].encoded, atol=5e-4)  # see the packed test: dark pixels
    lin = torch.from_numpy(outs[1].linear).permute(2, 0, 1)
    assert bool(in_band(NIKON, lin, torch.from_numpy(img).permute(2, 0, 1).float() / 255, Band()).all())


# ---- the command line --------------------------------------------------------------------------------------------

def test_cli_consistency(tmp_path) -> None:
    """--consistency on needs an ISP (one line, exit 2, before compute); auto says once that a model has none; with
    an ISP the written RAW renders back into the input; a JPEG input's band comes from its quality."""
    from click.testing import CliRunner
    from PIL import Image

    from rawdiff_infer.checkpoint import save_checkpoint
    from rawdiff_infer.cli import cli

    torch.manual_seed(0)
    net = UNet(TINY_CONFIG)
    with_isp = save_checkpoint(net, tmp_path / "isp.safetensors", meta=ModelMeta(model=TINY_CONFIG, isp=NIKON))
    without = save_checkpoint(net, tmp_path / "plain.safetensors", meta=ModelMeta(model=TINY_CONFIG))
    img = _uint8(rendered(NIKON, 40, 56, seed=16)[1])
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=50)

    def run(*args: object):
        return CliRunner().invoke(cli, [str(a) for a in args])

    r = run(tmp_path / "a.png", "--ckpt", without, "--consistency", "on", "-o", tmp_path / "x.npy")
    assert r.exit_code == 2 and "isp" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.npy").exists()
    r = run(tmp_path / "a.png", "--ckpt", without, "--steps", "2", "-o", tmp_path / "plain.npy")
    assert r.exit_code == 0 and r.stdout.count("does not describe its camera's ISP") == 1, r.output
    r = run(tmp_path / "a.png", "--ckpt", with_isp, "--steps", "2", "-o", tmp_path / "isp.npy")
    assert r.exit_code == 0 and "does not describe" not in r.output, r.output
    lin = torch.from_numpy(np.load(tmp_path / "isp.npy")).permute(2, 0, 1)
    src = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    assert bool(in_band(NIKON, lin, src, Band()).all())
    assert not bool(in_band(NIKON, torch.from_numpy(np.load(tmp_path / "plain.npy")).permute(2, 0, 1), src,
                            Band()).all())
    # a quality-50 JPEG gets jpeg_band(50) levels, not the lossless band: its output may use them
    r = run(tmp_path / "a.jpg", "--ckpt", with_isp, "--steps", "2", "-o", tmp_path / "jpg.npy")
    assert r.exit_code == 0, r.output
    decoded = torch.from_numpy(np.array(Image.open(tmp_path / "a.jpg").convert("RGB"))).permute(2, 0, 1) / 255
    out = torch.from_numpy(np.load(tmp_path / "jpg.npy")).permute(2, 0, 1)
    assert bool(in_band(NIKON, out, decoded.float(), Band(jpeg_band(50), 255)).all())
    assert not bool(in_band(NIKON, out, decoded.float(), Band(0.0, 255)).all())
    for bad in (["--band", "-1"], ["--band", "nan"], ["--consistency", "maybe"]):
        r = run(tmp_path / "a.png", "--ckpt", with_isp, *bad, "-o", tmp_path / "y.npy")
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, (bad, r.stderr)


def test_a_fine_curve_table_inverts_in_fp32_without_nan() -> None:
    """LibRaw's exact curve is a 4096-entry table whose top entries are equal once rounded to fp32."""
    top = np.linspace(0, 1, 4096) ** (1 / 2.222)
    top[-3:] = [1.0 - 2e-9, 1.0 - 1e-9, 1.0]
    curve = IspCurve(kind="lut", lut=tuple(top.tolist()))
    y = torch.tensor([0.0, 0.25, 0.5, 1.0 - 1e-8, 1.0])
    x = curve.inverse(y)
    assert torch.isfinite(x).all() and bool((x[1:] >= x[:-1]).all())
    np.testing.assert_allclose(curve.forward(x).numpy(), y.numpy(), atol=1e-6)


def test_a_photo_without_clipped_pixels_is_its_closed_form(model: UNet) -> None:
    """Every patch determined: no model call and no sampling; the output is the closed form (and it renders back to
    the input exactly)."""
    raw, _ = rendered(NIKON, 40, 60, seed=17)
    img = _uint8(NIKON.render(raw * 0.3))
    calls: list[int] = []
    be = _backend(model, NIKON)
    infer = be.infer
    be.infer = lambda *a, **k: (calls.append(1), infer(*a, **k))[1]  # type: ignore[method-assign]
    steps: list[tuple[int, int]] = []
    out = _rec(be).reconstruct(img, seed=0, progress=lambda d, t: steps.append((d, t)))
    assert not calls and out.extra["evaluated_patches"] == 0 and steps == [(3, 3)]
    src = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    lin = torch.from_numpy(out.linear).permute(2, 0, 1)
    np.testing.assert_allclose(lin.numpy(), NIKON.closed_form(src).numpy(), atol=2e-6)
    assert torch.equal(NIKON.render(lin), src)
