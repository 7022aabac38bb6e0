"""rawdiff-export: ONNX graphs (parity, precision islands, metadata), TensorRT(-RTX) build, the CLI.

Parity references (documented here and printed by the tests):
- fp32 graph: onnxruntime CPU vs the torch fp32 model (explicit attention), max |a - b| / max |b| < 1e-4.
- fp16 graph: onnxruntime CPU vs the same torch model with its weights cast to fp16 and run in fp16 on the CPU (the
  fp32 islands computed in fp32 as written in model.py). Both round every op to fp16, in different kernels, so the
  tolerance is fp16's: < 1e-2. The fp16 graph must also differ measurably from the fp32 model (it really is fp16).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from rawdiff_export import (BuildOptions, EngineBuildError, ExportError, OnnxInfoError, check_graph, export_checkpoint,
                            export_onnx, onnx_parity, op_dtype_counts, read_onnx_info, read_onnx_meta)
from rawdiff_export.cli import main
from rawdiff_export.onnx_export import _rel_error
from rawdiff_infer.checkpoint import ModelMeta, file_sha256, load_checkpoint, save_checkpoint
from rawdiff_infer.model import UNet, UNetConfig

from conftest import TINY_CONFIG, perturbed_tiny_model


def _tiny_model(seed: int = 0) -> UNet:
    return perturbed_tiny_model(seed)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("export")
    model = _tiny_model()
    ckpt = save_checkpoint(model, d / "tiny.safetensors", steps=123)
    res = export_checkpoint(ckpt, d / "out")
    return model, ckpt, res


def _ort(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _inputs(n: int, p: int = 64, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, p, p, generator=g), torch.rand(n, 3, p, p, generator=g) * 2 - 1,
            torch.rand(n, generator=g) * 999)


# ---- parity ---------------------------------------------------------------------------------------------------

def test_fp32_parity(exported) -> None:
    model, _, res = exported
    err, ref = onnx_parity(res.fp32_path, model, precision="fp32", batch=3)
    print(f"\nfp32 ONNX (onnxruntime CPU) vs {ref}: max relative error {err:.3e}")
    assert err < 1e-4
    assert res.fp32_rel_error is not None and res.fp32_rel_error < 1e-4


def test_fp16_parity_and_really_fp16(exported) -> None:
    model, _, res = exported
    err, ref = onnx_parity(res.fp16_path, model, precision="fp16", batch=3)
    print(f"\nfp16 ONNX (onnxruntime CPU) vs {ref}: max relative error {err:.3e}")
    assert err < 1e-2
    # against the fp32 model the fp16 graph is visibly less exact: it does compute in fp16
    x, c, t = _inputs(3)
    out16 = torch.from_numpy(_ort(res.fp16_path).run(["eps"], {"x_t": x.numpy(), "cond": c.numpy(),
                                                                "t": t.numpy()})[0])
    m = UNet(TINY_CONFIG).eval()
    m.load_state_dict(model.state_dict())
    m.set_fused_attention(False)
    with torch.no_grad():
        ref32 = m(x, c, t)
    e32 = _rel_error(out16, ref32)
    print(f"fp16 ONNX vs torch fp32 model: max relative error {e32:.3e}")
    assert 1e-5 < e32 < 3e-2


def test_dynamic_batch(exported) -> None:
    _, _, res = exported
    for path in (res.fp32_path, res.fp16_path):
        sess = _ort(path)
        for n in (1, 5):
            x, c, t = _inputs(n)
            (eps,) = sess.run(["eps"], {"x_t": x.numpy(), "cond": c.numpy(), "t": t.numpy()})
            assert eps.shape == (n, 3, 64, 64) and eps.dtype == np.float32 and np.isfinite(eps).all()


# ---- graph structure and precision islands --------------------------------------------------------------------

def test_fp16_graph_types(exported) -> None:
    _, _, res = exported
    proto = onnx.load(str(res.fp16_path))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    counts = op_dtype_counts(proto)
    print("\nfp16 graph (op, output dtype): count")
    for k, v in sorted(counts.items()):
        print(f"  {k[0]:22s} {k[1]:8s} {v}")
    by_op: dict[str, set[str]] = {}
    for op, dt in counts:
        by_op.setdefault(op, set()).add(dt)
    for op in ("Conv", "MatMul", "Gemm"):
        assert by_op[op] == {"FLOAT16"}, op
    for op in ("InstanceNormalization", "Softmax", "Sin", "Cos"):
        assert by_op[op] == {"FLOAT"}, op
    assert "GroupNormalization" not in by_op
    cfg = TINY_CONFIG
    n_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in UNet(cfg).modules())
    assert counts[("InstanceNormalization", "FLOAT")] == n_norms
    for vi in [*proto.graph.input, *proto.graph.output]:
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, vi.name
    assert [i.name for i in proto.graph.input] == ["x_t", "cond", "t"]
    assert [o.name for o in proto.graph.output] == ["eps"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, 64, 64]  # dynamic batch, fixed patch
    # the heavy weights are stored in fp16
    conv_w = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    dtypes = {i.data_type for i in proto.graph.initializer if i.name in conv_w}
    assert dtypes == {onnx.TensorProto.FLOAT16}
    assert check_graph(proto, "fp16") == []


def test_fp32_graph_has_no_half(exported) -> None:
    _, _, res = exported
    proto = onnx.load(str(res.fp32_path))
    onnx.checker.check_model(proto, full_check=True)
    assert all(dt != "FLOAT16" for (_op, dt) in op_dtype_counts(proto))
    assert check_graph(proto, "fp32") == []


def test_check_graph_flags_group_normalization(exported) -> None:
    _, _, res = exported
    proto = onnx.load(str(res.fp16_path))
    node = next(n for n in proto.graph.node if n.op_type == "InstanceNormalization")
    node.op_type = "GroupNormalization"
    problems = check_graph(proto, "fp16")
    assert any("GroupNormalization" in p for p in problems)


# ---- metadata ---------------------------------------------------------------------------------------------------

def test_metadata_round_trip(exported) -> None:
    _, ckpt, res = exported
    _, meta = load_checkpoint(ckpt)
    for path, precision in ((res.fp32_path, "fp32"), (res.fp16_path, "fp16")):
        assert read_onnx_meta(path) == meta
        info = read_onnx_info(path)
        assert info.precision == precision and info.patch_size == 64 and info.opset == 17
        assert info.checkpoint_sha256 == file_sha256(ckpt) == res.checkpoint_sha256
        assert "torch.onnx.export" in info.exporter
    assert meta.provenance["steps"] == 123


def test_read_onnx_meta_rejects_foreign_files(tmp_path: Path, exported) -> None:
    _, _, res = exported
    proto = onnx.load(str(res.fp32_path))
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "plain.onnx")
    with pytest.raises(OnnxInfoError, match="without a rawdiff description"):
        read_onnx_meta(tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01junk")
    with pytest.raises(OnnxInfoError):
        read_onnx_meta(tmp_path / "junk.onnx")
    with pytest.raises(OnnxInfoError, match="no such"):
        read_onnx_meta(tmp_path / "missing.onnx")


def test_export_options(tmp_path: Path) -> None:
    model = _tiny_model()
    meta = ModelMeta(model=TINY_CONFIG)
    with pytest.raises(ExportError, match="opset"):
        export_onnx(model, meta, tmp_path / "a.onnx", opset=16)
    with pytest.raises(ExportError, match="multiple of 8"):
        export_onnx(model, meta, tmp_path / "a.onnx", patch_size=60)
    p = export_onnx(model, meta, tmp_path / "p32.onnx", precision="fp16", patch_size=32, opset=18)
    info = read_onnx_info(p)
    assert info.patch_size == 32 and info.opset == 18
    x, c, t = _inputs(2, 32)
    (eps,) = _ort(p).run(["eps"], {"x_t": x.numpy(), "cond": c.numpy(), "t": t.numpy()})
    assert eps.shape == (2, 3, 32, 32)
    assert sorted(os.listdir(tmp_path)) == ["p32.onnx"]  # failures left nothing; no temporaries
    assert model.dtype == torch.float32  # the caller's model is not cast


# ---- TensorRT(-RTX) -------------------------------------------------------------------------------------------

def _rtx():
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed "
                        "(pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings)")
    from rawdiff_infer.backends.tensorrt import load_tensorrt

    return load_tensorrt(prefer="tensorrt-rtx")


def test_paper_size_fp16_onnx_builds_with_tensorrt_rtx_without_gpu(tmp_path: Path) -> None:
    """The paper-size U-Net's fp16 graph parses with no error and builds a strongly typed engine ahead of time."""
    trt = _rtx()
    from rawdiff_export.trt_build import build_engine, network_dtype_counts, parse_network

    torch.manual_seed(0)
    model = UNet(UNetConfig())  # the paper's configuration
    meta = ModelMeta()
    onnx_path = export_onnx(model, meta, tmp_path / "paper.fp16.onnx", precision="fp16")
    _, network, parser = parse_network(trt, onnx_path)
    assert parser.num_errors == 0
    counts = network_dtype_counts(network)
    dtypes: dict[str, set[str]] = {}
    for kind, dt in counts:
        dtypes.setdefault(kind, set()).add(dt)
    assert dtypes["CONVOLUTION"] == {"HALF"} and dtypes["MATRIX_MULTIPLY"] == {"HALF"}
    assert dtypes["NORMALIZATION"] == {"FLOAT"} and dtypes["SOFTMAX"] == {"FLOAT"}
    opts = BuildOptions(min_batch=1, opt_batch=64, max_batch=256, opt_level=3)
    res = build_engine(onnx_path, options=opts, trt=trt)
    side = json.loads(res.sidecar_path.read_text())
    print(f"\n{trt.describe()}: paper-size fp16 engine built in {res.seconds:.1f} s, "
          f"engine {res.engine_bytes / 1e6:.1f} MB, fp16 ONNX {onnx_path.stat().st_size / 1e6:.1f} MB, "
          f"target {side['target']['gpu']}")
    assert res.engine_path.stat().st_size == res.engine_bytes > 1_000_000
    assert side["onnx"]["sha256"] == __import__("hashlib").sha256(onnx_path.read_bytes()).hexdigest()
    assert side["onnx"]["precision"] == "fp16" and side["options"]["strongly_typed"] is True
    assert side["tensorrt"] == {"flavour": "tensorrt-rtx", "module": trt.module_name, "version": trt.version}
    assert side["profile"]["min_batch"] == 1 and side["profile"]["max_batch"] == 256
    assert side["profile"]["patch_size"] == 64
    assert ModelMeta.from_dict(side["rawdiff"]) == meta
    if not torch.cuda.is_available():
        assert side["target"]["gpu"] == "AOT/none" and side["target"]["compute_capability"] == "AOT/none"


