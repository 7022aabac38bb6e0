"""TensorRT runtime pieces on the CPU: the engine life cycle (fakes shaped like the bindings), the builder with the
real TensorRT-RTX module (its ahead-of-time builder runs without a GPU), caches, and the names the code relies on.

What needs a GPU (deserialising and running an engine) is in test_backends_onnx_trt.py, marked ``tensorrt``.
"""

from __future__ import annotations

import enum
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rawdiff_infer.backends.base import BackendError
from rawdiff_infer.backends.tensorrt import activate_engine
from rawdiff_infer.backends.trt_build import (BuildOptions, EngineBuildError, _attach_timing_cache, build_engine,
                                              rebuild_engine)
from rawdiff_infer.backends import trt_build
from rawdiff_infer.backends.trt_engine import (RTX_RUNTIME_API, Engine, RuntimeCacheFile, check_profile,
                                               read_engine_io)
from rawdiff_infer.backends.trt_runtime import TensorRT, load_tensorrt
from rawdiff_infer.backends.trt_sidecar import SIDECAR_FORMAT, EngineSidecar, GpuInfo, read_sidecar, sidecar_path
from rawdiff_infer.checkpoint import ModelMeta

from conftest import TINY_CONFIG, perturbed_tiny_model

META = ModelMeta(model=TINY_CONFIG, provenance={"note": "trt runtime tests"})


# ---- fakes shaped like tensorrt_rtx_bindings (only what trt_engine touches) ----------------------------------------

class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class _ILogger:
    Severity = _Severity

    def __init__(self) -> None:
        pass


class _Diag(enum.IntFlag):
    VERSION_MISMATCH = 1
    UNSUPPORTED_CC = 2
    MALFORMED_ENGINE = 32


class FakeCache:
    def __init__(self, accepts: bool = True) -> None:
        self.accepts, self.loaded = accepts, None

    def deserialize(self, blob: bytes) -> bool:
        self.loaded = bytes(blob)
        return self.accepts

    def serialize(self) -> bytes:
        return b"compiled kernels"


class FakeConfig:
    def __init__(self, cache_accepts: bool = True) -> None:
        self.cuda_graph_strategy = self.dynamic_shapes_kernel_specialization_strategy = None
        self.cache_accepts, self.cache = cache_accepts, None

    def create_runtime_cache(self) -> FakeCache:
        return FakeCache(self.cache_accepts)

    def set_runtime_cache(self, cache: FakeCache) -> bool:
        self.cache = cache
        return True


class FakeContext:
    def __init__(self, engine: "FakeEngine", config: FakeConfig | None) -> None:
        self.engine, self.config = engine, config
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.engine.output_shape(self.shapes["x_t"])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def is_stream_capturable(self, stream: int) -> bool:
        return self.engine.capturable

    def execute_async_v3(self, stream: int) -> bool:
        return True


class FakeEngine:
    """An engine with profile batch ``prof`` and patch ``p``; ``output_shape`` can be made to lie."""

    def __init__(self, prof: tuple[int, int, int] = (1, 8, 16), p: int = 64, capturable: bool = True) -> None:
        self.prof, self.p, self.capturable = prof, p, capturable
        self.names = ["x_t", "cond", "t", "eps"]
        self.num_io_tensors = 4
        self.configs: list[FakeConfig] = []
        self.output_shape = lambda x_shape: x_shape

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "OUTPUT" if name == "eps" else "INPUT"

    def get_tensor_dtype(self, name: str) -> str:
        return "FLOAT"

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        assert profile == 0
        return [(b,) if name == "t" else (b, 3, self.p, self.p) for b in self.prof]

    def create_runtime_config(self) -> FakeConfig:
        self.configs.append(FakeConfig())
        return self.configs[-1]

    def create_execution_context(self, config: FakeConfig | None = None) -> FakeContext:
        return FakeContext(self, config)


class FakeRuntime:
    validity = ("INVALID", _Diag.UNSUPPORTED_CC)
    engine: FakeEngine | None = None
    engine_header_size = 8

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def get_engine_validity(self, header: bytes) -> tuple[str, int]:
        assert len(header) <= self.engine_header_size
        return self.validity

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        return self.engine


