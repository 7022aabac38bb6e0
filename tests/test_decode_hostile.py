"""Hostile inputs to ``read_image``: the outcome is always a DecodedImage or one ImageError line naming the file,
never another exception, never a hang, and nothing on stderr but rawdiff's own messages (checked at the
file-descriptor level, so C libraries printing directly are caught too)."""

from __future__ import annotations

import io
import logging
import os
import shutil
import struct
import sys
import tempfile
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from rawdiff_infer.io import DecodedImage, ImageError, read_image
from rawdiff_infer.messages import show_path

imagecodecs = pytest.importorskip("imagecodecs")


# ---------------------------------------------------------------------------------------------- helpers

def picture(h: int = 24, w: int = 32, *, seed: int = 0) -> np.ndarray:
    """A smooth uint8 H x W x 3 picture (JPEG-friendly)."""
    y, x = np.mgrid[0:h, 0:w]
    ph = np.random.default_rng(seed).uniform(0, 6.28, 3)
    return np.stack([127.5 + 100 * np.sin(x / max(w, 1) * 4 + y / max(h, 1) * 2 + p) for p in ph], -1).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    """``arr`` in a container: JPEG / PNG / WEBP / TIFF by Pillow, "TIFF16" and "TIFFZ" (16-bit) by tifffile."""
    b = io.BytesIO()
    if fmt == "TIFF16":
        tifffile.imwrite(b, arr.astype(np.uint16) * 257, photometric="rgb", **kw)
    elif fmt == "TIFFZ":
        tifffile.imwrite(b, arr.astype(np.uint16) * 257, photometric="rgb", compression="zlib", **kw)
    else:
        Image.fromarray(arr).save(b, fmt, **kw)
    return b.getvalue()


def one_line_error(path: os.PathLike | str, *phrases: str) -> str:
    """read_image(path) must raise ImageError: one line, starting with the shown path; returns the message."""
    with pytest.raises(ImageError) as ei:
        read_image(path)
    assert type(ei.value) is ImageError
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg and msg == msg.strip(), msg
    assert msg.startswith(f"{show_path(path)}: "), msg
    for p in phrases:
        assert p in msg, msg
    return msg


def decoded_or_one_line(path: Path) -> DecodedImage | str:
    """The contract for any input at all: a valid DecodedImage, or one ImageError line naming the file."""
    try:
        d = read_image(path)
    except ImageError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(f"{show_path(path)}: "), msg
        return msg
    assert isinstance(d, DecodedImage)
    assert d.pixels.ndim == 3 and d.pixels.shape[2] == 3 and d.pixels.flags["C_CONTIGUOUS"]
    assert (d.bit_depth, d.pixels.dtype) in ((8, np.uint8), (16, np.uint16))
    assert all("\n" not in w for w in d.warnings)
    return d


def ifd0_entry(data: bytearray, code: int) -> int:
    """Byte offset of tag ``code``'s 12-byte entry in IFD0 of a classic little-endian TIFF."""
    off = struct.unpack("<I", data[4:8])[0]
    (n,) = struct.unpack("<H", data[off:off + 2])
    for k in range(n):
        e = off + 2 + 12 * k
        if struct.unpack("<H", data[e:e + 2])[0] == code:
            return e
    raise KeyError(code)


@pytest.fixture
def quiet_stderr(capfd):
    """Yields a checker: everything written to fd 2 since the last call must be empty."""
    capfd.readouterr()

    def check() -> None:
        err = capfd.readouterr().err
        assert err == "", f"stray stderr output: {err!r}"

    return check


# ---------------------------------------------------------------------------------------------- file names

ODD_NAMES = {
    "newline": "new\nline.png",
    "tab": "tab\tname.png",
    "non-UTF-8 byte": os.fsdecode(b"bad\xffbyte.png"),
    "all three": os.fsdecode(b"a\nb\tc\xfe.png"),
}


