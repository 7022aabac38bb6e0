"""ONNX Runtime and TensorRT backends: contract, agreement with the torch backend, engine compatibility rules.

TensorRT execution needs an NVIDIA GPU and a TensorRT runtime that supports it; those tests carry the ``tensorrt``
marker and skip with the reason printed where either is missing. Everything else runs on any machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
from pathlib import Path

import pytest
import torch

from rawdiff_export import BuildOptions, export_onnx
from rawdiff_infer.backends import BackendError
from rawdiff_infer.backends import onnxruntime as ort_backend
from rawdiff_infer.backends.onnxruntime import OnnxRuntimeBackend, provider_options
from rawdiff_infer.backends.tensorrt import TensorRTBackend, runtime_cache_path
from rawdiff_infer.backends.trt_build import build_engine
from rawdiff_infer.backends.trt_runtime import TensorRTNotFound, load_tensorrt
from rawdiff_infer.backends.trt_sidecar import (EngineSidecar, GpuInfo, RuntimeEnv, SidecarError, check_engine_compat,
                                                detect_gpu,
                                                gpu_slug, parse_cc, parse_version, read_sidecar, sidecar_path)
from rawdiff_infer.backends.torch import TorchBackend
from rawdiff_infer.checkpoint import ModelMeta
from rawdiff_infer.model import UNet
from rawdiff_infer.samplers import sample
from rawdiff_infer.schedule import Schedule
from rawdiff_infer.tiling import TileConfig, TiledDenoiser

from conftest import TINY_CONFIG, perturbed_tiny_model

META = ModelMeta(model=TINY_CONFIG, provenance={"note": "backend tests"})


def _model() -> UNet:
    return perturbed_tiny_model(0)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[UNet, Path, Path]:
    d = tmp_path_factory.mktemp("onnx")
    m = _model()
    return (m, export_onnx(m, META, d / "tiny.onnx", precision="fp32"),
            export_onnx(m, META, d / "tiny.fp16.onnx", precision="fp16"))


def _batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 64, 64, generator=g), torch.rand(n, 3, 64, 64, generator=g) * 2 - 1,
            torch.rand(n, generator=g) * 999)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ---- ONNX Runtime -----------------------------------------------------------------------------------------------

def test_onnx_backend_contract(onnx_files) -> None:
    _, fp32, _ = onnx_files
    b = OnnxRuntimeBackend.from_file(fp32, max_batch_size=4)
    assert b.name == "onnx" and b.meta == META and b.device == torch.device("cpu")
    assert b.input_dtype == torch.float32 and b.max_batch_size == 4
    assert "CPUExecutionProvider" in b.providers and "fp32 graph" in b.describe()
    x, c, t = _batch(3)
    out = b(x, c, t)
    assert out.dtype == torch.float32 and out.shape == x.shape
    out2 = b(x, c, t)
    assert out.data_ptr() != out2.data_ptr() and torch.equal(out, out2)  # deterministic, caller-owned
    out.zero_()
    assert not torch.equal(out, b(x, c, t))
    with pytest.raises(BackendError, match="exceeds"):
        b(*_batch(5))
    with pytest.raises(BackendError, match=r"\[N, 3, 64, 64\]"):
        b(torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32), torch.zeros(2))
    with b:
        pass
    with pytest.raises(BackendError, match="closed"):
        b(x, c, t)


def test_onnx_backend_matches_torch(onnx_files) -> None:
    model, fp32, fp16 = onnx_files
    ref_backend = TorchBackend(model, META, dtype="fp32")
    x, c, t = _batch(4, seed=1)
    ref = ref_backend(x, c, t)
    e32 = _rel(OnnxRuntimeBackend(fp32)(x, c, t), ref)
    e16 = _rel(OnnxRuntimeBackend(fp16)(x, c, t), ref)
    print(f"\nonnx backend vs torch fp32: fp32 graph {e32:.2e}, fp16 graph {e16:.2e} (max relative error)")
    assert e32 < 1e-4
    assert e16 < 3e-2


def test_onnx_backend_through_the_tiled_sampler(onnx_files) -> None:
    """Backend agreement on a whole canvas: broadcast t (expand), strided patches, padded batches."""
    model, fp32, _ = onnx_files
    g = torch.Generator().manual_seed(0)
    cond = torch.rand(1, 3, 70, 90, generator=g) * 2 - 1
    x_T = torch.randn(1, 3, 70, 90, generator=g)
    cfg = TileConfig(stride=48, batch_size=3)
    outs = []
    for backend in (TorchBackend(model, META, dtype="fp32"), OnnxRuntimeBackend(fp32)):
        outs.append(sample(TiledDenoiser(backend, cond, cfg), x_T.clone(), Schedule(), "ddim", 4))
    mse = ((outs[0] - outs[1]) / 2).pow(2).mean().item()
    psnr = 10 * math.log10(1 / max(mse, 1e-30))
    print(f"\ntorch vs onnx backend through 4 DDIM steps: PSNR {psnr:.1f} dB")
    assert psnr > 80


def test_onnx_backend_errors(tmp_path: Path, onnx_files) -> None:
    _, fp32, _ = onnx_files
    with pytest.raises(BackendError, match="no such ONNX file"):
        OnnxRuntimeBackend(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(BackendError, match="cannot load"):
        OnnxRuntimeBackend(tmp_path / "junk.onnx")
    import onnx

    proto = onnx.load(str(fp32))
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "plain.onnx")
    with pytest.raises(BackendError, match="without a rawdiff description"):
        OnnxRuntimeBackend(tmp_path / "plain.onnx")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="torch sees no CUDA"):
            OnnxRuntimeBackend(fp32, device="cuda")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendError, match="onnxruntime-gpu"):
            OnnxRuntimeBackend(fp32, providers=["cuda"])


def _need_ort_cuda() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")


@pytest.mark.gpu
def test_onnx_backend_cuda_io_binding(onnx_files) -> None:
    _need_ort_cuda()
    model, fp32, _ = onnx_files
    b = OnnxRuntimeBackend(fp32, device="cuda")
    x, c, t = (v.cuda() for v in _batch(4))
    out = b(x, c, t)
    assert out.is_cuda and out.dtype == torch.float32
    ref = TorchBackend(model, META, dtype="fp32")(*_batch(4))
    assert _rel(out.cpu(), ref) < 1e-3
    # one device index for the session and the binding; onnxruntime computes on the backend's torch stream
    assert b.device == torch.device("cuda", torch.cuda.current_device())
    assert b._on_torch_stream, b.session.get_provider_options()
    opts = b.session.get_provider_options()["CUDAExecutionProvider"]
    assert opts["device_id"] == str(b.device.index)


@pytest.mark.gpu
def test_onnx_backend_cuda_concurrent_calls(onnx_files) -> None:
    """Several threads share one backend: each call has its own I/O binding and gets its own right answer."""
    _need_ort_cuda()
    _, fp32, _ = onnx_files
    b = OnnxRuntimeBackend(fp32, device="cuda")
    batches = [tuple(v.cuda() for v in _batch(3, seed=s)) for s in range(6)]
    want = [b(*xs).cpu() for xs in batches]
    got: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(5):
                out = b(*batches[i])
            torch.cuda.current_stream().synchronize()
            got[i] = out.cpu()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i, w in enumerate(want):
        assert torch.allclose(got[i], w, rtol=1e-5, atol=1e-6), i


@pytest.mark.gpu
def test_onnx_backend_tensorrt_provider_keeps_one_engine(onnx_files, tmp_path: Path) -> None:
    """The explicit profile (1..max) covers the last, partial batch: one engine, cached, not rebuilt."""
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no TensorrtExecutionProvider (onnxruntime-gpu with TensorRT libraries)")
    _, _, fp16 = onnx_files
    b = OnnxRuntimeBackend(fp16, device="cuda", providers=["tensorrt", "cuda"], max_batch_size=8,
                           trt_cache_dir=tmp_path)
    for n in (8, 3, 8, 1):
        assert b(*(v.cuda() for v in _batch(n))).shape[0] == n
    engines = list(tmp_path.rglob("*.engine"))
    assert len(engines) == 1, engines


def test_onnx_provider_options() -> None:
    """Pure: the options each execution provider gets (names as onnxruntime documents them)."""
    assert provider_options(None, device_id=None, stream=None, max_batch=8, patch_size=64, trt_cache=None) == [
        "CPUExecutionProvider"]
    assert provider_options(None, device_id=2, stream=1234, max_batch=8, patch_size=64, trt_cache=None) == [
        ("CUDAExecutionProvider", {"device_id": 2, "user_compute_stream": "1234"}), "CPUExecutionProvider"]
    (trt_name, trt), (cuda_name, cuda) = provider_options(
        ["tensorrt", ("cuda", {"cudnn_conv_algo_search": "HEURISTIC"})], device_id=0, stream=99, max_batch=16,
        patch_size=32, trt_cache=Path("/c"))
    assert trt_name == "TensorrtExecutionProvider" and cuda_name == "CUDAExecutionProvider"
    assert trt == {"device_id": 0, "user_compute_stream": "99",
                   "trt_profile_min_shapes": "x_t:1x3x32x32,cond:1x3x32x32,t:1",
                   "trt_profile_opt_shapes": "x_t:16x3x32x32,cond:16x3x32x32,t:16",
                   "trt_profile_max_shapes": "x_t:16x3x32x32,cond:16x3x32x32,t:16",
                   "trt_engine_cache_enable": True, "trt_engine_cache_path": "/c",
                   "trt_timing_cache_enable": True, "trt_timing_cache_path": "/c"}
    assert cuda == {"device_id": 0, "user_compute_stream": "99", "cudnn_conv_algo_search": "HEURISTIC"}


def test_onnx_backend_resolves_the_cuda_index_once(monkeypatch) -> None:
    """Bug: the session used ``dev.index or 0`` while the I/O binding used the current device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert ort_backend._device("cuda") == torch.device("cuda", 3)
    assert ort_backend._device("cuda:1") == torch.device("cuda", 1)
    assert ort_backend._device("cpu") == torch.device("cpu")


