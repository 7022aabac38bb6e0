"""rawdiff-bench on the CPU: a small run produces a well-formed table, JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rawdiff_bench.bench import format_table, time_callable
from rawdiff_bench.cli import cli


def test_cpu_run_produces_a_well_formed_report(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    res = CliRunner().invoke(cli, ["--device", "cpu", "--config", "tiny", "--backend", "torch", "--backend", "onnx",
                                   "--variant", "eager", "--variant", "cl", "--batch", "2", "--batch", "3",
                                   "--repeats", "2", "--warmup", "1", "--image-size", "80", "--steps", "2",
                                   "--step-graph", "both", "--json", str(out_json), "--plot", str(out_png)])
    assert res.exit_code == 0, res.output
    assert "| variant | dtype | batch |" in res.output
    report = json.loads(out_json.read_text())
    assert report["environment"]["device"] == "cpu" and "torch" in report["environment"]
    rows = report["unet"]
    # torch eager + cl at 2 batch sizes, onnx at 2 batch sizes
    assert {(r["variant"], r["batch"]) for r in rows} == {("torch/eager", 2), ("torch/eager", 3), ("torch/cl", 2),
                                                         ("torch/cl", 3), ("onnx", 2), ("onnx", 3)}
    for r in rows:
        assert r["ms_min"] <= r["ms_median"] <= r["ms_max"] and r["ms_median"] > 0
        assert r["tflops"] > 0 and r["patches_per_s"] == pytest.approx(r["batch"] / (r["ms_median"] / 1e3))
        assert r["gflop_per_patch"] > 0.1
    images = report["images"]
    assert len(images) == 3 and all(i["width"] == 80 and i["patches"] == 4 and i["steps"] == 2 for i in images)
    assert all(i["denoise_s"] > 0 and i["write_s"] > 0 for i in images)
    # the CPU cannot record a step graph: the "on" half of --step-graph both is skipped and says so
    assert all(i["step_graph"] is False for i in images) and "skip step graph" in res.output
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timer_and_table() -> None:
    import torch

    calls = []
    times = time_callable(lambda i: calls.append(i), device=torch.device("cpu"), warmup=2, repeats=3)
    assert calls == [0, 1, 2, 3, 4] and len(times) == 3
    table = format_table([{"a": 1.234, "b": None}], [("a", "A", ".1f"), ("b", "B", ".1f")])
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 1.2 | - |"]


def test_help_documents_the_tool() -> None:
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0 and "Examples" in res.output and "--backend" in res.output


def test_profile_names_where_the_time_goes() -> None:
    import torch

    from rawdiff_bench.bench import kernel_category, profile_unet
    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_infer.checkpoint import ModelMeta
    from rawdiff_infer.model import UNet, UNetConfig

    cfg = UNetConfig.tiny()
    torch.manual_seed(0)
    prof = profile_unet(TorchBackend(UNet(cfg), ModelMeta(model=cfg)), batch=2, calls=2)
    assert prof["ms_per_call"] > 0 and 0 < len(prof["kernels"]) <= 25
    assert sum(prof["categories"].values()) == pytest.approx(1.0)
    assert prof["kernels"] == sorted(prof["kernels"], key=lambda r: -r["ms"])
    assert "convolution" in prof["categories"] and "attention" in prof["categories"]
    assert kernel_category("sm90_xmma_fprop_implicit_gemm_f16f16") == "convolution"
    assert kernel_category("pytorch_flash::flash_fwd_kernel") == "attention"
    assert kernel_category("triton_per_fused_native_group_norm_silu_3") == "norm / elementwise (fused)"
