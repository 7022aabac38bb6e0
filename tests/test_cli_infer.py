"""rawdiff-infer through its real command line: click's CliRunner in-process, subprocesses for exit codes that
only a real process shows (signals, torchrun's environment, peak memory).

Every failure test checks the user-facing contract of DESIGN.md: one line on stderr naming the file and the
problem, no traceback, the documented exit status (0 ok, 1 some images failed, 2 bad command line / model /
output folder, 130 Ctrl-C, 143 SIGTERM), no partial or temporary file in the output folder, and no good file
overwritten.
"""

from __future__ import annotations

import os
import re
import shutil
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

from rawdiff_infer.checkpoint import ModelMeta, read_meta, save_checkpoint
from rawdiff_infer.cli import cli
from rawdiff_infer.io import mosaic
from rawdiff_infer.model import UNet, UNetConfig

FAST = ["--steps", "2"]


# --------------------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(UNet(TINY_CONFIG), path)
    return path


def _photo(path: Path, h: int, w: int, seed: int = 0) -> Path:
    """A smooth gradient with texture, saved by suffix (PNG / JPEG)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w, y / h, 0.5 + 0.25 * np.sin(x / 7.0) * np.cos(y / 5.0)], axis=-1) * 220
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    _photo(d / "a.png", 80, 100, seed=1)
    _photo(d / "b.png", 70, 60, seed=2)
    return d


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    files = {"missing": d / "missing.jpg", "empty": d / "empty.png", "text": d / "notes.jpg",
             "truncated_jpeg": d / "rocket_half.jpg", "truncated_png": d / "kodim03_half.png",
             "gpr": shared_data / "raw" / "gopro_hero6_GOPR0024_unsupported_by_rawpy.GPR"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not a JPEG\n")
    for key, src in (("truncated_jpeg", "skimage_rocket.jpg"), ("truncated_png", "kodim03.png")):
        data = (shared_data / "photos" / src).read_bytes()
        files[key].write_bytes(data[: len(data) // 2])
    return files


def invoke(*args: object) -> Result:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return Result(r.exit_code, r.stdout, r.stderr)


class Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def __repr__(self) -> str:
        return f"exit {self.code}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def _exe() -> list[str]:
    script = Path(sys.executable).with_name("rawdiff-infer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rawdiff_infer.cli"]


def run(*args: object, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
    p = subprocess.run([*_exe(), *(str(a) for a in args)], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})}, check=False)
    return Result(p.returncode, p.stdout, p.stderr)


def one_error_line(stderr: str, *needles: str) -> str:
    """stderr is exactly one non-blank line (no traceback), containing every needle."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("rawdiff-infer: "), line
    for n in needles:
        assert n in line, (n, line)
    return line