@pytest.mark.parametrize("kind", sorted(ODD_NAMES))
def test_odd_file_names_are_escaped_in_errors_and_notes(tmp_path, kind, caplog, quiet_stderr):
    path = tmp_path / ODD_NAMES[kind]
    shown = show_path(path)
    assert shown.startswith("'") and "\n" not in shown and "\t" not in shown  # show_path's promise
    path.write_bytes(encode(picture(), "PNG")[:100])  # truncated
    msg = one_line_error(path, "truncated PNG data")
    assert msg.startswith(shown)
    rgba = np.concatenate([picture(), np.full((24, 32, 1), 9, np.uint8)], -1)
    path.write_bytes(encode(rgba, "PNG"))
    with caplog.at_level(logging.WARNING, logger="rawdiff_infer"):
        d = read_image(path)
    assert any("alpha" in w for w in d.warnings)
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("rawdiff_infer")]
    assert logged and all(m.startswith(f"{shown}: ") and "\n" not in m for m in logged)
    quiet_stderr()


# ---------------------------------------------------------------------------------------------- not regular files

def test_fifo_without_writer_fails_at_once(tmp_path, quiet_stderr):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome: list[BaseException | DecodedImage] = []

    def run() -> None:
        try:
            outcome.append(read_image(fifo))
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion below
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader before failing, so the test process does not hang
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
        pytest.fail("read_image blocked on a FIFO without a writer")
    assert len(outcome) == 1 and type(outcome[0]) is ImageError
    msg = str(outcome[0])
    assert msg == f"{fifo}: is a FIFO (named pipe), not a regular file"
    quiet_stderr()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_character_device_refused(quiet_stderr):
    one_line_error("/dev/zero", "character device", "not a regular file")
    quiet_stderr()


def test_directory_refused(tmp_path, quiet_stderr):
    (tmp_path / "photos.jpg").mkdir()
    one_line_error(tmp_path / "photos.jpg", "directory")
    quiet_stderr()


# ---------------------------------------------------------------------------------------------- path errors

def test_symlink_loop(tmp_path, quiet_stderr):
    os.symlink("b.jpg", tmp_path / "a.jpg")
    os.symlink("a.jpg", tmp_path / "b.jpg")
    one_line_error(tmp_path / "a.jpg", "symbolic links")
    quiet_stderr()


def test_name_too_long(tmp_path, quiet_stderr):
    one_line_error(tmp_path / ("x" * 296 + ".jpg"), "file name too long")
    quiet_stderr()


def test_path_through_a_file(tmp_path, quiet_stderr):
    (tmp_path / "a.jpg").write_bytes(encode(picture(), "JPEG"))
    one_line_error(tmp_path / "a.jpg" / "b.jpg", "no such file", "not a directory")
    quiet_stderr()


def test_missing_file(tmp_path, quiet_stderr):
    one_line_error(tmp_path / "nope.png", "no such file")
    quiet_stderr()


def test_permission_denied(tmp_path):
    """As root (who reads any file) the read runs in a forked child that has dropped to the 'nobody' user."""
    directory = Path(tempfile.mkdtemp(prefix="rawdiff-perm-"))
    try:
        os.chmod(directory, 0o755)
        path = directory / "locked.png"
        path.write_bytes(encode(picture(), "PNG"))
        os.chmod(path, 0)
        if os.geteuid() != 0:
            one_line_error(path, "permission denied")
            return
        if not hasattr(os, "fork"):
            pytest.skip("needs fork to drop root")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop privileges, read, report the outcome through the pipe
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    read_image(path)
                    os.write(w, b"OK")
                except ImageError as e:
                    os.write(w, str(e).encode("utf-8", "surrogateescape"))
                    code = 0
                except BaseException as e:  # noqa: BLE001
                    os.write(w, f"{type(e).__name__}: {e}".encode())
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            out = f.read().decode("utf-8", "surrogateescape")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, out
        assert out == f"{path}: permission denied"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- silence

def _tiff_broken_tag() -> bytes:
    d = bytearray(encode(picture(), "TIFF16", description="hello"))
    e = ifd0_entry(d, 270)
    d[e + 4:e + 8] = struct.pack("<I", 10**9)  # ImageDescription: a count far beyond the file
    return bytes(d)