def test_onnx_backend_concurrent_cpu_calls(onnx_files) -> None:
    _, fp32, _ = onnx_files
    b = OnnxRuntimeBackend(fp32)
    batches = [_batch(2, seed=s) for s in range(4)]
    want = [b(*xs) for xs in batches]
    got: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, b(*batches[i]))) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(got[i], want[i]) for i in range(4))


def _finishes(fn, seconds: float = 30.0) -> BaseException | None:
    """Run ``fn`` in a thread; fail the test if it blocks (a FIFO opened for reading would). Returns its error."""
    box: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            box[0] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), f"{fn} blocked"
    return box[0]


def test_fifo_model_files_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    err = _finishes(lambda: OnnxRuntimeBackend(fifo))
    assert isinstance(err, BackendError) and "FIFO" in str(err), err
    plan = tmp_path / "m.plan"
    os.mkfifo(plan)
    sidecar_path(plan).write_text(json.dumps(_sidecar()))
    err = _finishes(lambda: TensorRTBackend(plan))
    assert isinstance(err, BackendError) and "not a regular file" in str(err), err


# ---- TensorRT: pure parts (no GPU) ------------------------------------------------------------------------------

def _sidecar(**over) -> dict:
    d = {"format": "rawdiff-trt-engine/1", "tensorrt": {"flavour": "tensorrt", "version": "10.13.0.35"},
         "target": {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "compute_capabilities": None},
         "options": {"version_compatible": False, "hardware_compatible": False},
         "profile": {"min_batch": 1, "opt_batch": 64, "max_batch": 256, "patch_size": 64},
         "onnx": {"path": "/nonexistent/model.fp16.onnx", "sha256": "0" * 64, "precision": "fp16"},
         "rawdiff": META.to_dict()}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) else v
    return d