def assert_no_debris(folder: Path) -> None:
    """No temporary or hidden files left anywhere under ``folder``."""
    if folder.exists():
        debris = [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
        assert not debris, debris


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.fixture
def out_with_keeper(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """An output folder that already holds a good file from an earlier run (must never be touched)."""
    out = tmp_path / "out"
    out.mkdir()
    keeper = out / "earlier.dng"
    keeper.write_bytes(b"II*\x00 a good earlier output " * 100)
    return out, keeper, keeper.read_bytes()


# --------------------------------------------------------------------------------------------------------
# 1. bad inputs
# --------------------------------------------------------------------------------------------------------

BAD_INPUTS = {  # key -> words the error line must contain
    "missing": ["no such file"],
    "empty": ["empty file"],
    "truncated_jpeg": ["truncated JPEG"],
    "truncated_png": ["truncated PNG"],
    "text": ["not an image"],
    "gpr": ["camera RAW files are not accepted"],
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_file(kind: str, bad_files: dict[str, Path], ckpt: Path,
                        out_with_keeper: tuple[Path, Path, bytes]) -> None:
    out, keeper, kept = out_with_keeper
    src = bad_files[kind]
    r = invoke(src, "--ckpt", ckpt, *FAST, "-o", out)
    assert r.code == 1, r
    one_error_line(r.stderr, str(src), *BAD_INPUTS[kind])
    assert files_in(out) == {"earlier.dng"} and keeper.read_bytes() == kept
    assert_no_debris(out)


def test_bad_input_exit_status_in_a_real_process(bad_files: dict[str, Path], tmp_path: Path) -> None:
    """Same through the installed console script (a missing file is found before the model is loaded)."""
    r = run(bad_files["missing"], "-o", tmp_path / "o")
    assert r.code == 1, r
    one_error_line(r.stderr, str(bad_files["missing"]), "no such file")


def test_directory_with_good_and_bad_files(photos: Path, bad_files: dict[str, Path], ckpt: Path,
                                           tmp_path: Path) -> None:
    d = tmp_path / "shoot"
    d.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(photos / name, d / name)
    for key in ("empty", "text", "truncated_jpeg"):
        shutil.copy(bad_files[key], d / bad_files[key].name)
    (d / "IMG_0001.CR2").write_bytes(b"raw next to its JPEG")  # not an input type: ignored with a warning
    (d / ".hidden.png").write_bytes(b"")                        # hidden: not looked at
    out = tmp_path / "raw"
    r = invoke(d, "--ckpt", ckpt, *FAST, "-o", out, "-q")
    assert r.code == 1, r
    assert files_in(out) == {"a.dng", "b.dng"}
    assert_no_debris(out)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    for key, words in (("empty", "empty file"), ("text", "not an image"), ("truncated_jpeg", "truncated JPEG")):
        name = bad_files[key].name
        assert sum(name in ln and words in ln for ln in lines) == 1, (name, r.stderr)
    assert any("warning" in ln and "IMG_0001.CR2" in ln for ln in lines), r.stderr
    assert lines[-1] == "rawdiff-infer: 3 failed, 2 done", r.stderr
    assert len(lines) == 5, r.stderr
    assert not any(".hidden" in ln for ln in lines)


def test_library_warnings_are_one_line_each(ckpt: Path, tmp_path: Path) -> None:
    """A lossy decode step is a warning (once, not also as a log record), and the image is still done."""
    src = tmp_path / "logo.png"
    Image.fromarray(np.full((30, 40, 4), 128, np.uint8), "RGBA").save(src)
    r = invoke(src, "--ckpt", ckpt, *FAST, "-o", tmp_path / "out", "-q")
    assert r.code == 0, r
    one_error_line(r.stderr, "warning", str(src), "alpha")
    assert files_in(tmp_path / "out") == {"logo.dng"}


def test_too_small_for_a_dng(ckpt: Path, tmp_path: Path) -> None:
    src = tmp_path / "dot.png"
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(src)
    r = invoke(src, "--ckpt", ckpt, *FAST, "-o", tmp_path / "out")
    assert r.code == 1, r
    one_error_line(r.stderr, str(src), "1x1", "too small for a DNG")
    assert files_in(tmp_path / "out") == set()
    r = invoke(src, "--ckpt", ckpt, *FAST, "-o", tmp_path / "out", "--format", "npy", "-q")
    assert r.code == 0 and r.stderr == "", r
    assert np.load(tmp_path / "out" / "dot.npy").shape == (1, 1, 3)


# --------------------------------------------------------------------------------------------------------
# unwritable outputs, existing outputs
# --------------------------------------------------------------------------------------------------------


def test_output_parent_is_a_regular_file(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "notadir"
    blocker.write_text("a file where a folder should be")
    r = invoke(photos / "a.png", "--ckpt", ckpt, *FAST, "-o", blocker / "x.dng")
    assert r.code == 2, r
    one_error_line(r.stderr, str(blocker), "not a directory")
    r = invoke(photos / "a.png", "--ckpt", ckpt, *FAST, "-o", blocker / "sub" / "")
    assert r.code == 2, r
    one_error_line(r.stderr, "cannot create output directory", "Not a directory")
    assert blocker.read_text() == "a file where a folder should be"
    assert files_in(tmp_path) == {"notadir"}


def test_output_with_an_image_suffix_is_refused(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    """'-o result.jpg' is a typo, not a folder to create."""
    r = invoke(photos / "a.png", "--ckpt", ckpt, *FAST, "-o", tmp_path / "result.jpg")
    assert r.code == 2, r
    one_error_line(r.stderr, "result.jpg", ".dng, .tiff or .npy")
    assert files_in(tmp_path) == set()


def _can_mount() -> bool:
    if not shutil.which("unshare") or not sys.platform.startswith("linux"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                           capture_output=True, check=False)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs unshare + tmpfs mounts (user/mount namespaces)")


def _in_namespace(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace (mounts vanish with it)."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RDI": " ".join(_exe())}, check=False)


@needs_mount
def test_read_only_output_folder(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    """A read-only mount (root ignores chmod; a read-only file system stops root too)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(photos / "a.png", tmp_path / "a.png")
    p = _in_namespace(f"""
        mount -t tmpfs -o size=1m none {ro} && cp {tmp_path / 'a.png'} {ro}/a.png && mount -o remount,ro {ro} || exit 99
        $RDI {tmp_path / 'a.png'} --ckpt {ckpt} --steps 2 -o {ro}/ 2>&1; echo "rc=$?"
        $RDI {ro}/a.png --ckpt {ckpt} --steps 2 2>&1; echo "rc=$?"
        ls -A {ro}
    """)
    out = p.stdout.splitlines()
    assert "Traceback" not in p.stdout, p.stdout
    # -o on a read-only folder: a command-line problem, found before any compute
    assert re.fullmatch(r"rawdiff-infer: error: cannot write to output directory .*/ro: Read-only file system",
                        out[0]), p.stdout
    assert out[1] == "rc=2", p.stdout
    # output next to an input on a read-only folder: that image fails, before its compute
    assert re.fullmatch(r"rawdiff-infer: .*/ro/a\.png: cannot write output to .*/ro: Read-only file system",
                        out[2]), p.stdout
    assert out[3] == "rc=1", p.stdout
    assert out[4:] == ["a.png"], p.stdout


@needs_mount
def test_disk_full_keeps_the_earlier_output(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    """--force over a good DNG on a full disk: the write fails, the old file survives, no temporary is left."""
    good = tmp_path / "good.dng"
    assert invoke(photos / "a.png", "--ckpt", ckpt, *FAST, "-o", good, "--seed", "5").code == 0
    full = tmp_path / "full"
    full.mkdir()
    p = _in_namespace(f"""
        mount -t tmpfs -o size=64k none {full} && cp {good} {full}/a.dng || exit 99
        $RDI {photos / 'a.png'} --ckpt {ckpt} --steps 2 -o {full}/ --force -q 2>&1; echo "rc=$?"
        ls -A {full}; cmp {good} {full}/a.dng && echo same
    """)
    out = p.stdout.splitlines()
    assert "Traceback" not in p.stdout, p.stdout
    assert re.fullmatch(r"rawdiff-infer: .*/full/a\.dng: cannot write: No space left on device", out[0]), p.stdout
    assert out[1:] == ["rc=1", "a.dng", "same"], p.stdout


def test_existing_output_refused_forced_resumed(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke(photos / "a.png", "--ckpt", ckpt, *FAST, "-o", out, "-q").code == 0
    target = out / "a.dng"
    first = target.read_bytes()
    # refused: untouched byte for byte
    r = invoke(photos / "a.png", "--ckpt", ckpt, *FAST, "-o", out, "--seed", "9")
    assert r.code == 1, r
    one_error_line(r.stderr, str(target), "exists", "--force")
    assert target.read_bytes() == first
    # --resume: skipped, exit 0, untouched
    r = invoke(photos / "a.png", "--ckpt", ckpt, *FAST, "-o", out, "--seed", "9", "--resume")
    assert r.code == 0 and "skipped" in r.stdout and r.stderr == "", r
    assert target.read_bytes() == first
    # --force: overwritten (another seed gives other bytes)
    r = invoke(photos / "a.png", "--ckpt", ckpt, *FAST, "-o", out, "--seed", "9", "--force", "-q")
    assert r.code == 0 and r.stderr == "", r
    assert target.read_bytes() != first
    assert files_in(out) == {"a.dng"}
    assert_no_debris(out)
    # both: contradictory
    r = invoke(photos / "a.png", "--ckpt", ckpt, "-o", out, "--force", "--resume")
    assert r.code == 2, r
    one_error_line(r.stderr, "--force", "--resume")


def test_resume_writes_only_missing_formats(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke(photos / "b.png", "--ckpt", ckpt, *FAST, "-o", out, "--format", "dng", "-q").code == 0
    dng = (out / "b.dng").read_bytes()
    r = invoke(photos / "b.png", "--ckpt", ckpt, *FAST, "-o", out, "--format", "dng", "--format", "npy", "--resume",
               "-q")
    assert r.code == 0, r
    assert files_in(out) == {"b.dng", "b.npy"} and (out / "b.dng").read_bytes() == dng


# --------------------------------------------------------------------------------------------------------
# bad checkpoints
# --------------------------------------------------------------------------------------------------------


def _bad_checkpoint(kind: str, good: Path, d: Path) -> tuple[Path, str]:
    from safetensors.torch import save_file

    if kind == "truncated":
        p = d / "truncated.safetensors"
        data = good.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p, "safetensors"
    if kind == "torch_pickle":
        p = d / "model.pt"
        torch.save({"w": torch.zeros(3)}, p)
        return p, "only safetensors"
    if kind == "raw_pickle":
        import pickle

        p = d / "model.pkl"
        p.write_bytes(pickle.dumps({"w": [0.0] * 3}))
        return p, "pickle"
    if kind == "other_architecture":  # a rawdiff description, weights of another U-Net
        p = d / "mismatch.safetensors"
        other = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2, 2, 2), head_channels=8, groups=4))
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(p),
                  metadata={"rawdiff": ModelMeta(model=TINY_CONFIG).to_json()})
        return p, "has shape"
    if kind == "foreign":  # some other project's safetensors
        p = d / "sd15.safetensors"
        save_file({"conv_in.weight": torch.zeros(4, 4)}, str(p), metadata={"format": "pt"})
        return p, "not a rawdiff checkpoint"
    if kind == "missing":
        return d / "nope.safetensors", "no such checkpoint"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "torch_pickle", "raw_pickle", "other_architecture", "foreign",
                                  "missing"])
def test_bad_checkpoint(kind: str, photos: Path, ckpt: Path, tmp_path: Path,
                        out_with_keeper: tuple[Path, Path, bytes]) -> None:
    out, keeper, kept = out_with_keeper
    bad, words = _bad_checkpoint(kind, ckpt, tmp_path)
    r = invoke(photos / "a.png", "--ckpt", bad, *FAST, "-o", out)
    assert r.code == 2, r
    one_error_line(r.stderr, bad.name, words)
    assert files_in(out) == {"earlier.dng"} and keeper.read_bytes() == kept
    assert_no_debris(out)


# --------------------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated"),
                                                   (signal.SIGHUP, 129, "hung up")])
def test_signal_mid_run(sig: int, code: int, word: str, ckpt: Path, tmp_path: Path,
                        out_with_keeper: tuple[Path, Path, bytes]) -> None:
    out, keeper, kept = out_with_keeper
    src = _photo(tmp_path / "large.png", 256, 320)
    cmd = [*_exe(), str(src), "--ckpt", str(ckpt), "--steps", "500", "-o", str(out), "--progress"]
    # a shell without job control starts background jobs with SIGINT ignored; give the child the default back
    # (no other thread of ours runs yet, so preexec_fn is safe here)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    chunks: list[bytes] = []
    progressed = threading.Event()

    def reader() -> None:
        assert proc.stderr is not None
        while data := os.read(proc.stderr.fileno(), 4096):
            chunks.append(data)
            if re.search(rb"\b[1-9]\d*/500\b", b"".join(chunks)):  # the first sampler step is done
                progressed.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        assert progressed.wait(60), b"".join(chunks).decode(errors="replace")
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    t.join(5)
    stderr = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    pieces = [p.strip() for p in re.split(r"[\r\n]", stderr) if p.strip() and p.strip() != "\x1b[A"]
    messages = [p for p in pieces if p.startswith("rawdiff-infer:")]
    assert messages == [f"rawdiff-infer: {word} while processing {src}; no partial output was written"], stderr
    assert all(p.startswith(("rawdiff-infer:", "large.png:")) for p in pieces), pieces  # the rest: progress bar
    assert files_in(out) == {"earlier.dng"} and keeper.read_bytes() == kept
    assert_no_debris(out)


# --------------------------------------------------------------------------------------------------------
# 2. round trip of the written files
# --------------------------------------------------------------------------------------------------------


def test_dng_tiff_npy_round_trip(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    rawpy = pytest.importorskip("rawpy")
    import tifffile

    out = tmp_path / "rt"
    r = invoke(photos / "a.png", "--ckpt", ckpt, *FAST, "-o", out, "--format", "dng", "--format", "npy",
               "--format", "tiff", "-q")
    assert r.code == 0, r
    linear = np.load(out / "a.npy")
    assert linear.dtype == np.float32 and linear.shape == (80, 100, 3)
    assert 0.0 <= linear.min() and linear.max() <= 1.0
    camera = read_meta(ckpt).camera
    # DNG: the mosaic LibRaw reads back is exactly round(black + mosaic(linear) * (white - black))
    black, white = camera.black_level, camera.white_level
    expected = np.rint(black + np.clip(mosaic(linear, camera.cfa_pattern), 0.0, 1.0).astype(np.float64)
                       * (white - black)).astype(np.uint16)
    with rawpy.imread(str(out / "a.dng")) as raw:
        np.testing.assert_array_equal(raw.raw_image_visible, expected)
        colours = "".join(raw.color_desc.decode()[i] for i in raw.raw_pattern.ravel())
        assert colours == camera.cfa_pattern
        assert raw.white_level == white and list(raw.black_level_per_channel) == [black] * 4
        rgb = raw.postprocess()
        assert rgb.shape == (80, 100, 3)
    # TIFF: 16-bit, within one code value of the array (half a code from rounding)
    tif = tifffile.imread(out / "a.tiff")
    assert tif.dtype == np.uint16 and tif.shape == (80, 100, 3)
    assert np.abs(tif / 65535.0 - linear).max() <= 1 / 65535
    # --encoded: the model's gamma-encoded space, same seed -> encoded ** 2.2 == linear
    r = invoke(photos / "a.png", "--ckpt", ckpt, *FAST, "-o", tmp_path / "enc", "--format", "npy", "--format", "tiff",
               "--format", "dng", "--encoded", "-q")
    assert r.code == 0, r
    with rawpy.imread(str(tmp_path / "enc" / "a.dng")) as raw:  # the DNG stays linear
        np.testing.assert_array_equal(raw.raw_image_visible, expected)
    encoded = np.load(tmp_path / "enc" / "a.npy")
    assert np.abs(encoded - linear).max() > 0.05  # really another space
    np.testing.assert_allclose(encoded.astype(np.float64) ** 2.2, linear, rtol=1e-5, atol=1e-7)
    assert np.abs(tifffile.imread(tmp_path / "enc" / "a.tiff") / 65535.0 - encoded).max() <= 1 / 65535


# --------------------------------------------------------------------------------------------------------
# 3. a 1024 x 1024 image end to end; 4. seeds
# --------------------------------------------------------------------------------------------------------


def test_megapixel_image_end_to_end(ckpt: Path, tmp_path: Path) -> None:
    rawpy = pytest.importorskip("rawpy")
    src = _photo(tmp_path / "mp.png", 1024, 1024, seed=3)
    r = invoke(src, "--ckpt", ckpt, *FAST, "-o", tmp_path / "out")
    assert r.code == 0, r
    assert re.search(r"mp\.png -> .*mp\.dng\s+1024x1024, \d+ patches, 2 steps", r.stdout), r.stdout
    with rawpy.imread(str(tmp_path / "out" / "mp.dng")) as raw:
        assert raw.raw_image_visible.shape == (1024, 1024)
        assert raw.raw_image_visible.std() > 0


def test_seed_determinism(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    outs = {}
    for name, seed in (("s1", 11), ("s1b", 11), ("s2", 12)):
        assert invoke(photos / "b.png", "--ckpt", ckpt, *FAST, "--seed", seed, "-o", tmp_path / f"{name}.npy").code == 0
        outs[name] = np.load(tmp_path / f"{name}.npy")
    np.testing.assert_array_equal(outs["s1"], outs["s1b"])
    assert np.abs(outs["s1"] - outs["s2"]).max() > 1e-3


# --------------------------------------------------------------------------------------------------------
# 5. help and options
# --------------------------------------------------------------------------------------------------------


def test_help_has_examples() -> None:
    r = invoke("--help")
    assert r.code == 0, r
    assert "Examples:" in r.stdout and "rawdiff-infer photo.jpg" in r.stdout
    assert "Exit status" in r.stdout


@pytest.mark.parametrize("opts", [["--merge", "end"], ["--window", "linear"], ["--stride", "64"],
                                  ["--sampler", "ddim", "--steps", "3"], ["--sampler", "ddpm", "--steps", "3"],
                                  ["--sampler", "dpm-single", "--steps", "3"], ["--format", "tiff"]],
                         ids=lambda o: " ".join(o))
def test_options_run(opts: list[str], photos: Path, ckpt: Path, tmp_path: Path) -> None:
    import tifffile

    args = [*FAST, *opts] if "--steps" not in opts else opts
    r = invoke(photos / "b.png", "--ckpt", ckpt, *args, "-o", tmp_path / "out", "-q")
    assert r.code == 0 and r.stderr == "", r
    if "tiff" in opts:
        assert files_in(tmp_path / "out") == {"b.tiff"}
        assert tifffile.imread(tmp_path / "out" / "b.tiff").shape == (70, 60, 3)
    else:
        assert files_in(tmp_path / "out") == {"b.dng"}
        rawpy = pytest.importorskip("rawpy")
        with rawpy.imread(str(tmp_path / "out" / "b.dng")) as raw:
            assert raw.raw_image_visible.shape == (70, 60)


@pytest.mark.parametrize("opts", [["--stride", "0"], ["--patch-size", "30"], ["--steps", "0"],
                                  ["--batch-size", "0"], ["--device", "nonsense"],
                                  ["--cuda-graph", "--device", "cpu"]])
def test_bad_options_are_usage_errors(opts: list[str], photos: Path, ckpt: Path, tmp_path: Path) -> None:
    r = invoke(photos / "b.png", "--ckpt", ckpt, *opts, "-o", tmp_path / "out")
    assert r.code == 2, r
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() or files_in(tmp_path / "out") == set()


# --------------------------------------------------------------------------------------------------------
# 6. globs, output folders, collisions
# --------------------------------------------------------------------------------------------------------


def test_glob_input_and_output_folder_creation(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(photos / "a.png", d / "x.png")
    shutil.copy(photos / "b.png", d / "y.png")
    _photo(d / "z.jpg", 40, 40)
    out = tmp_path / "deep" / "er" / "raw"
    r = invoke(f"{d}/*.png", "--ckpt", ckpt, *FAST, "-o", out, "-q")
    assert r.code == 0 and r.stderr == "", r
    assert files_in(out) == {"x.dng", "y.dng"}
    r = invoke(f"{d}/*.webp", "--ckpt", ckpt, *FAST, "-o", out)
    assert r.code == 2, r
    assert "no file matches this pattern" in r.stderr and "Traceback" not in r.stderr


def test_two_inputs_one_output_name_is_a_usage_error_before_compute(photos: Path, tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(photos / "a.png", d / "shot.png")
    _photo(d / "shot.jpg", 40, 40)
    pickle_ckpt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pickle_ckpt)  # would be refused if the model were opened first
    r = invoke(d / "shot.png", d / "shot.jpg", "--ckpt", pickle_ckpt, "-o", tmp_path / "out")
    assert r.code == 2, r
    one_error_line(r.stderr, "shot.jpg", "shot.png", "would both write", "shot.dng")
    assert files_in(tmp_path / "out") == set() and files_in(d) == {"shot.png", "shot.jpg"}


def test_output_that_would_overwrite_its_input(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    src = tmp_path / "scan.tiff"
    Image.open(photos / "b.png").save(src)
    before = src.read_bytes()
    r = invoke(src, "--ckpt", ckpt, *FAST, "--format", "tiff", "--force")
    assert r.code == 2, r
    one_error_line(r.stderr, "would overwrite the input")
    assert src.read_bytes() == before


# --------------------------------------------------------------------------------------------------------
# 7. torchrun-style sharding
# --------------------------------------------------------------------------------------------------------


def test_sharding_by_rank(photos: Path, ckpt: Path, tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    for i in range(4):
        shutil.copy(photos / "b.png", d / f"p{i}.png")
    (d / "broken.png").write_bytes(b"")  # sorted first: rank 0's share
    out = tmp_path / "out"
    r = run(d, "--ckpt", ckpt, *FAST, "-o", out, "-q", env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert r.code == 0, r  # the broken file belongs to rank 0
    assert files_in(out) == {"p0.dng", "p2.dng"}  # sorted: broken, p0, p1, p2, p3 -> rank 1 takes p0, p2
    assert r.stderr == "", r
    r = run(d, "--ckpt", ckpt, "-o", out, env={"WORLD_SIZE": "2", "RANK": "5"})
    assert r.code == 2, r
    one_error_line(r.stderr, "RANK=5", "WORLD_SIZE=2")


# --------------------------------------------------------------------------------------------------------
# 9. a 24-megapixel photo: peak memory
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_24_megapixel_peak_memory(ckpt: Path, tmp_path: Path) -> None:
    h, w = 4000, 6000
    rng = np.random.default_rng(0)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    img = np.empty((h, w, 3), np.uint8)
    for c, (a, b) in enumerate(((0.6, 0.3), (0.3, 0.6), (0.5, 0.5))):
        img[..., c] = np.clip((a * y + b * x + 0.1 * np.sin(x * 200 + c) * np.cos(y * 150)) * 255, 0, 255)
    img = np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    src = tmp_path / "24mp.jpg"
    Image.fromarray(img).save(src, quality=90)
    del img
    out = tmp_path / "out"
    with open(tmp_path / "stdout", "wb") as so, open(tmp_path / "stderr", "wb") as se:
        start = time.perf_counter()
        proc = subprocess.Popen([*_exe(), str(src), "--ckpt", str(ckpt), "--steps", "1", "--stride", "64",
                                 "--batch-size", "256", "-o", str(out), "-q"], stdout=so, stderr=se)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_gb = usage.ru_maxrss * 1024 / 1e9  # Linux: kilobytes
    print(f"\n24 MP: peak RSS {peak_gb:.2f} GB, wall {wall:.1f} s")
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
    assert files_in(out) == {"24mp.dng"}
    assert peak_gb < 6.0


@pytest.mark.slow
def test_bundled_paper_size_model_on_a_real_photo(tmp_path: Path, shared_data: Path) -> None:
    """The default (bundled, paper-size) model on a crop of a real photo, through the real command."""
    from PIL import Image

    from rawdiff_infer.backends import default_checkpoint

    if default_checkpoint() is None:
        pytest.skip("this build has no bundled model")
    src = tmp_path / "photo.png"
    Image.open(shared_data / "photos" / "kodim05.png").crop((300, 200, 428, 296)).save(src)
    out = tmp_path / "photo.npy"
    r = subprocess.run([sys.executable, "-m", "rawdiff_infer.cli", str(src), "-o", str(out), "--steps", "10", "-q"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    raw = np.load(out)
    assert raw.shape == (96, 128, 3) and raw.dtype == np.float32
    assert 0.0 <= raw.min() and raw.max() <= 1.0 and raw.std() > 0.01  # a real image, not a constant


def test_cuda_graph_has_one_meaning() -> None:
    """--cuda-graph: the backend replays graphs of its calls in every run (torch, trt); backends without graphs are
    refused in one line, before anything is loaded."""
    from rawdiff_infer.cli import backend_graphs
    from rawdiff_infer.plan import UsageError

    assert backend_graphs(False, "onnx") is False and backend_graphs(False, "torch") is False
    assert backend_graphs(True, "torch") is True and backend_graphs(True, "trt") is True
    for kind in ("onnx", "aoti"):
        with pytest.raises(UsageError, match=f"--cuda-graph: the {kind} backend"):
            backend_graphs(True, kind)