def test_tensorrt_rtx_options(tmp_path: Path, exported) -> None:
    trt = _rtx()
    from rawdiff_export.trt_build import build_engine

    _, _, res = exported
    with pytest.raises(EngineBuildError, match="not supported by TensorRT-RTX"):
        build_engine(res.fp16_path, tmp_path / "e.plan", options=BuildOptions(version_compatible=True), trt=trt)
    with pytest.raises(EngineBuildError, match="cannot target compute capability 9.0"):
        build_engine(res.fp16_path, tmp_path / "e.plan", options=BuildOptions(compute_capabilities=("sm90",)), trt=trt)
    assert not (tmp_path / "e.plan").exists()
    out = build_engine(res.fp16_path, options=BuildOptions(max_batch=32, opt_batch=8,
                                                           compute_capabilities=("8.6", "sm120")), trt=trt)
    assert out.engine_path.name == "tiny.rtx-sm86-sm120.plan"
    assert out.sidecar.target_ccs == ("8.6", "12.0")
    assert not [f for f in os.listdir(out.engine_path.parent) if f.startswith(".")]  # no temporaries


def test_build_options_validation() -> None:
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BuildOptions(min_batch=4, opt_batch=2, max_batch=8)
    with pytest.raises(ValueError, match="0..5"):
        BuildOptions(opt_level=7)
    assert BuildOptions(compute_capabilities=("sm86", "12.0", "sm_89")).compute_capabilities == ("8.6", "12.0", "8.9")