def fake_trt(rtx: bool = True) -> TensorRT:
    m = SimpleNamespace(
        ILogger=_ILogger, Runtime=FakeRuntime, EngineInvalidityDiagnostics=_Diag,
        TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        DataType=SimpleNamespace(FLOAT="FLOAT", HALF="HALF"),
        EngineValidity=SimpleNamespace(VALID="VALID", SUBOPTIMAL="SUBOPTIMAL", INVALID="INVALID"),
        CudaGraphStrategy=SimpleNamespace(DISABLED="graph-disabled", WHOLE_GRAPH_CAPTURE="graph-whole"),
        DynamicShapesKernelSpecializationStrategy=SimpleNamespace(LAZY="lazy", EAGER="eager", NONE="none"),
        __name__="fake_tensorrt")
    return TensorRT(m, "tensorrt-rtx" if rtx else "tensorrt", "1.7.1.116" if rtx else "10.13.0.35")  # type: ignore


def loaded(engine: FakeEngine, rtx: bool = True, validity: str = "VALID") -> Engine:
    FakeRuntime.engine, FakeRuntime.validity = engine, (validity, _Diag(0))
    e = Engine(fake_trt(rtx), "fake.plan")
    e.load_bytes(b"plan-bytes")
    return e


# ---- bug 4: shapes come from the engine, and a sidecar that disagrees is refused -----------------------------------

def _sidecar(min_b: int = 1, opt_b: int = 8, max_b: int = 16, p: int = 64) -> EngineSidecar:
    return EngineSidecar.parse({
        "format": SIDECAR_FORMAT, "tensorrt": {"flavour": "tensorrt", "version": "10.13.0.35"},
        "target": {"gpu": "Fake GPU 0", "compute_capability": "8.9"}, "onnx": {}, "rawdiff": META.to_dict(),
        "profile": {"min_batch": min_b, "opt_batch": opt_b, "max_batch": max_b, "patch_size": p}})


def test_io_comes_from_the_engine_profile() -> None:
    io = read_engine_io(fake_trt(), FakeEngine(prof=(2, 8, 32), p=32))
    assert (io.min_batch, io.opt_batch, io.max_batch, io.patch_size) == (2, 8, 32, 32)
    assert io.dtypes == {"x_t": torch.float32, "cond": torch.float32, "t": torch.float32, "eps": torch.float32}
    check_profile(io, _sidecar(2, 8, 32, 32))


@pytest.mark.parametrize("side, what", [(_sidecar(max_b=256), "batch 1/8/256"), (_sidecar(p=32), "patch 32")])
def test_sidecar_that_disagrees_with_its_engine_is_refused(side: EngineSidecar, what: str) -> None:
    io = read_engine_io(fake_trt(), FakeEngine())
    with pytest.raises(BackendError) as info:
        check_profile(io, side, "m.plan")
    msg = str(info.value)
    assert "\n" not in msg and what in msg and "engine has batch 1/8/16, patch 64" in msg, msg


def test_buffers_follow_the_engine_and_the_output_shape_is_checked() -> None:
    eng = FakeEngine(prof=(1, 4, 12), p=16)
    e = loaded(eng)
    e.activate()
    bufs = e.allocate(torch.device("cpu"), 12)
    assert {k: tuple(v.shape) for k, v in bufs.items()} == {
        "x_t": (12, 3, 16, 16), "cond": (12, 3, 16, 16), "t": (12,), "eps": (12, 3, 16, 16)}
    assert e.context.addresses == {k: v.data_ptr() for k, v in bufs.items()}
    assert e.set_batch(5) == (5, 3, 16, 16) and e.context.shapes["t"] == (5,)
    with pytest.raises(BackendError, match="outside the engine's profile 1..12"):
        e.allocate(torch.device("cpu"), 13)
    eng.output_shape = lambda x_shape: (x_shape[0], 1, 16, 16)  # an engine whose output is not eps-shaped
    with pytest.raises(BackendError, match=r"output is \(7, 1, 16, 16\), not \(7, 3, 16, 16\)"):
        e.set_batch(7)


def test_not_an_eps_model_is_refused() -> None:
    eng = FakeEngine()
    eng.names = ["x_t", "cond", "timestep", "eps"]
    with pytest.raises(BackendError, match="not a rawdiff eps-model"):
        read_engine_io(fake_trt(), eng)


