"""Issue 23's second round of hostile inputs, through the real command lines (rawdiff-infer, -train, -export, -bench,
-eval), one test (or more) per class: data loss, hangs and interrupts, wrong exit codes, unclear messages, closed
standard streams.

Every failure is one line on stderr naming the file or the option, with exit status 1 or 2 (128 + N for a signal);
nothing the run reads is ever replaced, not even with --force; no temporary file is left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_CONFIG, generated_photos
from faults import full_disk
from PIL import Image

from rawdiff_infer.checkpoint import save_checkpoint
from rawdiff_infer.model import UNet

TRAIN_FAST = ["--config", "tiny", "--batch-size", "2", "--variants", "1", "--val-count", "0", "--device", "cpu",
              "-q"]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(UNet(TINY_CONFIG), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated_photos(tmp_path_factory.mktemp("photos"), 4)


def _photo(path: Path, h: int = 24, w: int = 28) -> Path:
    Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _invoke(command, args: list[object]):
    return CliRunner().invoke(command, [str(a) for a in args])


def one_line(result_or_stderr, prog: str, *needles: str) -> str:
    """The single stderr line of a failed command, checked for our prefix, no traceback and the needles."""
    stderr = result_or_stderr if isinstance(result_or_stderr, str) else result_or_stderr.stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def no_debris(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.suffix == ".tmp"], list(folder.rglob("*"))


def _commands():
    from rawdiff_bench.cli import cli as bench
    from rawdiff_bench.evaluate import cli as evaluate
    from rawdiff_export.cli import main as export
    from rawdiff_infer.cli import cli as infer
    from rawdiff_train.cli import cli as train

    return {"rawdiff-infer": infer, "rawdiff-train": train, "rawdiff-export": export, "rawdiff-bench": bench,
            "rawdiff-eval": evaluate}


# ---- data loss: --force never replaces a file the run reads; train never replaces a run or a user's file -------------

def test_bench_json_over_its_own_checkpoint_is_refused_even_with_force(ckpt: Path, tmp_path: Path) -> None:
    model = tmp_path / "v.safetensors"
    shutil.copy(ckpt, model)
    before = model.read_bytes()
    r = _invoke(_commands()["rawdiff-bench"], ["--ckpt", model, "--json", model, "--force", "--device", "cpu",
                                               "--batch", "1", "--repeats", "1", "--warmup", "0"])
    assert r.exit_code == 2, r.output
    one_line(r, "rawdiff-bench", "v.safetensors", "reads")
    assert model.read_bytes() == before


def test_export_over_its_own_checkpoint_is_refused_even_with_force(ckpt: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"  # a checkpoint named like the graph the export writes
    shutil.copy(ckpt, model)
    before = model.read_bytes()
    r = _invoke(_commands()["rawdiff-export"], ["--ckpt", model, "--onnx-only", "--no-parity", "--force", "-q"])
    assert r.exit_code == 2, r.output
    one_line(r, "rawdiff-export", "m.onnx", "reads")
    assert model.read_bytes() == before
    no_debris(tmp_path)


def test_eval_plot_over_an_input_photo_is_refused_even_with_force(ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = _photo(folder / "a.png", 40, 40)
    before = photo.read_bytes()
    os.link(photo, tmp_path / "plot.png")
    for target in (photo, tmp_path / "plot.png"):
        r = _invoke(_commands()["rawdiff-eval"], ["--photos", folder, "--ckpt", ckpt, "--sampler", "ddim:1",
                                                  "--plot", target, "--force", "--device", "cpu"])
        assert r.exit_code == 2, r.output
        one_line(r, "rawdiff-eval", "reads")
    assert photo.read_bytes() == before


def test_infer_force_never_replaces_its_input_under_another_name(ckpt: Path, tmp_path: Path) -> None:
    src = _photo(tmp_path / "a.tiff")
    os.link(src, tmp_path / "b.tiff")
    r = _invoke(_commands()["rawdiff-infer"], [src, "--ckpt", ckpt, "--steps", "1", "-o", tmp_path / "b.tiff",
                                               "--force"])
    assert r.exit_code in (1, 2), r.output
    one_line(r, "rawdiff-infer", "b.tiff", "reads")
    assert os.path.samefile(src, tmp_path / "b.tiff")
    no_debris(tmp_path)


def test_train_twice_into_one_out_is_refused_before_compute(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train = _commands()["rawdiff-train"]
    r = _invoke(train, ["--photos", photos, "--out", out, *TRAIN_FAST, "--steps", "2", "--ckpt-every", "1"])
    assert r.exit_code == 0, r.output
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = _invoke(train, ["--photos", photos, "--out", out, *TRAIN_FAST, "--steps", "2"])
    assert r.exit_code == 2, r.output
    one_line(r, "rawdiff-train", "--resume")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_train_never_replaces_a_users_file_named_latest(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "latest").write_text("my notes\n")
    r = _invoke(_commands()["rawdiff-train"], ["--photos", photos, "--out", out, *TRAIN_FAST, "--steps", "1"])
    assert r.exit_code == 2, r.output
    one_line(r, "rawdiff-train", "latest")
    assert (out / "latest").read_text() == "my notes\n" and not list(out.glob("ckpt-*"))
    r = _invoke(_commands()["rawdiff-train"], ["--photos", photos, "--out", out, *TRAIN_FAST, "--steps", "1",
                                               "--resume"])
    assert r.exit_code == 2, r.output
    one_line(r, "rawdiff-train", "latest")
    assert (out / "latest").read_text() == "my notes\n"


# ---- tracebacks: rawdiff-eval answers every bad input with one line and a non-zero status ---------------------------

EVAL_FAST = ["--sampler", "ddim:1", "--crop", "16", "--device", "cpu"]


def _eval_photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder / "a.png", 32, 32)
    return folder


@pytest.mark.parametrize("case", ["missing ckpt", "invalid ckpt", "corrupt photo", "cuda", "stride 1000",
                                  "fifo ckpt", "directory json"])
def test_eval_bad_inputs_are_one_line(case: str, ckpt: Path, tmp_path: Path) -> None:
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    folder = _eval_photos(tmp_path)
    args: list[object] = ["--photos", folder, "--ckpt", ckpt, *EVAL_FAST]
    if case == "missing ckpt":
        args[3] = tmp_path / "nothing.safetensors"
    elif case == "invalid ckpt":
        (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}  garbage")
        args[3] = tmp_path / "bad.safetensors"
    elif case == "corrupt photo":
        (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    elif case == "cuda":
        args += ["--device", "cuda"]
    elif case == "stride 1000":
        args += ["--stride", "1000"]
    elif case == "fifo ckpt":
        os.mkfifo(tmp_path / "pipe.safetensors")
        args[3] = tmp_path / "pipe.safetensors"
    elif case == "directory json":
        args += ["--json", tmp_path]
    r = _invoke(_commands()["rawdiff-eval"], args)
    assert r.exit_code in (1, 2), (r.exit_code, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    one_line(r.stderr.splitlines()[-1] if r.stderr else "", "rawdiff-eval")
    assert all(ln.startswith("rawdiff-eval: ") for ln in r.stderr.splitlines() if ln.strip()), r.stderr


@pytest.mark.parametrize("report", ["--json", "--plot"])
def test_eval_on_a_full_disk_is_one_line_and_leaves_no_temporary(report: str, ckpt: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _eval_photos(tmp_path)
    full_disk(monkeypatch)
    out = tmp_path / "reports"
    out.mkdir()
    r = _invoke(_commands()["rawdiff-eval"], ["--photos", folder, "--ckpt", ckpt, *EVAL_FAST, report,
                                              out / "r.out"])
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "No space left on device" in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr, r.stderr
    assert os.listdir(out) == []


def test_bench_on_a_full_disk_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full_disk(monkeypatch)
    r = _invoke(_commands()["rawdiff-bench"], ["--config", "tiny", "--device", "cpu", "--batch", "1", "--repeats",
                                               "1", "--warmup", "0", "--json", tmp_path / "b.json"])
    assert r.exit_code == 1, r.output
    assert "No space left on device" in r.stderr.splitlines()[-1], r.stderr
    assert os.listdir(tmp_path) == []


# ---- hangs: a FIFO wherever a command reads is refused at once; signals always work ---------------------------------

def _trained(photos: Path, out: Path) -> Path:
    r = _invoke(_commands()["rawdiff-train"], ["--photos", photos, "--out", out, *TRAIN_FAST, "--steps", "1"])
    assert r.exit_code == 0, r.output
    return out / (out / "latest").read_text().strip()


@pytest.mark.parametrize("name", ["train_state.safetensors", "train_state.json", "model.safetensors", "latest",
                                  "log.csv"])
def test_train_resume_refuses_a_fifo_at_once(name: str, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ckpt_dir = _trained(photos, out)
    victim = (out if name in ("latest", "log.csv") else ckpt_dir) / name
    victim.unlink()
    os.mkfifo(victim)
    t0 = time.monotonic()
    proc = subprocess.run([str(BIN / "rawdiff-train"), "--photos", str(photos), "--out", str(out), *TRAIN_FAST,
                           "--steps", "2", "--resume"], capture_output=True, text=True, timeout=120)
    assert proc.returncode in (1, 2), proc.stderr
    one_line(proc.stderr, "rawdiff-train", name, "FIFO")
    assert time.monotonic() - t0 < 60


def test_train_list_fifo_is_refused_at_once(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.dng").write_bytes(b"")
    os.mkfifo(tmp_path / "train.txt")
    r = _invoke(_commands()["rawdiff-train"], ["--fivek", raw, "--train-list", tmp_path / "train.txt", "--out",
                                               tmp_path / "run", *TRAIN_FAST, "--steps", "1"])
    assert r.exit_code == 2, r.output
    one_line(r, "rawdiff-train", "train.txt", "FIFO")


def test_eval_sigterm_and_ctrl_c_end_it_within_seconds_and_leave_nothing(ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder / "a.png", 256, 256)
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        proc = subprocess.Popen([str(BIN / "rawdiff-eval"), "--photos", str(folder), "--ckpt", str(ckpt),
                                 "--sampler", "ddpm:1000", "--device", "cpu", "--consistency", "off", "--json",
                                 str(tmp_path / "r.json")], stderr=subprocess.PIPE, text=True)
        first = proc.stderr.readline()  # "1 images, ...": the evaluation has begun
        assert first.startswith("rawdiff-eval: "), first
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        rest = proc.stderr.read()
        assert rc == code, rest
        assert time.monotonic() - sent < 6.0
        one_line(rest, "rawdiff-eval", "no report")
        assert sorted(os.listdir(tmp_path)) == ["photos"]


@pytest.mark.parametrize("prog, args", [("rawdiff-infer", ["x.png"]), ("rawdiff-export", ["--ckpt", "x"]),
                                        ("rawdiff-bench", ["--config", "tiny"])])
def test_ctrl_c_while_importing_is_one_line_and_130(prog: str, args: list[str], tmp_path: Path) -> None:
    proc = subprocess.Popen([str(BIN / prog), *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(0.4)  # inside `import torch`: seconds on any machine
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    one_line(err, prog, "interrupted")


# ---- wrong exit code, stale torchrun variables -----------------------------------------------------------------------

@pytest.mark.parametrize("env, words", [({"WORLD_SIZE": "abc"}, "WORLD_SIZE"), ({"WORLD_SIZE": "2"}, "RANK"),
                                        ({"WORLD_SIZE": "2", "RANK": "5"}, "outside")])
def test_bad_torchrun_variables_are_usage_errors(env: dict[str, str], words: str, photos: Path, ckpt: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RANK", raising=False) if "RANK" not in env else None
    r = _invoke(_commands()["rawdiff-train"], ["--photos", photos, "--out", tmp_path / "run", *TRAIN_FAST,
                                               "--steps", "1"])
    assert r.exit_code == 2, r.output
    one_line(r, "rawdiff-train", words)
    assert not (tmp_path / "run").exists()
    src = _photo(tmp_path / "a.png")
    r = _invoke(_commands()["rawdiff-infer"], [src, "--ckpt", ckpt, "--steps", "1", "-o", tmp_path / "o"])
    assert r.exit_code == 2, r.output
    one_line(r, "rawdiff-infer", words)
    assert not list(tmp_path.glob("o/*"))


# ---- unclear messages ----------------------------------------------------------------------------------------------

def test_infer_dangling_symlink_output_is_named_as_such(ckpt: Path, tmp_path: Path) -> None:
    src = _photo(tmp_path / "a.png")
    os.symlink(tmp_path / "nowhere.npy", tmp_path / "out.npy")
    r = _invoke(_commands()["rawdiff-infer"], [src, "--ckpt", ckpt, "--steps", "1", "-o", tmp_path / "out.npy"])
    assert r.exit_code in (1, 2), r.output
    line = one_line(r, "rawdiff-infer", "out.npy", "dangling symbolic link")
    assert "appeared" not in line


def test_bench_same_file_for_json_and_plot_fails_before_measuring(tmp_path: Path) -> None:
    r = _invoke(_commands()["rawdiff-bench"], ["--config", "tiny", "--device", "cpu", "--batch", "1", "--repeats",
                                               "1", "--json", tmp_path / "x", "--plot", tmp_path / "x"])
    assert r.exit_code == 2, r.output
    one_line(r, "rawdiff-bench", "--json", "--plot")
    assert "measuring" not in r.output and os.listdir(tmp_path) == []


def test_train_stderr_lines_are_ours_pillow_warnings_included(photos: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    import PIL.Image

    real_open = PIL.Image.open

    def warning_open(*a, **k):  # noqa: ANN002, ANN003, ANN202
        warnings.warn("Corrupt EXIF data.  Expecting to read 12 bytes but only got 2.", UserWarning, stacklevel=2)
        return real_open(*a, **k)

    monkeypatch.setattr(PIL.Image, "open", warning_open)
    held = tmp_path / "photos"
    shutil.copytree(photos, held)
    shutil.copy(next(held.iterdir()), held / "kodim03.png")  # a held-out name: an info line about it
    args = [a for a in TRAIN_FAST if a not in ("-q",)]
    r = _invoke(_commands()["rawdiff-train"], ["--photos", held, "--out", tmp_path / "run", *args, "--steps", "1"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("rawdiff-train: ") for ln in lines), r.stderr
    assert any("Corrupt EXIF data" in ln for ln in lines) and "UserWarning" not in r.stderr, r.stderr


# ---- closed stderr ---------------------------------------------------------------------------------------------------

def _closed_stderr() -> None:
    os.close(2)


def test_closed_stderr_neither_stops_train_nor_fails_infer_progress(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run([str(BIN / "rawdiff-train"), "--photos", str(photos), "--out", str(out),
                           *[a for a in TRAIN_FAST if a != "-q"], "--steps", "2"], preexec_fn=_closed_stderr,
                          capture_output=False, stdout=subprocess.PIPE, timeout=300)
    assert proc.returncode == 0 and (out / "latest").is_file(), proc.stdout
    src = _photo(tmp_path / "a.png")
    proc = subprocess.run([str(BIN / "rawdiff-infer"), str(src), "--ckpt", str(ckpt), "--steps", "2", "--progress",
                           "-o", str(tmp_path / "o.npy")], preexec_fn=_closed_stderr, stdout=subprocess.PIPE,
                          timeout=300)
    assert proc.returncode == 0 and (tmp_path / "o.npy").is_file(), proc.stdout


# ---- long multi-byte output names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [237, 246, 255])
def test_infer_output_names_of_multibyte_utf8_up_to_255_bytes(size: int, ckpt: Path, tmp_path: Path) -> None:
    stem = "\u8a9e" * ((size - len(".npy")) // 3)
    stem += "x" * (size - len(".npy") - len(stem.encode()))
    src = _photo(tmp_path / "a.png")
    target = tmp_path / (stem + ".npy")
    assert len(target.name.encode()) == size
    r = _invoke(_commands()["rawdiff-infer"], [src, "--ckpt", ckpt, "--steps", "1", "-o", target])
    assert r.exit_code == 0, r.output
    assert np.load(target).shape == (24, 28, 3)
    no_debris(tmp_path)


# ---- rawdiff-export of a U-Net that loads but cannot run: one line, not torch's exporter logs ------------------------

EXPORT_UNRUNNABLE = """
import sys, torch
from rawdiff_infer import model as M
forward = M.UNet.forward
def broken(self, x, c, t):  # loads and validates, but its graph has a shape error torch finds only when tracing
    h = forward(self, x, c, t)
    return h[:, :, :-1] + h[:, :, 1:] @ torch.ones(h.shape[-1] + 1, 3)