def _tiff_lying_compression() -> bytes:
    """An 8-bit TIFF whose Compression says JPEG over raw data: libtiff (through Pillow) prints JPEGLib errors."""
    d = bytearray(encode(picture(), "TIFF"))
    e = ifd0_entry(d, 259)
    d[e + 8:e + 10] = struct.pack("<H", 7)
    return bytes(d)


def _tiff_corrupt_zlib() -> bytes:
    d = bytearray(encode(picture(), "TIFFZ"))
    mid = len(d) // 2
    d[mid:mid + 20] = b"\xff" * 20
    return bytes(d)


def _tiff_ifd_loop() -> bytes:
    d = bytearray(encode(picture(), "TIFF"))
    off = struct.unpack("<I", d[4:8])[0]
    (n,) = struct.unpack("<H", d[off:off + 2])
    d[off + 2 + 12 * n:off + 6 + 12 * n] = struct.pack("<I", off)  # next IFD = this IFD
    return bytes(d)


def _tiff_16_samples() -> bytes:
    """RGB data declared with 16 samples per pixel: tifffile fails, and Pillow, tried next, logs an error
    ("More samples per pixel than can be decoded") through the logging module."""
    d = bytearray(encode(picture(), "TIFF"))
    e = ifd0_entry(d, 277)
    d[e + 8:e + 10] = struct.pack("<H", 16)
    return bytes(d)


NOISY = {  # name: (bytes, expected outcome: phrase of the error, or None for a decoded image)
    "16 samples per pixel (Pillow logs)": (_tiff_16_samples, "corrupt TIFF data"),
    "broken tag": (_tiff_broken_tag, None),
    "lying compression (libtiff)": (_tiff_lying_compression, "corrupt TIFF data"),
    "corrupt deflate data": (_tiff_corrupt_zlib, "corrupt TIFF data"),
    "IFD loop": (_tiff_ifd_loop, None),
    "first IFD beyond the file": (lambda: b"II*\x00\xe8\x03\x00\x00" + bytes(8), "truncated or corrupt TIFF header"),
    "empty IFD": (lambda: b"II*\x00\x08\x00\x00\x00" + bytes(6), "the image has no pixels (0x0)"),
}


@pytest.mark.parametrize("case", sorted(NOISY))
def test_library_noise_never_reaches_stderr(tmp_path, case, quiet_stderr, recwarn):
    """Inputs that make tifffile or Pillow log, Pillow warn or libtiff print: nothing reaches fd 2, no Python
    warning escapes, and the libraries' records reach no logging handler."""
    make, phrase = NOISY[case]
    path = tmp_path / "noisy.tif"
    path.write_bytes(make())
    seen: list[logging.LogRecord] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    grab = Grab(level=logging.DEBUG)
    logging.getLogger().addHandler(grab)
    try:
        if phrase is None:
            d = read_image(path)
            assert d.pixels.shape == (24, 32, 3)
        else:
            one_line_error(path, phrase)
    finally:
        logging.getLogger().removeHandler(grab)
    quiet_stderr()
    assert len(recwarn) == 0, [str(w.message) for w in recwarn]
    assert not [r for r in seen if r.name.startswith(("tifffile", "PIL"))]


