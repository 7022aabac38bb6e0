"""AOTInductor packages: build (rawdiff_export.aoti_export), metadata, refusal rules, AotiBackend against eager torch.

One tiny-model CPU package is built per session (about a minute on a 2-core CPU): the tests that need it are marked
``slow``. The CUDA package test is marked ``gpu``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from rawdiff_export.aoti_export import (AotiExport, aoti_parity, default_aoti_path, export_aoti,
                                        export_checkpoint_aoti)
from rawdiff_export.onnx_export import ExportError
from rawdiff_infer.backends.aoti import (AOTI_FORMAT, AotiBackend, AotiTarget, check_aoti_compat, current_target,
                                         read_aoti_info)
from rawdiff_infer.backends.base import BackendError
from rawdiff_infer.backends.torch import TorchBackend
from rawdiff_infer.checkpoint import ModelMeta, file_sha256, save_checkpoint
from rawdiff_infer.formulation import Formulation
from rawdiff_infer.fsio import OutputExistsError
from rawdiff_infer.model import UNet
from rawdiff_infer.samplers import sample
from rawdiff_infer.schedule import Schedule
from rawdiff_infer.tiling import TileConfig, TiledDenoiser

from conftest import TINY_CONFIG, perturbed_tiny_model
from test_consistency import NIKON, in_band, rendered

MAX_BATCH = 8
#: the package's formulation: x0 over the residual (the exported graph is the same; the description carries it)
X0_RESIDUAL = Formulation(prediction="x0", space="residual")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[AotiExport, UNet, Path]:
    """A perturbed tiny model saved as a checkpoint and built into a CPU package (batch 1..8) with parity."""
    d = tmp_path_factory.mktemp("aoti")
    model = perturbed_tiny_model(3)
    ckpt = d / "tiny.safetensors"
    save_checkpoint(model, ckpt, meta=ModelMeta(model=TINY_CONFIG, provenance={"note": 'quotes " and \\ kept'},
                                                isp=NIKON, formulation=X0_RESIDUAL))
    res = export_checkpoint_aoti(ckpt, d, device="cpu", max_batch=MAX_BATCH)
    return res, model.eval(), ckpt


def _inputs(n: int, p: int = 64, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, p, p, generator=g), torch.rand(n, 3, p, p, generator=g) * 2 - 1,
            torch.rand(n, generator=g) * 999)


# ---- with a built package (slow: one AOTInductor build per session) --------------------------------------------

@pytest.mark.slow
def test_export_checkpoint_result(built) -> None:
    res, _, ckpt = built
    assert res.path.name == "tiny.cpu.pt2" and res.path.is_file()
    assert res.checkpoint_sha256 == file_sha256(ckpt)
    assert res.rel_error is not None and res.rel_error < 1e-4, res.rel_error
    assert res.reference == "torch eager fp32 on cpu"
    assert read_aoti_info(res.path).target.device_index == -1
    assert not list(res.path.parent.glob(".*.tmp"))  # no temporary left


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 3, MAX_BATCH])
def test_same_eps_as_eager_on_batches_in_range(built, n: int) -> None:
    res, model, _ = built
    x, c, t = _inputs(n)
    with AotiBackend(res.path) as b, torch.no_grad():
        out = b(x, c, t)
        ref = model(x, c, t)
    assert out.dtype == torch.float32 and out.shape == (n, 3, 64, 64)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.slow
def test_contract_ownership_and_layouts(built) -> None:
    """Fresh output per call; NCHW, channels_last, sliced and fp16 inputs all give the same eps (the library itself
    assumes the channels_last float32 inputs it was compiled for and checks nothing)."""
    res, _, _ = built
    x, c, t = _inputs(4)
    with AotiBackend(res.path) as b:
        a1, a2 = b(x, c, t), b(x, c, t)
        assert a1.data_ptr() != a2.data_ptr() and torch.equal(a1, a2)
        a1.zero_()  # the caller owns it: the next call is unaffected
        torch.testing.assert_close(b(x, c, t), a2, rtol=0, atol=0)
        cl = b(x.contiguous(memory_format=torch.channels_last), c.contiguous(memory_format=torch.channels_last), t)
        torch.testing.assert_close(cl, a2, rtol=1e-5, atol=1e-6)
        wide = torch.randn(4, 3, 64, 128)
        wide[..., ::2] = x
        torch.testing.assert_close(b(wide[..., ::2], c, t), a2, rtol=1e-5, atol=1e-6)
        half = b(x.half(), c.half(), t)
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, a2, rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_refuses_out_of_range_batches_and_patch_sizes(built) -> None:
    res, _, _ = built
    with AotiBackend(res.path) as b:
        assert (b.max_batch_size, b.patch_size, b.fixed_patch_size) == (MAX_BATCH, 64, True)
        with pytest.raises(BackendError, match="exceeds the backend's maximum 8"):
            b(*_inputs(MAX_BATCH + 1))
        with pytest.raises(BackendError, match=r"expected x_t, cond \[N, 3, 64, 64\]"):
            b(*_inputs(2, p=32))
        with pytest.raises(BackendError, match="N >= 1"):
            b(*_inputs(0))
        x, c, t = _inputs(2)
        with pytest.raises(BackendError):
            b(torch.randn(2, 4, 64, 64), c, t)
        with pytest.raises(BackendError):
            b(x, c, t[:1])
    with AotiBackend(res.path, max_batch_size=4) as b4:
        with pytest.raises(BackendError, match="maximum 4"):
            b4(*_inputs(5))
    assert AotiBackend(res.path, max_batch_size=100).max_batch_size == MAX_BATCH  # capped by the package


@pytest.mark.slow
def test_metadata_round_trip(built) -> None:
    res, _, ckpt = built
    info = read_aoti_info(res.path)
    assert info.meta == ModelMeta(model=TINY_CONFIG, provenance={"note": 'quotes " and \\ kept'}, isp=NIKON,
                                  formulation=X0_RESIDUAL)
    assert (info.precision, info.patch_size, info.min_batch, info.max_batch) == ("fp32", 64, 1, MAX_BATCH)
    assert info.input_layout == "channels_last"
    assert info.checkpoint_sha256 == file_sha256(ckpt)
    assert info.target.device_type == "cpu" and info.target.torch_version == torch.__version__
    assert info.target.cpu_flags == current_target("cpu").cpu_flags
    with AotiBackend(res.path) as b:
        assert b.meta == info.meta and b.name == "aoti"
        assert "aoti tiny.cpu.pt2 (fp32" in b.describe()


def _tampered(src: Path, dst: Path, **changes: str) -> Path:
    """A copy of the package whose rawdiff metadata has ``changes`` (keys without the ``rawdiff.`` prefix)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("_metadata.json"):
                md = json.loads(data)
                md.update({f"rawdiff.{k}": v for k, v in changes.items()})
                data = json.dumps(md).encode()
            zout.writestr(item, data)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("changes, message", [
    ({"torch_version": "2.0.0+cu118"}, r"built with torch 2\.0\.0\+cu118, running torch"),
    ({"device_type": "cuda", "gpu": "NVIDIA H200", "compute_capability": "1.0"},  # no GPU has 1.0
     r"package built for (CUDA|NVIDIA H200 \(compute capability 1\.0\))"),
    ({"cpu_flags": "avx512_fp16 amx_tile sse2", "cpu": "Sapphire Rapids"}, "instructions this CPU .* lacks: amx_tile"),
    ({"format": "rawdiff-aoti/99"}, "unknown rawdiff package format"),
    ({"patch_size": "sixty-four"}, "invalid rawdiff description"),
    ({"input_layout": "nhwc8c"}, "unknown input layout"),
])
def test_refuses_a_package_built_elsewhere(built, tmp_path: Path, changes: dict[str, str], message: str) -> None:
    res, _, _ = built
    if "cpu_flags" in changes:  # keep this CPU's flags and add two it may lack
        here = current_target("cpu").cpu_flags
        extra = {"avx512_fp16", "amx_tile"} - here
        if not extra:
            pytest.skip("this CPU has both avx512_fp16 and amx_tile")
        changes = {**changes, "cpu_flags": " ".join(sorted(here | extra))}
        message = "instructions this CPU .* lacks: " + sorted(extra)[0]
    bad = _tampered(res.path, tmp_path / "other.pt2", **changes)
    for device in (None, "cpu"):  # the package's own device type, and this machine's
        with pytest.raises(BackendError, match=message) as e:
            AotiBackend(bad, device=device)
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_cpu_package_refused_on_cuda(built) -> None:
    res, _, _ = built
    with pytest.raises(BackendError, match="built for CPU, asked to run on CUDA"):
        AotiBackend(res.path, device="cuda")