def _parsed(**over) -> EngineSidecar:
    """``_sidecar`` as ``read_sidecar`` returns it."""
    return EngineSidecar.parse(_sidecar(**over))


H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
H200 = GpuInfo("NVIDIA H200", (9, 0))
A100 = GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0))
RTX4090 = GpuInfo("NVIDIA GeForce RTX 4090", (8, 9))
T4 = GpuInfo("Tesla T4", (7, 5))


def test_compat_tensorrt_same_gpu_and_version() -> None:
    assert check_engine_compat(_parsed(), RuntimeEnv("tensorrt", "10.13.0.35", H100)) == ([], [])


@pytest.mark.parametrize("env, match", [
    (RuntimeEnv("tensorrt", "10.13.0.35", A100), "compute capability 9.0"),
    (RuntimeEnv("tensorrt", "10.13.0.35", H200), "specific to the GPU model"),
    (RuntimeEnv("tensorrt", "10.14.1.48", H100), "exact release"),
    (RuntimeEnv("tensorrt-rtx", "1.7.1.116", H100), "built with tensorrt 10.13.0.35, running tensorrt-rtx"),
    (RuntimeEnv("tensorrt", "10.13.0.35", None), "no CUDA GPU"),
])
def test_compat_tensorrt_refusals(env: RuntimeEnv, match: str) -> None:
    errors, _ = check_engine_compat(_parsed(), env)
    assert errors and match in errors[0], errors