def test_plain_process_stderr_holds_only_our_lines(tmp_path):
    """End to end, in a fresh interpreter with no logging set up (so Python's last-resort handler prints every
    warning record): reading noisy, broken and oddly named files prints only lines that start with the file's
    shown name, one per note or error."""
    paths = []
    for i, case in enumerate(sorted(NOISY)):
        paths.append(tmp_path / f"{i}.tif")
        paths[-1].write_bytes(NOISY[case][0]())
    odd = tmp_path / os.fsdecode(b"odd\nname\t\xff.tif")
    odd.write_bytes(_tiff_broken_tag())
    paths.append(odd)
    fl = tmp_path / "float.tif"
    tifffile.imwrite(fl, np.linspace(-1, 2, 48, dtype=np.float32).reshape(4, 4, 3), photometric="rgb")
    paths.append(fl)
    script = (
        "import sys\n"
        "from rawdiff_infer.io import ImageError, read_image\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        read_image(p)\n"
        "    except ImageError as e:\n"
        "        print(e, file=sys.stderr)\n"
    )
    import subprocess

    r = subprocess.run([sys.executable, "-c", script, *map(os.fspath, paths)], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.decode("utf-8", "surrogateescape").splitlines()
    shown = [show_path(p) for p in paths]
    assert lines and all(any(line.startswith(f"{s}: ") for s in shown) for line in lines), lines
    assert sum(line.startswith(f"{show_path(odd)}: ") for line in lines) >= 1
    assert sum(line.startswith(f"{fl}: ") for line in lines) == 2  # clipped + taken as [0, 1]


def test_tifffile_records_become_notes(tmp_path):
    path = tmp_path / "tag.tif"
    path.write_bytes(_tiff_broken_tag())
    d = read_image(path)
    assert d.bit_depth == 16 and np.array_equal(d.pixels, picture().astype(np.uint16) * 257)
    assert any(w.startswith("TIFF: tag 270") for w in d.warnings), d.warnings
    assert not any("<tifffile" in w for w in d.warnings)


def test_tifffile_records_of_other_threads_pass(tmp_path):
    """The capture is per thread: tifffile records logged by another thread, outside a decode, still reach
    the handlers."""
    seen: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    read_image_path = tmp_path / "tag.tif"
    read_image_path.write_bytes(_tiff_broken_tag())
    read_image(read_image_path)  # installs the capture filter
    tlog = logging.getLogger("tifffile")
    grab = Grab()
    tlog.addHandler(grab)
    try:
        t = threading.Thread(target=lambda: tlog.warning("from another thread"))
        t.start()
        t.join()
    finally:
        tlog.removeHandler(grab)
    assert seen == ["from another thread"]


def test_concurrent_decodes_keep_their_own_notes(tmp_path):
    """Threads decoding noisy and clean files at once: each result has its own notes only, and the process's
    warnings machinery is left as it was."""
    noisy, clean = tmp_path / "noisy.tif", tmp_path / "clean.tif"
    noisy.write_bytes(_tiff_broken_tag())
    clean.write_bytes(encode(picture(512, 512), "TIFFZ"))  # long enough for the threads to overlap

    def state() -> tuple:
        return warnings.showwarning, getattr(warnings, "_showwarnmsg_impl", None), list(warnings.filters)

    before = state()
    results: list[tuple[Path, tuple[str, ...]]] = []
    errors: list[BaseException] = []

    start = threading.Barrier(4)

    def work(path: Path) -> None:
        try:
            start.wait(10)
            for _ in range(8):
                results.append((path, read_image(path).warnings))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in (noisy, clean, clean, clean)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 32
    for path, notes in results:
        if path == clean:
            assert notes == ()
        else:
            assert any(n.startswith("TIFF: tag 270") for n in notes), notes
    assert state() == before


def test_pillow_warnings_become_notes_not_warnings(tmp_path, recwarn):
    """Pillow warns (UserWarning) about TIFF tags pointing outside the file; that becomes a note."""
    d = bytearray(encode(picture(), "TIFF", description="hello"))  # 8-bit: Pillow decodes it
    e = ifd0_entry(d, 270)
    d[e + 4:e + 8] = struct.pack("<I", 10**6)
    (tmp_path / "w.tif").write_bytes(bytes(d))
    img = read_image(tmp_path / "w.tif")
    assert np.array_equal(img.pixels, picture())
    assert any("Skipping tag 270" in w for w in img.warnings), img.warnings
    assert len(recwarn) == 0


def test_float_nan_gives_no_numpy_warning(tmp_path, quiet_stderr):
    a = np.full((4, 4, 3), np.nan, np.float32)
    tifffile.imwrite(tmp_path / "nan.tif", a, photometric="rgb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning escaping the decoder would raise here
        one_line_error(tmp_path / "nan.tif", "48 NaN", "refused")
    quiet_stderr()


# ---------------------------------------------------------------------------------------------- hostile content

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "tif": "TIFF", "tiff16": "TIFF16", "tiffz": "TIFFZ"}
SUFFIX = {"jpg": ".jpg", "png": ".png", "webp": ".webp", "tif": ".tif", "tiff16": ".tif", "tiffz": ".tif"}


@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.1, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_truncated_at_several_offsets(tmp_path, kind, fraction, quiet_stderr):
    data = encode(picture(64, 80), FORMATS[kind])
    cut = max(1, int(len(data) * fraction))
    path = tmp_path / f"cut{SUFFIX[kind]}"
    path.write_bytes(data[:cut])
    outcome = decoded_or_one_line(path)
    if isinstance(outcome, str):
        assert "truncated" in outcome or "corrupt" in outcome, outcome
    else:  # only a cut in the last bytes (trailer / end marker) may still decode
        assert cut >= len(data) - 16, (cut, len(data))
    quiet_stderr()


def test_png_with_a_lying_ihdr(tmp_path, quiet_stderr):
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    def png(w: int, h: int, raw: bytes) -> bytes:
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                + chunk(b"IEND", b""))

    (tmp_path / "big.png").write_bytes(png(3000, 2000, b"\0" * 1000))  # claims more pixels than it holds
    one_line_error(tmp_path / "big.png", "truncated PNG data")
    (tmp_path / "small.png").write_bytes(png(4, 3, b"\0" + b"\x80" * 12 + b"\0" * 10_000))  # holds more
    d = read_image(tmp_path / "small.png")
    assert d.pixels.shape == (3, 4, 3) and d.pixels[0, 0, 0] == 0x80
    (tmp_path / "zero.png").write_bytes(png(0, 4, b""))
    one_line_error(tmp_path / "zero.png", "PNG")
    (tmp_path / "huge.png").write_bytes(png(100_000, 100_000, b"\0" * 100))
    one_line_error(tmp_path / "huge.png", "decompression-bomb guard", "--max-pixels")
    quiet_stderr()