# ---- bug 5: the header check warns; deserialisation decides ---------------------------------------------------------

def test_invalid_header_verdict_warns_and_loading_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    FakeRuntime.engine, FakeRuntime.validity = FakeEngine(), ("INVALID", _Diag.UNSUPPORTED_CC)
    e = Engine(fake_trt(), "m.plan")
    with caplog.at_level(logging.WARNING):
        io = e.load_bytes(b"plan-bytes")
    assert io.max_batch == 16
    assert "header check says the engine cannot run here (unsupported_cc); trying to load it anyway" in caplog.text


def test_invalid_header_and_failed_deserialisation_is_one_line() -> None:
    FakeRuntime.engine, FakeRuntime.validity = None, ("INVALID", _Diag.VERSION_MISMATCH | _Diag.MALFORMED_ENGINE)
    with pytest.raises(BackendError) as info:
        Engine(fake_trt(), "m.plan").load_bytes(b"plan-bytes")
    msg = str(info.value)
    assert "\n" not in msg and "could not deserialize" in msg and "version_mismatch, malformed_engine" in msg, msg


# ---- bug 3: TensorRT-RTX runtime config, CUDA-graph mode, runtime cache ----------------------------------------------

def test_rtx_context_gets_eager_kernels_and_the_graph_strategy() -> None:
    eng = FakeEngine()
    e = loaded(eng)
    mode = activate_engine(e, cuda_graph=True, user_allocation=True, stream_handle=7, device=torch.device("cpu"),
                           max_batch=16, runtime_cache=None)
    assert mode == "manual" and e.graph == "manual"
    cfg = e.context.config
    assert cfg.dynamic_shapes_kernel_specialization_strategy == "eager"
    assert cfg.cuda_graph_strategy == "graph-disabled"  # rawdiff records the graph: TensorRT-RTX must not


def test_rtx_falls_back_to_its_own_graphs_when_capture_is_impossible() -> None:
    e = loaded(FakeEngine())
    mode = activate_engine(e, cuda_graph=True, user_allocation=False, stream_handle=7, device=torch.device("cpu"),
                           max_batch=16, runtime_cache=None)
    assert mode == "native" and e.context.config.cuda_graph_strategy == "graph-whole"
    e = loaded(FakeEngine(capturable=False))
    mode = activate_engine(e, cuda_graph=True, user_allocation=True, stream_handle=7, device=torch.device("cpu"),
                           max_batch=16, runtime_cache=None)
    assert mode == "native" and e.context.config.cuda_graph_strategy == "graph-whole"
    assert e.context.addresses == {k: v.data_ptr() for k, v in e.buffers.items()}  # the new context is bound
    assert e.context.shapes["x_t"] == (16, 3, 64, 64)


def test_tensorrt_without_capture_is_refused_and_has_no_native_graphs() -> None:
    e = loaded(FakeEngine(capturable=False), rtx=False)
    with pytest.raises(BackendError, match="cannot be recorded in a CUDA graph"):
        activate_engine(e, cuda_graph=True, user_allocation=False, stream_handle=7, device=torch.device("cpu"),
                        max_batch=16, runtime_cache=None)
    e = loaded(FakeEngine(), rtx=False)
    assert activate_engine(e, cuda_graph=False, user_allocation=False, stream_handle=7, device=torch.device("cpu"),
                           max_batch=8, runtime_cache=None) == "off"
    assert e.context.config is None  # TensorRT 10/11: a plain context
    with pytest.raises(BackendError, match="no CUDA-graph strategy"):
        e.activate(graph="native")


