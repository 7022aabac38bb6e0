"""Model formulations (rawdiff_infer.formulation): the description field, the wrapper between tiler and sampler, the
residual over the closed form in the pipeline and in training, and every exported form carrying the field."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, perturbed_tiny_model
from test_consistency import NIKON, rendered

from rawdiff_infer.backends.torch import TorchBackend
from rawdiff_infer.checkpoint import CheckpointError, ModelMeta, load_checkpoint, parse_description, save_checkpoint
from rawdiff_infer.consistency import Band, ConsistencyConfig, ConsistencySet, batch_closed_form
from rawdiff_infer.formulation import Formulation, FormulatedEps
from rawdiff_infer.model import UNet
from rawdiff_infer.pipeline import RawReconstructor, SamplerConfig
from rawdiff_infer.schedule import Schedule
from rawdiff_infer.tiling import TileConfig

X0_RESIDUAL = Formulation(prediction="x0", space="residual")


def _meta(formulation: Formulation, isp=NIKON) -> ModelMeta:  # noqa: ANN001
    return ModelMeta(model=TINY_CONFIG, isp=isp, formulation=formulation)


def _zero_output_model() -> UNet:
    """A real tiny U-Net whose last convolution is zero: its output is exactly 0 for every input."""
    model = perturbed_tiny_model(1)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    return model.eval()


def _uint8(srgb: torch.Tensor) -> np.ndarray:
    return np.round(srgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _rec(model: UNet, formulation: Formulation, *, merge: str = "step", **consistency: object) -> RawReconstructor:
    be = TorchBackend(model, _meta(formulation), device="cpu")
    return RawReconstructor(be, sampler=SamplerConfig(method="dpm-sde", steps=4),
                            tiles=TileConfig(patch_size=64, stride=48, batch_size=8, merge=merge),
                            consistency=ConsistencyConfig(**consistency))  # type: ignore[arg-type]


# ---- the description field ---------------------------------------------------------------------------------------

def test_default_formulation_is_absent_from_descriptions_and_old_ones_read_as_eps_over_raw() -> None:
    d = _meta(Formulation()).to_dict()
    assert "formulation" not in d  # earlier descriptions keep their bytes
    assert ModelMeta.from_dict(d).formulation == Formulation()
    d2 = _meta(X0_RESIDUAL).to_dict()
    assert d2["formulation"] == {"prediction": "x0", "space": "residual"}
    assert ModelMeta.from_dict(json.loads(json.dumps(d2))).formulation == X0_RESIDUAL
    bundled = json.loads(Path("rawdiff_infer/weights/rawdiff.json").read_text())
    assert ModelMeta.from_dict(bundled).formulation.is_default


@pytest.mark.parametrize("value,match", [({"prediction": "v"}, "formulation.prediction"),
                                         ({"space": "log"}, "formulation.space"),
                                         ({"prediction": "x0", "extra": 1}, "formulation"),
                                         ([1], "formulation"), (None, "formulation")])
def test_bad_formulation_is_refused_naming_the_field(value: object, match: str) -> None:
    d = _meta(Formulation()).to_dict()
    d["formulation"] = value
    with pytest.raises(CheckpointError, match=match):
        parse_description(json.dumps(d), "m.json")


def test_residual_without_isp_is_refused() -> None:
    d = _meta(X0_RESIDUAL).to_dict()
    del d["isp"]
    with pytest.raises(CheckpointError, match="residual.*isp"):
        parse_description(json.dumps(d), "m.json")
    with pytest.raises(ValueError, match="residual"):
        ModelMeta(model=TINY_CONFIG, formulation=X0_RESIDUAL)


def test_checkpoint_round_trip_keeps_the_formulation(tmp_path: Path) -> None:
    path = save_checkpoint(_zero_output_model(), tmp_path / "m.safetensors", meta=_meta(X0_RESIDUAL))
    _, meta = load_checkpoint(path)
    assert meta.formulation == X0_RESIDUAL and meta.isp == NIKON


# ---- the wrapper -------------------------------------------------------------------------------------------------

def test_formulated_eps_recovers_an_x0_prediction_and_applies_offset_and_transform() -> None:
    sched = Schedule(ModelMeta(model=TINY_CONFIG).schedule)
    g = torch.Generator().manual_seed(0)
    target = torch.rand((1, 3, 8, 8), generator=g) * 2 - 1
    x = torch.randn((1, 3, 8, 8), generator=g)
    t = torch.tensor([400.0])
    a, s = (float(v) for v in sched.alpha_sigma(400.0))
    plain = FormulatedEps(lambda x, t: target, sched, prediction="x0", device=torch.device("cpu"))
    np.testing.assert_allclose(((x - s * plain(x, t)) / a).numpy(), target.numpy(), atol=2e-5)
    # residual: the transform sees x0 + offset (the RAW), the sampler gets back the transformed RAW minus offset
    off = torch.full_like(target, 0.25)
    seen = []
    clamp = FormulatedEps(lambda x, t: target, sched, prediction="x0", device=torch.device("cpu"), offset=off,
                          transform=lambda raw: seen.append(raw) or raw.clamp(-0.5, 0.5))
    x0 = (x - s * clamp(x, t)) / a
    assert torch.allclose(seen[0], target + 0.25)
    np.testing.assert_allclose(x0.numpy(), ((target + 0.25).clamp(-0.5, 0.5) - 0.25).numpy(), atol=2e-5)


def test_eps_over_raw_without_consistency_is_the_tiler_itself() -> None:
    rec = _rec(perturbed_tiny_model(0), Formulation(), mode="off")
    raw, srgb = rendered(NIKON, 40, 50, seed=1)
    a = rec.reconstruct(_uint8(srgb), seed=2).encoded
    b = rec.reconstruct(_uint8(srgb), seed=2).encoded
    assert np.array_equal(a, b) and rec._sampler_kwargs()["clip_x0"] == 1.0


# ---- the residual in the pipeline --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["on", "off"])
def test_x0_residual_model_that_adds_nothing_returns_the_closed_form(mode: str) -> None:
    """An x0 model over the residual whose network outputs 0 is the closed form: every pixel, every sampler step
    (the residual's x0 is 0, whatever the noise). Fails if the offset, the prediction type or the final addition
    of q were wrong."""
    _, srgb = rendered(NIKON, 70, 90, seed=4)
    img = _uint8(srgb)
    out = _rec(_zero_output_model(), X0_RESIDUAL, mode=mode, skip=False).reconstruct(img, seed=5).encoded
    q = ConsistencySet(NIKON, torch.from_numpy(img).permute(2, 0, 1).float() / 255.0, Band())
    expect = ((q.q_model(2.2) + 1.0) * 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, expect, atol=2e-6)


def test_eps_residual_and_x0_raw_models_run_and_stay_consistent() -> None:
    raw, srgb = rendered(NIKON, 60, 80, seed=7)
    img = _uint8(srgb)
    outs = {}
    for f in (Formulation(space="residual"), Formulation(prediction="x0"), X0_RESIDUAL):
        out = _rec(perturbed_tiny_model(2), f, mode="on").reconstruct(img, seed=1).encoded
        assert np.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
        lin = torch.from_numpy(out ** 2.2).permute(2, 0, 1).float()
        rerender = NIKON.render(lin)
        clipped = torch.from_numpy(img).permute(2, 0, 1) == 255
        # determined channels render to the input's own level (band 0 for a lossless input)
        assert torch.equal((rerender * 255).round()[~clipped], torch.from_numpy(img).permute(2, 0, 1).float()[~clipped])
        outs[f.label()] = out
    assert len({o.tobytes() for o in outs.values()}) == 3  # the formulation changes what the model's output means


def test_merge_end_refuses_other_formulations() -> None:
    with pytest.raises(ValueError, match="merge 'end'.*x0/residual"):
        _rec(_zero_output_model(), X0_RESIDUAL, merge="end")


def test_skipped_patches_of_a_residual_model_are_the_closed_form() -> None:
    _, srgb = rendered(NIKON, 120, 150, seed=8)
    img = _uint8(srgb)
    rec = _rec(perturbed_tiny_model(3), X0_RESIDUAL, mode="on", skip=True)
    out = rec.reconstruct(img, seed=0).encoded
    cs = ConsistencySet(NIKON, torch.from_numpy(img).permute(2, 0, 1).float() / 255.0, Band())
    assert 0 < rec.last_stats["evaluated_patches"]
    far = ~torch.nn.functional.max_pool2d(cs.clipped[None, None].float(), 97, 1, 48)[0, 0].bool()
    expect = ((cs.q_model(2.2) + 1) * 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    assert far.any()
    np.testing.assert_allclose(out[far.numpy()], expect[far.numpy()], atol=2e-6)


# ---- training ----------------------------------------------------------------------------------------------------

def test_batch_closed_form_is_the_runtime_q_bit_for_bit() -> None:
    imgs = [rendered(NIKON, 32, 40, seed=s)[1] for s in range(3)]
    cond = torch.stack(imgs) * 2 - 1
    q, clipped = batch_closed_form(NIKON, cond, 2.2)
    for i, im in enumerate(imgs):
        cs = ConsistencySet(NIKON, (cond[i] + 1) * 0.5, Band())
        assert torch.equal(q[i], cs.q_model(2.2)) and torch.equal(clipped[i, 0], cs.clipped)
    assert clipped.any()


def test_trainer_targets_the_residual_and_the_loss_weighs_clipped_pixels(tmp_path: Path) -> None:
    from rawdiff_train.trainer import TrainConfig, Trainer, pixel_loss

    raw, srgb = rendered(NIKON, 64, 64, seed=9)
    cond = (srgb * 2 - 1)[None]
    enc = (raw.clamp(0, 1) ** (1 / 2.2) * 2 - 1)[None]

    class One:
        def batch(self, n: int, generator: torch.Generator):  # noqa: ANN201
            return cond.expand(n, -1, -1, -1).clone(), enc.expand(n, -1, -1, -1).clone()

    cfg = TrainConfig(steps=2, batch_size=2, warmup=1, loss="l2+l1", clipped_weight=5.0, ckpt_every=10**6,
                      val_every=10**6, log_every=1)
    tr = Trainer(One(), tmp_path, config=cfg, meta=_meta(X0_RESIDUAL))
    state, clipped = tr._state(cond, enc)
    q, _ = batch_closed_form(NIKON, cond, 2.2)
    assert torch.equal(state, enc - q) and clipped is not None and clipped.any()
    # determined pixels: the residual is about a quantisation step (the network has little to learn there; it
    # reaches 0.17 only at black, where the 8-bit input clips too), against RAW values of the order of 1
    det = state[clipped.expand_as(state) == 0].abs()
    assert float(det.quantile(0.99)) < 0.03 and float(det.median()) < 0.005 < float(enc.abs().median())
    d = torch.ones((1, 3, 2, 2))
    mask = torch.tensor([[[[True, False], [False, False]]]])
    assert float(pixel_loss(d, torch.zeros_like(d), mask, cfg)) == pytest.approx(2.0 * (5 + 3) / 4)
    rows = tr.run(progress=False)
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    _, meta = load_checkpoint(tmp_path / (tmp_path / "latest").read_text().strip() / "model.safetensors")
    assert meta.formulation == X0_RESIDUAL
    assert meta.provenance["train_config"]["clipped_weight"] == 5.0


def test_train_config_refuses_unknown_loss_and_weights() -> None:
    from rawdiff_train.trainer import TrainConfig

    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="l3")
    for w in (0.5, float("nan"), 1e9):
        with pytest.raises(ValueError, match="clipped_weight"):
            TrainConfig(clipped_weight=w)


# ---- every exported form carries the field -----------------------------------------------------------------------

def test_onnx_export_carries_the_formulation_and_runs_like_torch(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from rawdiff_export import export_onnx, read_onnx_meta
    from rawdiff_infer.backends.onnxruntime import OnnxRuntimeBackend

    model = perturbed_tiny_model(4).eval()
    meta = _meta(X0_RESIDUAL)
    path = export_onnx(model, meta, tmp_path / "m.onnx")
    assert read_onnx_meta(path) == meta
    raw, srgb = rendered(NIKON, 60, 70, seed=3)
    img = _uint8(srgb)
    tiles = TileConfig(patch_size=64, stride=48, batch_size=8)
    sampler = SamplerConfig(method="dpm-sde", steps=3)
    ort = RawReconstructor(OnnxRuntimeBackend(path), sampler=sampler, tiles=tiles).reconstruct(img, seed=2).encoded
    pt = RawReconstructor(TorchBackend(model, meta, device="cpu"), sampler=sampler, tiles=tiles
                          ).reconstruct(img, seed=2).encoded
    assert np.abs(ort - pt).max() < 1e-3


def test_graph_inputs_and_flops_do_not_depend_on_the_formulation() -> None:
    from rawdiff_bench.bench import flops_per_patch

    a, b = dataclasses.replace(_meta(Formulation())), _meta(X0_RESIDUAL)
    assert a.model == b.model  # the U-Net (and so its ONNX/TensorRT/AOTInductor graph) is the formulation's same
    assert flops_per_patch(a.model, 64) == flops_per_patch(b.model, 64)


def test_tensorrt_rtx_engine_sidecar_carries_the_formulation(tmp_path: Path) -> None:
    """The engine's description (its sidecar, what the TensorRT backend reads) is the ONNX file's, formulation
    included. Built ahead of time by TensorRT-RTX (no GPU needed); running it needs a GPU TensorRT supports."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed")
    from rawdiff_export import BuildOptions, export_onnx
    from rawdiff_export.trt_build import build_engine
    from rawdiff_infer.backends.tensorrt import load_tensorrt

    meta = _meta(X0_RESIDUAL)
    onnx_path = export_onnx(perturbed_tiny_model(5), meta, tmp_path / "m.fp16.onnx", precision="fp16")
    res = build_engine(onnx_path, options=BuildOptions(min_batch=1, opt_batch=2, max_batch=4),
                       trt=load_tensorrt(prefer="tensorrt-rtx"))
    side = json.loads(res.sidecar_path.read_text())
    assert side["rawdiff"]["formulation"] == {"prediction": "x0", "space": "residual"}
    assert ModelMeta.from_dict(side["rawdiff"]) == meta