def test_huge_declared_dimensions(tmp_path, quiet_stderr):
    """JPEG SOF, TIFF tags and WebP (VP8L) headers declaring far more pixels than the guard allows."""
    j = bytearray(encode(picture(8, 8), "JPEG"))
    sof = j.find(b"\xff\xc0")
    j[sof + 5:sof + 9] = struct.pack(">HH", 65000, 65000)
    (tmp_path / "huge.jpg").write_bytes(bytes(j))
    t = bytearray(encode(picture(8, 8), "TIFF16"))
    for code in (256, 257):
        e = ifd0_entry(t, code)
        t[e + 8:e + 12] = struct.pack("<HH", 60000, 0) if t[e + 2] == 3 else struct.pack("<I", 60000)
    (tmp_path / "huge.tif").write_bytes(bytes(t))
    w = bytearray(encode(picture(8, 8), "WEBP", lossless=True))
    assert w[12:16] == b"VP8L"
    w[21:25] = struct.pack("<I", 16383 | 16383 << 14)  # 14-bit width-1 and height-1: 16384 x 16384
    (tmp_path / "huge.webp").write_bytes(bytes(w))
    for name in ("huge.jpg", "huge.tif", "huge.webp"):
        one_line_error(tmp_path / name, "decompression-bomb guard")
    quiet_stderr()


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_one_pixel_images(tmp_path, kind):
    px = np.array([[[200, 30, 90]]], np.uint8)
    path = tmp_path / f"one{SUFFIX[kind]}"
    path.write_bytes(encode(px, FORMATS[kind], **({"lossless": True} if kind == "webp" else {})))
    d = read_image(path)
    assert d.pixels.shape == (1, 1, 3)
    expected = px.astype(int) * (257 if d.bit_depth == 16 else 1)
    assert np.abs(d.pixels.astype(int) - expected).max() <= (12 if kind == "jpg" else 0)


