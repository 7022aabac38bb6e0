"""rawdiff-export never replaces good files with bad ones: parity gates publication, --force gates replacement, paths
are checked before compute, FIFOs are refused, a signal leaves nothing behind, every error is one line."""

from __future__ import annotations

import ast
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rawdiff_export import ExportError, check_parity, export_model
from rawdiff_export.cli import EXIT_FAILED, EXIT_USAGE, ExportOptions, main
from rawdiff_export.onnx_export import PARITY_TOLERANCE
from rawdiff_infer.checkpoint import ModelMeta, save_checkpoint
from rawdiff_infer.fsio import OutputExistsError

from conftest import TINY_CONFIG, perturbed_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _nan_model():
    m = perturbed_tiny_model(1)
    with torch.no_grad():
        next(p for n, p in m.named_parameters() if n.endswith("weight") and p.dim() == 4).view(-1)[0] = math.nan
    return m


def _err_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("rawdiff-export:")]


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(perturbed_tiny_model(0), tmp_path / "ckpt" / "tiny.safetensors")


@pytest.fixture(scope="module")
def good_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a good tiny.onnx / tiny.fp16.onnx (exported once, copied by the tests that need it)."""
    d = tmp_path_factory.mktemp("good")
    export_model(perturbed_tiny_model(0), ModelMeta(model=TINY_CONFIG), d, "tiny")
    return d


def _copy_good(good: Path, out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in ("tiny.onnx", "tiny.fp16.onnx"):
        files[name] = (good / name).read_bytes()
        (out / name).write_bytes(files[name])
    return files


# ---- parity gates publication ---------------------------------------------------------------------------------------

def test_parity_tolerances_are_documented_and_enforced() -> None:
    assert PARITY_TOLERANCE == {"fp32": 1e-4, "fp16": 1e-2}
    check_parity(5e-5, "fp32")
    check_parity(5e-3, "fp16")
    with pytest.raises(ExportError, match="exceeds the tolerance 1e-04"):
        check_parity(2e-4, "fp32")
    for bad in (math.nan, math.inf):
        with pytest.raises(ExportError, match="not finite"):
            check_parity(bad, "fp16")


def test_nan_weight_publishes_nothing(tmp_path: Path, good_export: Path) -> None:
    """Bug: one NaN weight gave 'max relative error nan', exit 0, and replaced a good model.onnx."""
    out = tmp_path / "out"
    before = _copy_good(good_export, out)
    with pytest.raises(ExportError, match="not finite"):
        export_model(_nan_model(), ModelMeta(model=TINY_CONFIG), out, "tiny", overwrite=True)
    assert {n: (out / n).read_bytes() for n in before} == before
    assert sorted(os.listdir(out)) == sorted(before)  # no temporaries either


def test_cli_nan_checkpoint_keeps_the_good_model(tmp_path: Path, good_export: Path) -> None:
    bad = save_checkpoint(_nan_model(), tmp_path / "ckpt" / "tiny.safetensors")
    out = tmp_path / "out"
    before = _copy_good(good_export, out)
    r = CliRunner().invoke(main, ["--ckpt", str(bad), "--out", str(out), "--onnx-only", "--force", "-q"])
    # parity refuses it (1); a checkpoint loader that refuses NaN weights itself would say 2: both keep the files
    assert r.exit_code in (EXIT_FAILED, EXIT_USAGE), r.output
    lines = _err_lines(r.output)
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    if r.exit_code == EXIT_FAILED:
        assert "not finite" in lines[0] and "nothing was written" in lines[0]
    assert {n: (out / n).read_bytes() for n in before} == before
    assert sorted(os.listdir(out)) == sorted(before)


# ---- --force, and paths checked before compute -------------------------------------------------------------------

def test_existing_exports_need_force(tmp_path: Path, ckpt: Path, good_export: Path) -> None:
    out = tmp_path / "out"
    before = _copy_good(good_export, out)
    r = CliRunner().invoke(main, ["--ckpt", str(ckpt), "--out", str(out), "--onnx-only"])
    assert r.exit_code == EXIT_USAGE, r.output
    assert "loading" not in r.output  # refused before the checkpoint was even read
    lines = _err_lines(r.output)
    assert len(lines) == 1 and "tiny.onnx: exists; not replaced without --force" in lines[0], r.output
    assert {n: (out / n).read_bytes() for n in before} == before
    r = CliRunner().invoke(main, ["--ckpt", str(ckpt), "--out", str(out), "--onnx-only", "--force", "-q"])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["tiny.fp16.onnx", "tiny.onnx"]


def test_existing_engine_needs_force_too(tmp_path: Path, ckpt: Path) -> None:
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed")
    out = tmp_path / "out"
    args = ["--ckpt", str(ckpt), "--out", str(out), "--max-batch", "16", "--opt-batch", "8", "--no-parity", "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    plan = next(p for p in out.iterdir() if p.suffix == ".plan")
    for victim in (out / "tiny.onnx", out / "tiny.fp16.onnx"):
        victim.unlink()  # only the engine and its sidecar remain
    r = CliRunner().invoke(main, args)
    assert r.exit_code == EXIT_USAGE and f"{plan.name}: exists" in r.output, r.output
    assert not (out / "tiny.onnx").exists()


def test_fifo_outputs_are_refused_even_with_force(tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "tiny.fp16.onnx")
    r = CliRunner().invoke(main, ["--ckpt", str(ckpt), "--out", str(out), "--onnx-only", "--force"])
    assert r.exit_code == EXIT_USAGE, r.output
    assert "tiny.fp16.onnx: exists and is a FIFO" in _err_lines(r.output)[0]
    assert (out / "tiny.fp16.onnx").is_fifo() and sorted(os.listdir(out)) == ["tiny.fp16.onnx"]


def test_fifo_timing_cache_is_refused(tmp_path: Path, ckpt: Path) -> None:
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed")
    os.mkfifo(tmp_path / "timing.cache")
    r = CliRunner().invoke(main, ["--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--timing-cache",
                                  str(tmp_path / "timing.cache")])
    assert r.exit_code == EXIT_USAGE and "timing.cache: exists and is a FIFO" in r.output, r.output


@pytest.mark.parametrize("args, match", [
    (["--out", "{file}"], "not a folder"),
    (["--patch-size", "60"], "multiple of 8"),
    (["--compute-capability", "ampere"], "not a compute capability"),
])
def test_bad_options_exit_2_before_compute(tmp_path: Path, ckpt: Path, args: list[str], match: str) -> None:
    (tmp_path / "file").write_text("x")
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    r = CliRunner().invoke(main, ["--ckpt", str(ckpt), "--onnx-only", "-q", *args])
    assert r.exit_code == EXIT_USAGE, r.output
    lines = _err_lines(r.output)
    assert len(lines) == 1 and match in lines[0], r.output
    assert sorted(os.listdir(ckpt.parent)) == ["tiny.safetensors"]


def test_options_are_one_frozen_dataclass() -> None:
    import dataclasses

    assert dataclasses.is_dataclass(ExportOptions) and ExportOptions.__dataclass_params__.frozen
    params = main.make_context("rawdiff-export", ["--ckpt", "d/m.safetensors", "--fp32", "--force"]).params
    opts = ExportOptions.from_params(params)
    assert opts.engine_precision == "fp32" and opts.parity and opts.force and opts.stem == "m"
    assert opts.out_dir == Path("d") and opts.build.max_batch == 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.force = True  # type: ignore[misc]


def test_no_function_longer_than_a_screen() -> None:
    files = [*(ROOT / "export").glob("*.py"), *(ROOT / "rawdiff_infer" / "backends").glob("*.py")]
    long = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                long.append(f"{f.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def test_library_refuses_existing_targets_before_compute(tmp_path: Path, good_export: Path) -> None:
    _copy_good(good_export, tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(OutputExistsError):
        export_model(perturbed_tiny_model(0), ModelMeta(model=TINY_CONFIG), tmp_path, "tiny")
    assert time.perf_counter() - t0 < 1.0  # nothing was exported


# ---- signals ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig, code, verb", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_during_the_export_leaves_nothing(tmp_path: Path, ckpt: Path, sig: int, code: int, verb: str) -> None:
    """Bug: SIGTERM during the ONNX save left a 4 MB .NAME.onnx.XXXX.tmp behind."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "rawdiff_export.cli", "--ckpt", str(ckpt), "--out", str(out),
                             "--onnx-only", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and any(n.endswith(".tmp") for n in os.listdir(out)):
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the export ended before a temporary file was seen: {proc.communicate()}"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines() == [f"rawdiff-export: {verb}; no partial files were left"], stderr
    assert stdout == "" and os.listdir(out) == []
