"""rawdiff-infer against a hostile but realistic user (issue 11): no data lost, nothing hangs, every bad model or
option refused before compute with one line, every stderr line ours.

Each test builds its own files in a temporary folder and could fail if the guarantee regressed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_CONFIG
from PIL import Image

from rawdiff_infer.checkpoint import save_checkpoint
from rawdiff_infer.cli import cli
from rawdiff_infer.model import UNet

FAST = ["--steps", "2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(UNet(TINY_CONFIG), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def _photo(path: Path, h: int = 48, w: int = 56, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _exe() -> list[str]:
    script = Path(sys.executable).with_name("rawdiff-infer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rawdiff_infer.cli"]


def one_line(stderr: str, *needles: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("rawdiff-infer: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def no_debris(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


# ---- 1. no-clobber at the moment of writing -------------------------------------------------------------------

def test_a_file_that_appears_during_compute_is_not_replaced(ckpt: Path, tmp_path: Path) -> None:
    src = _photo(tmp_path / "a.png", 128, 160)
    target = tmp_path / "x.npy"
    proc = subprocess.Popen([*_exe(), str(src), "--ckpt", str(ckpt), "--steps", "60", "-o", str(target),
                             "--progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: list[bytes] = []
    started = threading.Event()

    def read() -> None:
        while data := os.read(proc.stderr.fileno(), 4096):
            seen.append(data)
            if b"/60" in b"".join(seen):
                started.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    assert started.wait(120), b"".join(seen)
    target.write_bytes(b"another program's result")  # appears while rawdiff computes
    rc = proc.wait(timeout=300)
    t.join(5)
    err = b"".join(seen).decode(errors="replace")
    assert rc == 1, err
    assert target.read_bytes() == b"another program's result"
    msgs = [m for m in err.replace("\r", "\n").splitlines() if m.startswith("rawdiff-infer:")]
    assert len(msgs) == 1 and "x.npy" in msgs[0] and "appeared while rawdiff was working" in msgs[0], err
    no_debris(tmp_path)


def test_two_runs_racing_for_one_output(ckpt: Path, tmp_path: Path) -> None:
    src = _photo(tmp_path / "a.png", 96, 96)
    target = tmp_path / "x.npy"
    procs = [subprocess.Popen([*_exe(), str(src), "--ckpt", str(ckpt), "--steps", "3", "--seed", str(seed), "-o",
                               str(target), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    # whether both computed and one lost at the final rename, or the second found the file before computing:
    # exactly one wins, the other says why, and the file is a complete result
    assert sorted(rc for rc, _ in results) == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    one_line(loser, "x.npy", "exists")
    assert np.load(target).shape == (96, 96, 3)
    no_debris(tmp_path)


# ---- 4. patch size bound, interrupt latency ---------------------------------------------------------------------

@pytest.mark.parametrize("size,code,words", [("4096", 2, "--patch-size"), ("256", 2, "runs on 32..128"),
                                             ("24", 2, "runs on 32..128")])
def test_patch_size_is_bounded_by_the_model(size: str, code: int, words: str, ckpt: Path, tmp_path: Path) -> None:
    r = invoke(_photo(tmp_path / "a.png"), "--ckpt", ckpt, *FAST, "--patch-size", size, "-o", tmp_path / "o")
    assert r.exit_code == code, r.output
    assert words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_sigterm_takes_effect_within_seconds_even_inside_a_long_model_call(ckpt: Path, tmp_path: Path) -> None:
    """One model call on a 128-pixel patch batch of 512 takes far longer than the grace period on this CPU."""
    src = _photo(tmp_path / "big.png", 512, 512)
    out = tmp_path / "out"
    proc = subprocess.Popen([*_exe(), str(src), "--ckpt", str(ckpt), "--steps", "5", "--patch-size", "128",
                             "--batch-size", "4096", "-o", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # model loaded, inside the first (long) model call
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    latency = time.perf_counter() - sent
    err = proc.stderr.read()
    assert rc == 143, err
    assert latency < 8.0, latency
    one_line(err, "terminated", "no partial output")
    assert not out.exists() or not any(out.iterdir())


# ---- 8. options checked before any compute ----------------------------------------------------------------------

@pytest.mark.parametrize("opts,words", [
    (["--eta", "nan", "--sampler", "ddim"], "eta"),
    (["--eta", "0.5", "--sampler", "dpm-single"], "takes no eta"),
    (["--seed", "18446744073709551616"], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--device", "meta"], "--device"),
    (["--device", "cuda:7"], "--device"),
    (["--batch-size", "100000"], "--batch-size"),
    (["--order", "3", "--sampler", "ddim"], "order"),
    (["--ckpt", "x", "--model", "y"], "not both"),
], ids=lambda o: " ".join(o) if isinstance(o, list) else "")
def test_bad_options_exit_2_once_before_the_model_loads(opts: list[str], words: str, ckpt: Path,
                                                         tmp_path: Path) -> None:
    a, b = _photo(tmp_path / "a.png"), _photo(tmp_path / "b.png", seed=1)
    args = [a, b, "-o", tmp_path / "o", *FAST] + ([] if "--ckpt" in opts else ["--ckpt", ckpt]) + opts
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    one_line(r.stderr, words)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def _onnx(path: Path, body: str) -> Path:
    """A small ONNX graph with rawdiff's interface and description: ``body`` is 'shape' (eps of the wrong shape)
    or 'inf' (eps = x_t / 0)."""
    import onnx
    from onnx import TensorProto, helper

    from rawdiff_infer.checkpoint import ModelMeta

    x = helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["N", 3, 64, 64])
    c = helper.make_tensor_value_info("cond", TensorProto.FLOAT, ["N", 3, 64, 64])
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N"])
    if body == "shape":
        out = helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["N", 1, 64, 64])
        nodes = [helper.make_node("ReduceMean", ["x_t"], ["eps"], axes=[1], keepdims=1)]
    else:
        out = helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["N", 3, 64, 64])
        zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
        nodes = [helper.make_node("Constant", [], ["z"], value=zero),
                 helper.make_node("Div", ["cond", "z"], ["eps"])]
    graph = helper.make_graph(nodes, "bad", [x, c, t], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in {"rawdiff": ModelMeta(model=TINY_CONFIG).to_json(), "rawdiff.precision": "fp32",
                 "rawdiff.patch_size": "64"}.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("body,words", [("shape", "(1, 1, 64, 64)"), ("inf", "NaN or infinite")])
def test_onnx_model_with_wrong_output_is_refused_before_compute(body: str, words: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = _onnx(tmp_path / f"{body}.onnx", body)
    r = invoke(_photo(tmp_path / "a.png"), "--backend", "onnx", "--model", model, *FAST, "-o", tmp_path / "o")
    assert r.exit_code == 2, r.output
    one_line(r.stderr, words)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_patch_size_other_than_the_onnx_graph_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = _onnx(tmp_path / "inf.onnx", "inf")
    r = invoke(_photo(tmp_path / "a.png"), "--backend", "onnx", "--model", model, "--patch-size", "32", *FAST,
               "-o", tmp_path / "o")
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.stderr


# ---- 9. odd paths: a failure of that input only, or a command-line error ------------------------------------------

def test_output_name_too_long_and_symlink_loop_are_usage_errors(ckpt: Path, tmp_path: Path) -> None:
    src = _photo(tmp_path / "a.png")
    r = invoke(src, "--ckpt", ckpt, *FAST, "-o", tmp_path / ("x" * 300 + ".npy"))
    assert r.exit_code == 2, r.output
    one_line(r.stderr, "too long")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    r = invoke(src, "--ckpt", ckpt, *FAST, "-o", tmp_path / "loop" / "x.npy")
    assert r.exit_code == 2, r.output
    one_line(r.stderr, "symbolic links")


def test_a_symlink_loop_input_fails_alone(ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    good = _photo(tmp_path / "good.png")
    out = tmp_path / "o"
    r = invoke(tmp_path / "loop.png", good, "--ckpt", ckpt, *FAST, "-o", out, "-q")
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert any("loop.png" in ln and "symbolic links" in ln for ln in lines), r.stderr
    assert lines[-1] == "rawdiff-infer: 1 failed, 1 done"
    assert {p.name for p in out.iterdir()} == {"good.dng"}


def test_odd_file_names_stay_one_line(ckpt: Path, tmp_path: Path) -> None:
    odd = tmp_path / "new\nline.png"
    odd.write_bytes(b"")
    r = invoke(odd, "--ckpt", ckpt, *FAST, "-o", tmp_path / "o")
    assert r.exit_code == 1
    one_line(r.stderr, "'", "new\\nline.png", "empty")


# ---- 10. a closed stdout never fails a good result ----------------------------------------------------------------

def test_closed_stdout_does_not_fail_the_run(ckpt: Path, tmp_path: Path) -> None:
    src = _photo(tmp_path / "a.png")
    proc = subprocess.Popen([*_exe(), str(src), "--ckpt", str(ckpt), *FAST, "-o", str(tmp_path / "o")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `rawdiff-infer ... | true`
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=120)
    assert rc == 0, err
    assert err == "", err
    assert (tmp_path / "o" / "a.dng").stat().st_size > 0


# ---- 11. --resume and a directory where an output should be ---------------------------------------------------------

def test_resume_does_not_take_a_directory_for_a_finished_output(ckpt: Path, tmp_path: Path) -> None:
    src = _photo(tmp_path / "a.png")
    out = tmp_path / "o"
    (out / "a.dng").mkdir(parents=True)
    for extra in (["--resume"], [], ["--force"]):
        r = invoke(src, "--ckpt", ckpt, *FAST, "-o", out, *extra)
        assert r.exit_code == 1, (extra, r.output)
        one_line(r.stderr, "a.dng", "is a directory")
    assert (out / "a.dng").is_dir()


# ---- 13. stderr lines are ours ---------------------------------------------------------------------------------------

def test_library_warnings_become_our_lines(ckpt: Path, tmp_path: Path) -> None:
    import warnings

    src = _photo(tmp_path / "a.png")

    def noisy(*a, **k):
        warnings.warn("something deep inside numpy", RuntimeWarning)
        return original(*a, **k)

    from rawdiff_infer import pipeline

    original = pipeline.model_to_unit
    pipeline.model_to_unit = noisy
    try:
        r = invoke(src, "--ckpt", ckpt, *FAST, "-o", tmp_path / "o", "-q")
    finally:
        pipeline.model_to_unit = original
    assert r.exit_code == 0
    one_line(r.stderr, "warning", "something deep inside numpy")


# ---- checkpoints through the CLI: refused before compute (exit 2, one line naming the file) -----------------------

@pytest.mark.parametrize("field,value", [("encoding.gamma", 0), ("camera.illuminant", 70000),
                                          ("model.base_channels", 1024), ("schedule.num_timesteps", 2e8)])
def test_bad_descriptions_are_refused_before_compute(field: str, value: object, ckpt: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    save_checkpoint(UNet(TINY_CONFIG), d, shard_bytes=1 << 20)
    index = json.loads((d / "rawdiff.json").read_text())
    node = index
    keys = field.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    (d / "rawdiff.json").write_text(json.dumps(index))
    a, b = _photo(tmp_path / "a.png"), _photo(tmp_path / "b.png", seed=2)
    r = invoke(a, b, "--ckpt", d, *FAST, "-o", tmp_path / "o")
    assert r.exit_code == 2, r.output
    # a U-Net of base 1024 is refused for its size: its parameters, or (checked first) one patch's compute
    one_line(r.stderr, "rawdiff.json", "model." if keys[-1] == "base_channels" else keys[-1])
    assert not any((tmp_path / "o").iterdir())


def test_fifo_as_checkpoint_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    src = _photo(tmp_path / "a.png")
    p = subprocess.run([*_exe(), str(src), "--ckpt", str(fifo), "-o", str(tmp_path / "o")], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    one_line(p.stderr, "FIFO")