def test_compat_tensorrt_version_and_hardware_compatible() -> None:
    vc = _parsed(options={"version_compatible": True})
    errors, warnings = check_engine_compat(vc, RuntimeEnv("tensorrt", "10.14.1.48", H100))
    assert errors == [] and "may be slower" in warnings[0]
    assert check_engine_compat(vc, RuntimeEnv("tensorrt", "11.4.0.106", H100))[0] == []
    assert check_engine_compat(vc, RuntimeEnv("tensorrt", "10.12.0.36", H100))[0]  # older runtime
    assert check_engine_compat(vc, RuntimeEnv("tensorrt", "12.0.0.1", H100))[0]  # two majors later
    hw = _parsed(options={"hardware_compatible": True})
    assert check_engine_compat(hw, RuntimeEnv("tensorrt", "10.13.0.35", A100))[0] == []
    assert "Ampere" in check_engine_compat(hw, RuntimeEnv("tensorrt", "10.13.0.35", T4))[0][0]


def test_compat_tensorrt_rtx() -> None:
    base = {"tensorrt": {"flavour": "tensorrt-rtx", "version": "1.7.1.116"}}
    aot = _parsed(**base, target={"gpu": "AOT/none", "compute_capability": "AOT/none", "compute_capabilities": []})
    assert check_engine_compat(aot, RuntimeEnv("tensorrt-rtx", "1.7.1.116", RTX4090)) == ([], [])
    errors, _ = check_engine_compat(aot, RuntimeEnv("tensorrt-rtx", "1.7.1.116", H100))
    assert "default targets" in errors[0]
    assert check_engine_compat(aot, RuntimeEnv("tensorrt-rtx", "1.8.0.10", RTX4090))[0]  # another release
    named = _parsed(**base, target={"gpu": "AOT/none", "compute_capability": "AOT/none",
                                     "compute_capabilities": ["8.6", "12.0"]})
    assert check_engine_compat(named, RuntimeEnv("tensorrt-rtx", "1.7.1.116", GpuInfo("RTX 5090", (12, 0))))[0] == []
    errors, _ = check_engine_compat(named, RuntimeEnv("tensorrt-rtx", "1.7.1.116", RTX4090))
    assert "8.6, 12.0" in errors[0] and "8.9" in errors[0]