def test_runtime_cache_is_loaded_shared_and_saved(tmp_path: Path) -> None:
    path = tmp_path / "m.plan.rtcache"
    path.write_bytes(b"kernels from last time")
    cache = RuntimeCacheFile(path)
    e = loaded(FakeEngine(capturable=False))
    activate_engine(e, cuda_graph=True, user_allocation=True, stream_handle=7, device=torch.device("cpu"),
                    max_batch=16, runtime_cache=cache)  # two contexts (manual, then native): one cache
    first, second = (c.cache for c in e.engine.configs)
    assert first is second is cache.cache and cache.cache.loaded == b"kernels from last time"
    e.close()
    assert path.read_bytes() == b"compiled kernels" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_foreign_or_odd_runtime_cache_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m.plan.rtcache"
    path.write_bytes(b"from another driver")
    cfg = FakeConfig(cache_accepts=False)
    with caplog.at_level(logging.WARNING):
        RuntimeCacheFile(path).attach(cfg)
    assert "written by another TensorRT-RTX" in caplog.text and cfg.cache is not None
    fifo = tmp_path / "fifo.rtcache"
    import os

    os.mkfifo(fifo)
    caplog.clear()
    cache = RuntimeCacheFile(fifo)
    with caplog.at_level(logging.WARNING):
        cache.attach(FakeConfig())  # must not block on the FIFO
        cache.save()
    assert "FIFO" in caplog.text and "not replaced" in caplog.text
    assert fifo.is_fifo()


def test_rtx_names_used_exist_in_the_installed_bindings() -> None:
    t = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed")
    missing = [f"{cls}.{name}" for cls, names in RTX_RUNTIME_API.items() for name in names
               if not hasattr(getattr(t, cls), name)]
    assert not missing, f"{t.__version__}: {missing}"
    # the CUDA-graph page of TensorRT-RTX's documentation: these spellings, on these classes
    assert hasattr(t.IExecutionContext, "is_stream_capturable") and hasattr(t.IRuntimeConfig, "cuda_graph_strategy")


# ---- the builder, with the real TensorRT-RTX module (no GPU needed) --------------------------------------------------

def _rtx() -> TensorRT:
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed")
    return load_tensorrt(prefer="tensorrt-rtx")


@pytest.fixture(scope="module")
def fp16_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rawdiff_export import export_onnx  # the test builds its input with the exporter; the runtime never does

    return export_onnx(perturbed_tiny_model(0), META, tmp_path_factory.mktemp("onnx") / "tiny.fp16.onnx",
                       precision="fp16")


def test_rtx_build_requires_user_allocation(tmp_path: Path, fp16_onnx: Path) -> None:
    trt = _rtx()
    res = build_engine(fp16_onnx, tmp_path / "e.plan", options=BuildOptions(max_batch=16, opt_batch=8), trt=trt)
    assert res.sidecar.require_user_allocation is True
    builder, network, _ = trt_build.parse_network(trt, fp16_onnx)
    config, *_ = trt_build._configure(trt, builder, network, BuildOptions(max_batch=16, opt_batch=8), None)
    assert config.get_flag(trt.module.BuilderFlag.REQUIRE_USER_ALLOCATION)
    config, *_ = trt_build._configure(trt, builder, network, BuildOptions(max_batch=16, opt_batch=8,
                                                                          require_user_allocation=False), None)
    assert not config.get_flag(trt.module.BuilderFlag.REQUIRE_USER_ALLOCATION)


def test_rtx_engine_load_without_gpu_warns_then_fails_in_one_line(tmp_path: Path, fp16_onnx: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The real header check on a machine without a usable GPU: a warning, then deserialisation decides."""
    trt = _rtx()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the engine would load")
    res = build_engine(fp16_onnx, tmp_path / "e.plan", options=BuildOptions(max_batch=16, opt_batch=8), trt=trt)
    with caplog.at_level(logging.WARNING), pytest.raises(BackendError) as info:
        Engine(trt, "e.plan").load(res.engine_path)
    assert "trying to load it anyway" in caplog.text
    assert "could not deserialize" in str(info.value) and "\n" not in str(info.value)


class _Recorder:
    """detect_gpu stand-in: GPU number N is 'Fake GPU N', compute capability 9.0 (not a TensorRT-RTX target, so the
    ahead-of-time build runs on this CPU)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, device: int = 0) -> GpuInfo:
        self.calls.append(device)
        return GpuInfo(f"Fake GPU {device}", (9, 0))