def test_16bit_grey_with_alpha_png(tmp_path):
    g = (np.arange(6 * 7, dtype=np.uint16) * 1500).reshape(6, 7)
    la = np.stack([g, np.full_like(g, 777)], -1)
    (tmp_path / "la16.png").write_bytes(imagecodecs.png_encode(la))
    d = read_image(tmp_path / "la16.png")
    assert d.bit_depth == 16 and all(np.array_equal(d.pixels[..., c], g) for c in range(3))
    assert any("alpha channel dropped" in w for w in d.warnings)


@pytest.mark.parametrize("value", [0, 9, 65535])
@pytest.mark.parametrize("kind", ["jpg", "png", "webp", "tif", "tiff16"])
def test_exif_orientation_out_of_range_ignored(tmp_path, kind, value):
    a = picture(6, 10)
    path = tmp_path / f"o{SUFFIX[kind]}"
    if kind.startswith("tif"):
        data = a.astype(np.uint16) * 257 if kind == "tiff16" else a
        tifffile.imwrite(path, data, photometric="rgb", extratags=[(274, "H", 1, value, True)])
    else:
        exif = Image.Exif()
        exif[0x0112] = value
        path.write_bytes(encode(a, FORMATS[kind], exif=exif.tobytes(), **({"quality": 95} if kind == "jpg" else {})))
    d = read_image(path)
    assert d.exif_orientation == 1 and d.pixels.shape == (6, 10, 3)  # not rotated
    assert [w for w in d.warnings if "orientation" in w] == [f"invalid EXIF orientation {value} ignored"]


@pytest.mark.parametrize("kind", ["jpg", "png", "webp", "tif", "tiff16"])
def test_corrupt_icc_profile_ignored_with_note(tmp_path, kind):
    a = picture(8, 8)
    junk = b"definitely not an ICC profile " * 8
    path = tmp_path / f"icc{SUFFIX[kind]}"
    if kind.startswith("tif"):
        data = a.astype(np.uint16) * 257 if kind == "tiff16" else a
        tifffile.imwrite(path, data, photometric="rgb", iccprofile=junk)
    else:
        path.write_bytes(encode(a, FORMATS[kind], icc_profile=junk, **({"lossless": True} if kind == "webp" else {})))
    d = read_image(path)
    assert not d.icc_converted and any("unreadable ICC profile ignored" in w for w in d.warnings)
    if kind != "jpg":
        expected = a.astype(np.uint16) * 257 if kind == "tiff16" else a
        assert np.array_equal(d.pixels, expected)


def test_cmyk_jpeg_without_profile(tmp_path):
    a = picture(16, 16)
    Image.fromarray(a).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    d = read_image(tmp_path / "c.jpg")
    assert np.abs(d.pixels.astype(int) - a).mean() < 4
    assert any("CMYK" in w for w in d.warnings)


@pytest.mark.parametrize("kind", ["jpg", "png", "tif", "webp"])
def test_cut_inside_the_magic_number(tmp_path, kind, quiet_stderr):
    data = encode(picture(), FORMATS[kind])
    for n in (1, 2):
        path = tmp_path / f"m{n}{SUFFIX[kind]}"
        path.write_bytes(data[:n])
        one_line_error(path, "truncated", "header", f"only {n} byte")
    quiet_stderr()


# ---------------------------------------------------------------------------------------------- fuzz