def test_small_parsers() -> None:
    assert parse_cc("8.6") == parse_cc("sm86") == parse_cc("sm_86") == parse_cc("86") == (8, 6)
    assert parse_cc("SM120") == parse_cc("12.0") == (12, 0)
    with pytest.raises(ValueError):
        parse_cc("ampere")
    assert parse_version("10.13.0.35") == (10, 13, 0, 35)
    assert gpu_slug("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"
    assert sidecar_path("a/m.rtx.plan") == Path("a/m.rtx.plan.json")


def test_load_tensorrt_disabled_and_missing(monkeypatch) -> None:
    monkeypatch.setenv("RAWDIFF_TENSORRT", "none")
    with pytest.raises(TensorRTNotFound, match="pip install tensorrt-rtx"):
        load_tensorrt()
    monkeypatch.setenv("RAWDIFF_TENSORRT", "tensorrt_nonexistent_flavour")
    with pytest.raises(TensorRTNotFound, match="names no known TensorRT module"):
        load_tensorrt()


def test_read_sidecar_errors(tmp_path: Path) -> None:
    eng = tmp_path / "m.plan"
    eng.write_bytes(b"plan")
    with pytest.raises(SidecarError, match="sidecar missing"):
        read_sidecar(eng)
    sidecar_path(eng).write_text("{not json")
    with pytest.raises(SidecarError, match="invalid JSON"):
        read_sidecar(eng)
    sidecar_path(eng).write_text(json.dumps({"format": "other"}))
    with pytest.raises(SidecarError, match="unknown sidecar format"):
        read_sidecar(eng)
    sidecar_path(eng).write_text(json.dumps(_sidecar(profile={"max_batch": 0})))
    with pytest.raises(SidecarError, match="invalid profile"):
        read_sidecar(eng)
    sidecar_path(eng).write_text(json.dumps(_sidecar()))
    side = read_sidecar(eng)
    assert side == _parsed() and side.max_batch == 256 and side.meta == META
    assert side.data["tensorrt"]["version"] == "10.13.0.35"
    with pytest.raises(dataclasses.FrozenInstanceError):
        side.max_batch = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        side.options["version_compatible"] = True  # type: ignore[index]
    sidecar_path(eng).write_text(json.dumps(_sidecar(rawdiff={"model": {"patch_size": "sixty-four"}})))
    with pytest.raises(SidecarError, match="invalid rawdiff description"):
        read_sidecar(eng)


def test_tensorrt_backend_clear_errors_without_gpu(tmp_path: Path) -> None:
    eng = tmp_path / "m.plan"
    with pytest.raises(BackendError, match="no such engine file"):
        TensorRTBackend(eng)
    eng.write_bytes(b"plan")
    with pytest.raises(BackendError, match="sidecar missing"):
        TensorRTBackend.from_file(eng)
    sidecar_path(eng).write_text(json.dumps(_sidecar()))
    with pytest.raises(BackendError, match="CUDA devices only"):
        TensorRTBackend(eng, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="needs a CUDA GPU"):
            TensorRTBackend.from_file(eng)
    sidecar_path(eng).write_text(json.dumps({**_sidecar(), "engine": {"file": "m.plan", "sha256": "0" * 64}}))
    with pytest.raises(BackendError, match="the sidecar describes another engine"):
        TensorRTBackend(eng)


# ---- TensorRT: execution (NVIDIA GPU + a TensorRT runtime that supports it) ----------------------------------

def _trt_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU (torch sees no CUDA device)"
    try:
        trt = load_tensorrt()
    except TensorRTNotFound as e:
        return str(e)
    gpu = detect_gpu(torch.cuda.current_device())
    if trt.is_rtx and gpu is not None and (gpu.compute_capability < (7, 5) or gpu.compute_capability[0] in (9, 10, 11)):
        return f"TensorRT-RTX does not support {gpu.name} (compute capability {gpu.cc})"
    return None


@pytest.fixture(scope="module")
def engine(onnx_files, tmp_path_factory: pytest.TempPathFactory):
    reason = _trt_skip_reason()
    if reason:
        print(f"\nskipping TensorRT execution tests: {reason}")
        pytest.skip(reason)
    model, _, fp16 = onnx_files
    d = tmp_path_factory.mktemp("engine")
    res = build_engine(fp16, d / "tiny.plan", options=BuildOptions(min_batch=1, opt_batch=8, max_batch=16))
    return model, res


def _ref_fp16(model: UNet, x, c, t) -> torch.Tensor:
    m = UNet(TINY_CONFIG).eval()
    m.load_state_dict(model.state_dict())
    m = m.cuda().half()
    m.set_fused_attention(False)
    with torch.no_grad():
        return m(x.cuda(), c.cuda(), t.cuda()).float()


@pytest.mark.tensorrt
def test_trt_backend_matches_torch_fp16(engine) -> None:
    model, res = engine
    with TensorRTBackend.from_file(res.engine_path) as b:
        assert b.name == "trt" and b.meta == META and b.max_batch_size == 16
        for n in (1, 5, 16, 3):  # shapes change between calls
            x, c, t = (v.cuda() for v in _batch(n, seed=n))
            out = b(x, c, t)
            assert out.shape == (n, 3, 64, 64) and out.dtype == torch.float32 and out.is_cuda
            err = _rel(out, _ref_fp16(model, x, c, t))
            print(f"\nTensorRT fp16 engine vs torch fp16 (batch {n}): max relative error {err:.2e}")
            assert err < 2e-2
        out1 = b(x, c, t)
        out2 = b(x, c, t)
        assert out1.data_ptr() != out2.data_ptr() and torch.allclose(out1, out2)
        with pytest.raises(BackendError, match="exceeds"):
            b(*(v.cuda() for v in _batch(17)))
    b.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        b.infer(x, c, t)


@pytest.mark.tensorrt
def test_trt_backend_cuda_graph_equals_eager(engine) -> None:
    _, res = engine
    x, c, t = (v.cuda() for v in _batch(5, seed=7))
    with TensorRTBackend(res.engine_path) as eager, TensorRTBackend(res.engine_path, cuda_graph=True) as graphed:
        assert graphed.cuda_graph and graphed.max_batch_size == 16
        a = eager(x, c, t)
        b1 = graphed(x, c, t)
        b2 = graphed(*(v.cuda() for v in _batch(9, seed=8)))
        assert torch.allclose(a, b1, rtol=1e-3, atol=1e-3) and b2.shape[0] == 9


@pytest.mark.tensorrt
def test_trt_backend_refuses_foreign_engine_and_rebuilds(engine, tmp_path: Path) -> None:
    _, res = engine
    side = json.loads(res.sidecar_path.read_text())
    side["tensorrt"]["version"] = "0.0.1"
    foreign = tmp_path / "foreign.plan"
    foreign.write_bytes(res.engine_path.read_bytes())
    sidecar_path(foreign).write_text(json.dumps(side))
    with pytest.raises(BackendError, match="exact release|cannot run"):
        TensorRTBackend(foreign)
    with TensorRTBackend(foreign, rebuild=True) as b:
        assert b.engine_path != foreign and b.engine_path.parent == tmp_path
        assert b(*(v.cuda() for v in _batch(2))).shape == (2, 3, 64, 64)


@pytest.mark.tensorrt
def test_trt_backend_graph_mode_and_runtime_cache(engine) -> None:
    """Our engines are built with REQUIRE_USER_ALLOCATION: rawdiff records the graph itself where TensorRT-RTX says
    the context is stream-capturable; TensorRT-RTX's runtime cache is saved beside the engine on close."""
    _, res = engine
    with TensorRTBackend(res.engine_path, cuda_graph=True) as b:
        assert b.graph_mode in ("manual", "native")
        if not b.trt.is_rtx:
            assert b.graph_mode == "manual"
        out = b(*(v.cuda() for v in _batch(4)))
        assert torch.isfinite(out).all()
        rtx = b.trt.is_rtx
    if rtx:
        assert runtime_cache_path(res.engine_path).stat().st_size > 0


@pytest.mark.tensorrt
def test_trt_backend_refuses_a_sidecar_of_another_engine(engine, tmp_path: Path) -> None:
    _, res = engine
    side = json.loads(res.sidecar_path.read_text())
    side["profile"]["max_batch"] = 512
    liar = tmp_path / "liar.plan"
    liar.write_bytes(res.engine_path.read_bytes())
    sidecar_path(liar).write_text(json.dumps(side))
    with pytest.raises(BackendError, match="sidecar of another engine"):
        TensorRTBackend(liar)


@pytest.mark.tensorrt
def test_trt_backend_rebuild_on_the_second_gpu(engine, tmp_path: Path) -> None:
    """Bug: a rebuild for cuda:1 built for, and described, GPU 0."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    _, res = engine
    side = json.loads(res.sidecar_path.read_text())
    side["tensorrt"]["version"] = "0.0.1"
    foreign = tmp_path / "foreign.plan"
    foreign.write_bytes(res.engine_path.read_bytes())
    sidecar_path(foreign).write_text(json.dumps(side))
    with TensorRTBackend(foreign, device="cuda:1", rebuild=True) as b:
        assert b.sidecar.built_on_gpu == torch.cuda.get_device_name(1)
        assert b(*(v.cuda(1) for v in _batch(2))).device == torch.device("cuda", 1)