def test_build_and_rebuild_target_the_given_device(tmp_path: Path, fp16_onnx: Path, monkeypatch) -> None:
    """Bug: a rebuild for cuda:1 asked detect_gpu() about device 0, so engine and sidecar described the wrong card."""
    trt = _rtx()
    rec = _Recorder()
    monkeypatch.setattr(trt_build, "detect_gpu", rec)
    res = build_engine(fp16_onnx, tmp_path / "e.plan", options=BuildOptions(max_batch=16, opt_batch=8), trt=trt,
                       device=0)
    assert rec.calls == [0] and res.sidecar.built_on_gpu == "Fake GPU 0"
    rec.calls.clear()
    side = read_sidecar(res.engine_path)
    again = rebuild_engine(res.engine_path, side, "engine built for another GPU", trt=trt, device=1)
    assert rec.calls and set(rec.calls) == {1}, rec.calls
    assert again.sidecar.built_on_gpu == "Fake GPU 1"
    profile = (side.min_batch, side.opt_batch, side.max_batch, side.patch_size)
    assert again.engine_path.parent == tmp_path
    assert (again.sidecar.min_batch, again.sidecar.opt_batch, again.sidecar.max_batch,
            again.sidecar.patch_size) == profile
    assert again.sidecar.require_user_allocation is True


def test_rebuild_refuses_a_changed_or_missing_onnx(tmp_path: Path, fp16_onnx: Path) -> None:
    trt = _rtx()
    res = build_engine(fp16_onnx, tmp_path / "e.plan", options=BuildOptions(max_batch=16, opt_batch=8), trt=trt)
    side = json.loads(res.sidecar_path.read_text())
    side["onnx"]["sha256"] = "0" * 64
    with pytest.raises(EngineBuildError, match="changed since the engine was built"):
        rebuild_engine(res.engine_path, EngineSidecar.parse(side), "why", trt=trt, device=0)
    side["onnx"]["path"] = str(tmp_path / "gone.onnx")
    with pytest.raises(EngineBuildError, match="gone.onnx"):
        rebuild_engine(res.engine_path, EngineSidecar.parse(side), "why", trt=trt, device=0)


# ---- bug 5: a foreign timing cache never aborts a build ------------------------------------------------------------

class _RefusingConfig:
    """A builder config whose TensorRT refuses foreign blobs by raising, or whose set_timing_cache says False."""

    def __init__(self, mode: str) -> None:
        self.mode, self.attached = mode, None

    def create_timing_cache(self, blob: bytes) -> Any:
        if blob and self.mode == "raise":
            raise RuntimeError("timing cache from TensorRT 10.9 cannot be read by 10.13")
        return SimpleNamespace(blob=bytes(blob), serialize=lambda: bytes(blob))

    def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
        if cache.blob and self.mode == "mismatch":
            return False
        self.attached = cache
        return True


@pytest.mark.parametrize("mode", ["raise", "mismatch"])
def test_foreign_timing_cache_falls_back_to_a_fresh_one(tmp_path: Path, mode: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "timing.cache"
    path.write_bytes(b"another version's cache")
    cfg = _RefusingConfig(mode)
    with caplog.at_level(logging.WARNING):
        cache = _attach_timing_cache(cfg, str(path))
    assert cfg.attached is cache and cache.blob == b""
    assert "written by another TensorRT version or GPU" in caplog.text


def test_timing_cache_silently_emptied_by_tensorrt_is_reported(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The real bindings answer a foreign blob with an empty cache (and a log line): detected, warned about."""
    trt = _rtx()
    path = tmp_path / "timing.cache"
    path.write_bytes(b"x" * 100)
    config = trt.module.Builder(trt.module.Logger(trt.module.Logger.ERROR)).create_builder_config()
    with caplog.at_level(logging.WARNING), pytest.warns(DeprecationWarning):
        assert _attach_timing_cache(config, str(path)) is not None
    assert "written by another TensorRT version or GPU" in caplog.text


def test_timing_cache_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "timing.cache"
    os.mkfifo(fifo)
    with pytest.raises(EngineBuildError, match="FIFO"):
        _attach_timing_cache(_RefusingConfig("ok"), str(fifo))


def test_sidecar_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    from rawdiff_infer.backends.trt_sidecar import SidecarError

    eng = tmp_path / "m.plan"
    eng.write_bytes(b"plan")
    os.mkfifo(sidecar_path(eng))
    with pytest.raises(SidecarError, match="FIFO"):
        read_sidecar(eng)