def test_no_half_precision_builder_flag_in_code() -> None:
    """FP16 must come from the graph (strongly typed); the weakly typed flag is never named, not even guarded."""
    root = Path(__file__).resolve().parents[1]
    half = "FP" + "16"  # spelled in two parts so that this test itself does not name the flag
    files = [*(root / "export").glob("*.py"), *(root / "rawdiff_infer" / "backends").glob("*.py")]
    assert len(files) > 8
    for f in files:
        text = f.read_text()
        assert f"BuilderFlag.{half}" not in text and f'"{half}"' not in text and f"'{half}'" not in text, f


# ---- CLI --------------------------------------------------------------------------------------------------------

@pytest.fixture()
def tiny_ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(_tiny_model(), tmp_path / "ckpt" / "tiny.safetensors")


def test_cli_onnx_only(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["--ckpt", str(tiny_ckpt), "--out", str(out), "--onnx-only"])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["tiny.fp16.onnx", "tiny.onnx"]
    assert "parity fp32: max relative error" in r.output and "parity fp16" in r.output
    assert "engine: skipped (--onnx-only)" in r.output
    assert read_onnx_meta(out / "tiny.fp16.onnx") == load_checkpoint(tiny_ckpt)[1]


def test_cli_default_out_and_engine_step(tiny_ckpt: Path) -> None:
    """Next to the checkpoint; with TensorRT(-RTX) installed an engine + sidecar, else a clear 'skipped'."""
    r = CliRunner().invoke(main, ["--ckpt", str(tiny_ckpt), "--max-batch", "16", "--opt-batch", "8", "--no-parity"])
    assert r.exit_code == 0, r.output
    files = sorted(os.listdir(tiny_ckpt.parent))
    assert "tiny.onnx" in files and "tiny.fp16.onnx" in files
    plans = [f for f in files if f.endswith(".plan")]
    if "engine step skipped" in r.output:
        assert not plans and "pip install tensorrt-rtx" in r.output
    else:
        assert len(plans) == 1 and plans[0] + ".json" in files
        side = json.loads((tiny_ckpt.parent / (plans[0] + ".json")).read_text())
        assert side["onnx"]["precision"] == "fp16" and side["profile"]["max_batch"] == 16
        assert side["checkpoint_sha256"] == file_sha256(tiny_ckpt)
    assert not [f for f in files if f.startswith(".")]