M.UNet.forward = broken
from rawdiff_export.cli import main
sys.argv = ["rawdiff-export", *sys.argv[1:]]
main()
"""


def test_export_of_an_unrunnable_unet_is_one_line(ckpt: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", EXPORT_UNRUNNABLE, "--ckpt", str(ckpt), "--onnx-only", "--no-parity",
                           "--out", str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    one_line(proc.stderr, "rawdiff-export", "cannot be exported", ckpt.name)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_infer_on_a_full_disk_fails_the_input_with_one_line_and_no_temporary(ckpt: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    src = _photo(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    full_disk(monkeypatch)
    r = _invoke(_commands()["rawdiff-infer"], [src, "--ckpt", ckpt, "--steps", "1", "-o", out, "--format", "npy",
                                               "--format", "tiff"])
    assert r.exit_code == 1, r.output
    one_line(r, "rawdiff-infer", "No space left on device")
    assert os.listdir(out) == []


def test_a_stderr_nobody_reads_fails_nothing(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    reader, writer = os.pipe()
    os.close(reader)  # every write to stderr is EPIPE
    try:
        src = _photo(tmp_path / "a.png")
        proc = subprocess.run([str(BIN / "rawdiff-infer"), str(src), "--ckpt", str(ckpt), "--steps", "2",
                               "--progress", "-o", str(tmp_path / "o.npy")], stderr=writer, stdout=subprocess.PIPE,
                              timeout=300)
        assert proc.returncode == 0 and (tmp_path / "o.npy").is_file(), proc.stdout
        out = tmp_path / "run"
        proc = subprocess.run([str(BIN / "rawdiff-train"), "--photos", str(photos), "--out", str(out),
                               *[a for a in TRAIN_FAST if a != "-q"], "--steps", "2"], stderr=writer,
                              stdout=subprocess.PIPE, timeout=300)
        assert proc.returncode == 0 and (out / "latest").is_file(), proc.stdout
    finally:
        os.close(writer)


def test_infer_patch_size_within_the_descriptions_compute_bound(tmp_path: Path) -> None:
    """--patch-size may be up to twice the trained patch: the description's compute bound applies to the patch
    asked for, before compute (a 96-px model with attention at full resolution: 9,216 positions at its own patch,
    36,864 at 192, above the 128 x 128 bound)."""
    from rawdiff_infer.checkpoint import ModelMeta
    from rawdiff_infer.cli import cli as infer_cli
    from rawdiff_infer.model import UNetConfig

    cfg = UNetConfig(base_channels=16, channel_mults=(1, 2, 2, 2), head_channels=16, groups=8,
                     attention_stages=(0, 1, 2, 3), patch_size=96)
    ckpt = save_checkpoint(UNet(cfg), tmp_path / "att0.safetensors", meta=ModelMeta(model=cfg))
    photo = _photo(tmp_path / "p.png")
    r = _invoke(infer_cli, [photo, "--ckpt", ckpt, "--patch-size", 192, "-o", tmp_path / "o.npy"])
    assert r.exit_code == 2
    one_line(r, "rawdiff-infer", "--patch-size 192", "attention_stages")
    assert not (tmp_path / "o.npy").exists()