@pytest.mark.slow
def test_closed_backend_refuses(built) -> None:
    res, _, _ = built
    b = AotiBackend(res.path)
    b.close()
    b.close()
    with pytest.raises(BackendError, match="closed"):
        b(*_inputs(1))


@pytest.mark.slow
def test_tiled_sampler_same_as_torch_backend(built) -> None:
    """Through the tiler (batches of 4 and a smaller remainder) and 4 sampler steps: AOTI = eager torch."""
    res, model, _ = built
    g = torch.Generator().manual_seed(0)
    cond = torch.rand(1, 3, 90, 110, generator=g) * 2 - 1
    x_T = torch.randn(1, 3, 90, 110, generator=g)

    def run(backend) -> torch.Tensor:
        return sample(TiledDenoiser(backend, cond, TileConfig(stride=48, batch_size=4)), x_T, Schedule(), "dpm", 4)

    with AotiBackend(res.path) as b:
        out = run(b)
    ref = run(TorchBackend(model, ModelMeta(model=TINY_CONFIG), channels_last=False))
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=5e-4)  # 4 steps amplify 1e-6 eps differences to ~2e-4


@pytest.mark.slow
def test_consistent_reconstruction_same_as_torch_backend(built) -> None:
    """The package carries the model's ISP and formulation (x0 over the residual); with the projection, AOTI and
    eager torch give the same consistent output."""
    import numpy as np

    from rawdiff_infer.consistency import Band
    from rawdiff_infer.pipeline import RawReconstructor, SamplerConfig

    res, model, _ = built
    srgb = rendered(NIKON, 48, 80, seed=15)[1]
    img = np.round(srgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    outs = []
    with AotiBackend(res.path) as b:
        for be in (b, TorchBackend(model, ModelMeta(model=TINY_CONFIG, isp=NIKON, formulation=X0_RESIDUAL),
                                   channels_last=False)):
            assert be.meta.isp == NIKON and be.meta.formulation == X0_RESIDUAL
            rec = RawReconstructor(be, sampler=SamplerConfig(method="dpm", steps=3),
                                   tiles=TileConfig(stride=48, batch_size=4))
            outs.append(rec.reconstruct(img, seed=1))
    # 1e-6 differences of the two engines' outputs, through 3 steps of a random model whose x0 is its raw output,
    # reach 7.6e-4 at one pixel of 3840 (5e-4 held for the eps formulation)
    np.testing.assert_allclose(outs[0].encoded, outs[1].encoded, atol=1e-3)
    lin = torch.from_numpy(outs[0].linear).permute(2, 0, 1)
    assert bool(in_band(NIKON, lin, torch.from_numpy(img).permute(2, 0, 1).float() / 255, Band()).all())


@pytest.mark.slow
def test_no_clobber_before_compiling(built) -> None:
    res, model, _ = built
    before = res.path.read_bytes()
    with pytest.raises(OutputExistsError):
        export_aoti(model, ModelMeta(model=TINY_CONFIG), res.path)
    assert res.path.read_bytes() == before


# ---- without a package --------------------------------------------------------------------------------------

def _target(**kw) -> AotiTarget:
    base = dict(device_type="cuda", torch_version="2.13.0+cu128", cuda_version="12.8", gpu="NVIDIA H200",
                compute_capability="9.0", cpu="Xeon", cpu_flags=frozenset({"sse2", "avx2"}), cpu_isa="AVX2")
    base.update(kw)
    return AotiTarget(**base)


def test_compat_rules() -> None:
    ok = _target()
    assert check_aoti_compat(ok, ok) == ([], [])
    errors, _ = check_aoti_compat(ok, _target(gpu="NVIDIA RTX 4090", compute_capability="8.9"))
    assert errors and "compute capability 9.0" in errors[0] and "8.9" in errors[0]
    errors, warnings = check_aoti_compat(ok, _target(gpu="NVIDIA H100 80GB HBM3"))
    assert not errors and "same compute capability 9.0" in warnings[0]
    errors, _ = check_aoti_compat(ok, _target(torch_version="2.13.1+cu128"))
    assert "exact torch build" in errors[0]
    errors, _ = check_aoti_compat(ok, _target(device_type="cpu"))
    assert errors == ["package built for CUDA, asked to run on CPU"]
    errors, _ = check_aoti_compat(_target(cpu_flags=frozenset({"avx512f", "avx2"})), ok)
    assert "lacks: avx512f" in errors[0]
    # flags unknown on one side: the ISA level decides
    assert check_aoti_compat(_target(cpu_flags=frozenset(), cpu_isa="AVX512"), ok)[0]
    assert not check_aoti_compat(_target(cpu_flags=frozenset(), cpu_isa="AVX2"),
                                 _target(cpu_flags=frozenset(), cpu_isa="AVX512"))[0]


def test_target_metadata_round_trip() -> None:
    t = current_target("cpu")
    md = t.to_metadata()
    assert all(isinstance(v, str) for v in md.values())
    assert AotiTarget.from_metadata(md) == t
    assert t.torch_version == torch.__version__ and t.device_type == "cpu" and not t.gpu
    gpu = AotiTarget(device_type="cuda", torch_version="2.13.0+cu128", gpu="NVIDIA H100", compute_capability="9.0",
                     device_index=3)
    assert AotiTarget.from_metadata(gpu.to_metadata()) == gpu
    old = {k: v for k, v in gpu.to_metadata().items() if k != "rawdiff.device_index"}  # a package from before
    assert AotiTarget.from_metadata(old).device_index == -1


def test_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="no such package"):
        read_aoti_info(tmp_path / "missing.pt2")
    (tmp_path / "text.pt2").write_text("not a zip")
    with pytest.raises(BackendError, match="not a zip archive"):
        AotiBackend(tmp_path / "text.pt2")
    with zipfile.ZipFile(tmp_path / "plain.pt2", "w") as z:
        z.writestr("m/data/aotinductor/model/x.wrapper_metadata.json", json.dumps({"AOTI_DEVICE_KEY": "cpu"}))
    with pytest.raises(BackendError, match="without a rawdiff description"):
        read_aoti_info(tmp_path / "plain.pt2")
    with pytest.raises(BackendError, match="cannot read the package"):
        read_aoti_info(tmp_path)  # a directory