def test_cli_engine_skipped_without_tensorrt(tiny_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RAWDIFF_TENSORRT", "none")  # the real "not available" path of the adapter
    r = CliRunner().invoke(main, ["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "o"), "--no-parity"])
    assert r.exit_code == 0, r.output
    assert "engine step skipped" in r.output and "pip install tensorrt-rtx" in r.output
    assert sorted(os.listdir(tmp_path / "o")) == ["tiny.fp16.onnx", "tiny.onnx"]


@pytest.mark.parametrize("content", [b"", b"\x80\x04pickle", b"PK\x03\x04zip", b"not a checkpoint at all"])
def test_cli_bad_checkpoint(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["--ckpt", str(bad), "--out", str(out), "-q"])
    assert r.exit_code == 2  # a bad checkpoint is found before any compute
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rawdiff-export: error: ") and str(bad) in lines[0], r.output
    assert "Traceback" not in r.output
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]


def test_cli_missing_checkpoint_and_usage(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["--ckpt", str(tmp_path / "none.safetensors"), "-q"])
    assert r.exit_code == 2 and "no such checkpoint" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["--ckpt", "x", "--min-batch", "8", "--max-batch", "4", "-q"])
    assert r.exit_code == 2 and "min <= opt <= max" in r.output
    r = CliRunner().invoke(main, ["--ckpt", "x", "--opset", "16"])
    assert r.exit_code == 2
    assert os.listdir(tmp_path) == []