SEEDS = {
    "jpg": encode(picture(8, 8), "JPEG"),
    "png": encode(picture(8, 8), "PNG"),
    "png16": imagecodecs.png_encode(picture(8, 8).astype(np.uint16) * 257),
    "webp": encode(picture(8, 8), "WEBP", lossless=True),
    "tif": encode(picture(8, 8), "TIFF"),
    "tiff16": encode(picture(8, 8), "TIFF16"),
    "tiffz": encode(picture(8, 8), "TIFFZ"),
    "tiff-float": (lambda b: (tifffile.imwrite(b, picture(8, 8).astype(np.float32) / 255, photometric="rgb"),
                              b.getvalue())[1])(io.BytesIO()),
}


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    """A small valid file with a few bytes overwritten, inserted or deleted, mostly in its header."""
    kind = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[kind])
    for _ in range(draw(st.integers(1, 4))):
        hi = min(len(data) - 1, draw(st.sampled_from([64, 256, len(data) - 1])))
        pos = draw(st.integers(0, max(hi, 0)))
        op = draw(st.sampled_from(["set", "set", "insert", "delete", "truncate"]))
        if op == "set" and data:  # earlier deletions may have emptied it
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif len(data) > 1:
            del data[max(pos, 1):]
    return kind, bytes(data)


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutated())
def test_fuzz_mutated_headers(tmp_path, capfd, case):
    kind, data = case
    suffix = {"jpg": ".jpg", "png": ".png", "png16": ".png", "webp": ".webp"}.get(kind, ".tif")
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Python warning may escape the decoder
        try:
            d = read_image(path, max_pixels=4_000_000)
        except ImageError as e:
            msg = str(e)
            assert "\n" not in msg and msg.startswith(f"{path}: "), msg
        else:
            assert d.pixels.ndim == 3 and d.pixels.shape[2] == 3
            assert d.pixels.dtype in (np.uint8, np.uint16)
    err = capfd.readouterr().err
    assert err == "", err



# ---------------------------------------------------------------------------------------------- scan bombs

def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a JPEG (a scan's end includes its entropy-coded data)."""
    out, i = [], 2
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xD9:
            out.append((marker, i, i + 2))
            break
        j = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:
            while not (data[j] == 0xFF and data[j + 1] != 0 and not 0xD0 <= data[j + 1] <= 0xD7):
                j += 1
        out.append((marker, i, j))
        i = j
    return out


def test_progressive_jpeg_with_thousands_of_scans_refused_at_once(tmp_path):
    """A small progressive JPEG whose one AC scan is repeated 5000 times (libjpeg decodes every repeat: one pass
    over every block each; minutes for a large image) is refused from its markers before decoding."""
    import time

    from rawdiff_infer.io.jpeg import MAX_JPEG_SCANS, count_jpeg_scans

    b = io.BytesIO()
    Image.new("RGB", (2048, 2048), (128, 128, 128)).save(b, "JPEG", quality=90, progressive=True)
    data = b.getvalue()
    scans = [(s, e) for m, s, e in _jpeg_segments(data) if m == 0xDA]
    assert count_jpeg_scans(data) == len(scans) == 10
    s, e = min(scans, key=lambda se: se[1] - se[0])  # a tiny AC scan: EOB runs only
    bomb = data[:e] + data[s:e] * 5000 + data[e:]
    assert len(bomb) < 1_000_000 and count_jpeg_scans(bomb) == 5010
    path = tmp_path / "scans.jpg"
    path.write_bytes(bomb)
    t = time.perf_counter()
    one_line_error(path, f"more than {MAX_JPEG_SCANS} scans")
    assert time.perf_counter() - t < 2.0
    ok = tmp_path / "ok.jpg"  # the ordinary progressive file still decodes
    ok.write_bytes(data)
    assert read_image(ok).pixels.shape == (2048, 2048, 3)


def test_scan_count_skips_segments_and_stuffed_bytes():
    """An EXIF thumbnail's SOS inside APP1 is not counted; 0xFF 0x00 and restart markers inside a scan's data are
    not marker boundaries."""
    from rawdiff_infer.io.jpeg import count_jpeg_scans

    thumb = encode(picture(8, 8), "JPEG")
    app1 = b"\xff\xe1" + (len(thumb) + 2).to_bytes(2, "big") + thumb
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x12\xff\x00\x34\xff\xd3\x56"
    data = b"\xff\xd8" + app1 + sos + sos + b"\xff\xd9" + sos
    assert count_jpeg_scans(data) == 2
    assert count_jpeg_scans(data, stop_above=0) == 1
    assert count_jpeg_scans(b"not a jpeg") == 0 and count_jpeg_scans(b"\xff\xd8\xff\xda\x00") == 0