def test_export_refuses_bad_options_before_compiling(tmp_path: Path) -> None:
    model, meta = UNet(TINY_CONFIG), ModelMeta(model=TINY_CONFIG)
    out = tmp_path / "m.pt2"
    for kwargs, message in [({"precision": "int8"}, "unknown precision"), ({"patch_size": 60}, "multiple of 8"),
                            ({"max_batch": 1}, "max_batch must be in 2..65536"),
                            ({"device": "meta"}, "cpu or cuda")]:
        with pytest.raises(ExportError, match=message):
            export_aoti(model, meta, out, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ExportError, match="sees no CUDA device"):
            export_aoti(model, meta, out, device="cuda")
    out.write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        export_aoti(model, meta, out)
    assert out.read_bytes() == b"keep" and not list(tmp_path.glob(".*.tmp"))


def test_default_aoti_path(tmp_path: Path) -> None:
    assert default_aoti_path(tmp_path, "model") == tmp_path / "model.cpu.pt2"
    assert default_aoti_path(tmp_path, "model", precision="bf16") == tmp_path / "model.cpu.bf16.pt2"


def test_format_constant() -> None:
    assert AOTI_FORMAT == "rawdiff-aoti/1"


# ---- CUDA ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, UNet]:
    """A perturbed tiny model built into an fp16 CUDA package (batch 1..16) on the current GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = perturbed_tiny_model(4)
    d = tmp_path_factory.mktemp("aoti-cuda")
    path = export_aoti(model, ModelMeta(model=TINY_CONFIG), default_aoti_path(d, "tiny", "cuda"), device="cuda",
                       max_batch=16)
    return path, model


@pytest.mark.gpu
def test_cuda_fp16_package(cuda_package: tuple[Path, UNet]) -> None:
    """fp16 CUDA package: eps against eager fp16 torch on the same GPU, on batches in range; refused on the CPU."""
    path, model = cuda_package
    info = read_aoti_info(path)
    assert (info.precision, info.target.device_type) == ("fp16", "cuda")
    assert info.target.compute_capability == "{}.{}".format(*torch.cuda.get_device_capability())
    assert info.target.device_index == torch.cuda.current_device()
    err, what = aoti_parity(path, model, batch=5)
    assert err < 1e-2, (err, what)
    assert what.endswith(f"on cuda:{torch.cuda.current_device()}"), what
    ref_model = model.half().cuda().eval()
    with AotiBackend(path, device="cuda:0") as b:
        assert b.device == torch.device("cuda", 0)
        for n in (1, 7, 16):
            x, c, t = (v.cuda() for v in _inputs(n))
            out = b(x, c, t)
            assert out.device.type == "cuda" and out.dtype == torch.float32
            with torch.no_grad():
                ref = ref_model(x, c, t).float()
            assert float((out - ref).abs().max() / ref.abs().max()) < 1e-2
        with pytest.raises(BackendError, match="maximum 16"):
            b(*(v.cuda() for v in _inputs(17)))
    with pytest.raises(BackendError, match="built for CUDA, asked to run on CPU"):
        AotiBackend(path, device="cpu")


@pytest.mark.gpu
def test_a_call_does_not_wait_for_the_previous_one(cuda_package: tuple[Path, UNet]) -> None:
    """Issue 23, bug 6: loaded with ``run_single_threaded``, a call queues its work and returns; AOTInductor's
    default run() would wait on the host for the previous call's device work first."""
    import time

    path, _ = cuda_package
    x, c, t = (v.cuda() for v in _inputs(16))
    with AotiBackend(path, device="cuda") as b:
        b(x, c, t)
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # about a second of device work ahead of the calls
        start = time.perf_counter()
        outs = [b(x, c, t) for _ in range(3)]
        host_s = time.perf_counter() - start
        torch.cuda.synchronize()
    assert host_s < 0.3, f"the calls waited {host_s:.2f} s on the host"
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.gpu
def test_a_package_built_on_a_second_gpu_is_named_and_checked_there(tmp_path: Path) -> None:
    """Issue 23, bug 6: built for cuda:1 (or for "cuda" while GPU 1 is current), the package is named after GPU 1
    and its parity is measured on GPU 1, not on GPU 0."""
    from rawdiff_infer.backends.tensorrt import gpu_slug

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    name1 = gpu_slug(torch.cuda.get_device_name(1))
    with torch.cuda.device(1):
        assert default_aoti_path(tmp_path, "m", "cuda") == tmp_path / f"m.{name1}.pt2"
    assert default_aoti_path(tmp_path, "m", "cuda:1") == tmp_path / f"m.{name1}.pt2"
    model = perturbed_tiny_model(4)
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(model, ckpt, meta=ModelMeta(model=TINY_CONFIG))
    res = export_checkpoint_aoti(ckpt, tmp_path, device="cuda:1", max_batch=4)
    assert res.path.name == f"tiny.{name1}.pt2"
    assert read_aoti_info(res.path).target.device_index == 1
    assert res.reference == "torch eager fp16 on cuda:1" and res.rel_error is not None and res.rel_error < 1e-2