def test_rawdiff_train_writes_the_formulation_and_resume_refuses_another(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from conftest import generated_photos

    from rawdiff_train.cli import cli

    (tmp_path / "photos").mkdir()
    photos = generated_photos(tmp_path / "photos", 3)
    out = tmp_path / "run"
    fast = ["--photos", str(photos), "--out", str(out), "--config", "tiny", "--batch-size", "2", "--variants", "1",
            "--val-count", "0", "--device", "cpu", "-q", "--warmup", "1"]
    r = CliRunner().invoke(cli, [*fast, "--steps", "2", "--prediction", "x0", "--space", "residual", "--loss",
                                 "l2+l1", "--clipped-weight", "3"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    ckpt = out / (out / "latest").read_text().strip() / "model.safetensors"
    _, meta = load_checkpoint(ckpt)
    assert meta.formulation == X0_RESIDUAL and meta.provenance["train_config"]["loss"] == "l2+l1"
    for other in (["--prediction", "eps", "--space", "residual"], ["--prediction", "x0", "--space", "residual",
                                                                   "--schedule", "linear"]):
        r = CliRunner().invoke(cli, [*fast, "--steps", "4", "--resume", *other], catch_exceptions=False)
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and "--resume" in lines[0], r.stderr
    assert (out / "latest").read_text().strip() == ckpt.parent.name  # nothing was trained or replaced
    r = CliRunner().invoke(cli, [*fast, "--steps", "2", "--space", "residual", "--clipped-weight", "0.5"])
    assert r.exit_code == 2 and "clipped-weight" in r.stderr
