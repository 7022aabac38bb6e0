"""Prepare a compact, multi-scale copy of training photos: what a GPU machine without ``../shared`` trains on.

    python -m rawdiff_train.prepare --photos ../shared/data/train-photos --out .data/train-photos \\
        --sizes 2560,1280,640,320 --quality 95

Every photo that is not held out (``heldout.split_held_out``: by name and by content) is written at each size that
is smaller than the photo itself (its long side in pixels, Lanczos), plus the largest size that fits when none
does, as ``<stem>.s<size>.jpg``: one photo at several scales gives the network highlights, edges and textures at
several sizes for the price of one licence. The held-out rule also holds for the copies: ``heldout.is_held_out``
treats ``<held-out stem>.<anything>`` as held out. ``manifest.json`` names every source photo with its sha256 and
the copies made of it (a model trained on the folder names them in its provenance), and the total size is checked
against ``--budget-mb`` (the device machine's carry limit) before anything is written.

``--heldout-out DIR`` also writes the held-out photos found, each once at ``--heldout-size`` (long side, never
upscaled) under its own stem (``mate_Aqua.jpg``): still held out by name, they are the held-out curve and the
sampler table of a GPU session (``rawdiff_bench.gpu_session``), and never train.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import click
from PIL import Image, ImageOps

from rawdiff_infer.fsio import sha256_file, write_bytes
from rawdiff_infer.messages import first_line, show_path

from .data import list_photos
from .heldout import split_held_out

__all__ = ["Copy", "heldout_copies", "plan_sizes", "prepare", "main"]

PROG = "rawdiff-prepare"


@dataclass(frozen=True)
class Copy:
    """One scaled copy: its file name, the source photo, and its size in pixels and bytes."""

    name: str
    source: str
    width: int
    height: int
    data: bytes


def plan_sizes(width: int, height: int, sizes: Sequence[int]) -> list[int]:
    """The long sides (pixels) to write for a ``width`` x ``height`` photo: each of ``sizes`` below its own long
    side; the photo's own long side when none is (so every photo is used at least once, never upscaled)."""
    long_side = max(width, height)
    keep = sorted({s for s in sizes if s < long_side}, reverse=True)
    return keep or [long_side]


def _scaled(img: Image.Image, long_side: int, quality: int) -> tuple[bytes, int, int]:
    w, h = img.size
    f = long_side / max(w, h)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    out = img if size == (w, h) else img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality, subsampling=0)  # 4:4:4: no chroma loss added to the scene
    return buf.getvalue(), size[0], size[1]


def heldout_copies(folders: Sequence[str | Path], size: int, *, quality: int = 95) -> list[Copy]:
    """One copy of every held-out photo of ``folders`` at long side ``size`` (or its own, if smaller), named by its
    own stem (so ``heldout.is_held_out`` still says so)."""
    _, held = split_held_out(list_photos(list(folders)))
    out = []
    for f in held:
        with Image.open(f) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
        data, w, h = _scaled(img, min(size, max(img.size)), quality)
        out.append(Copy(f"{f.stem}.jpg", f.name, w, h, data))
    return out


def prepare(folders: Sequence[str | Path], sizes: Sequence[int], *, quality: int = 95
            ) -> tuple[list[Copy], dict]:
    """The copies of every training photo of ``folders`` and the manifest (nothing written).

    Raises ValueError (one line) for a folder without training photos, OSError / PIL errors for unreadable ones.
    """
    files, held = split_held_out(list_photos(list(folders)))
    if not files:
        raise ValueError(f"{', '.join(show_path(f) for f in folders)}: no training photos "
                         f"({len(held)} held out)")
    copies: list[Copy] = []
    sources = []
    for f in files:
        with Image.open(f) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
        names = []
        for s in plan_sizes(*img.size, sizes):
            data, w, h = _scaled(img, s, quality)
            copies.append(Copy(f"{f.stem}.s{s}.jpg", f.name, w, h, data))
            names.append(copies[-1].name)
        sources.append({"file": f.name, "sha256": sha256_file(f), "size": list(img.size), "copies": names})
    manifest = {"sources": sources, "held_out_skipped": [f.name for f in held], "sizes": list(sizes),
                "quality": quality, "megapixels": round(sum(c.width * c.height for c in copies) / 1e6, 2),
                "bytes": sum(len(c.data) for c in copies)}
    return copies, manifest


@click.command(PROG, help=__doc__.split("\n\n")[0])
@click.option("--photos", "folders", multiple=True, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (created).")
@click.option("--sizes", default="2560,1280,640,320", show_default=True, help="Long sides in pixels, comma-separated.")
@click.option("--quality", type=click.IntRange(50, 100), default=95, show_default=True, help="JPEG quality.")
@click.option("--budget-mb", type=click.FloatRange(0.1), default=36.0, show_default=True,
              help="Refuse to write more than this (MiB).")
@click.option("--heldout-out", type=click.Path(file_okay=False),
              help="Also write the held-out photos found here, once each (evaluation only).")
@click.option("--heldout-size", type=click.IntRange(64), default=1024, show_default=True,
              help="Long side of the held-out copies (pixels).")
@click.option("--force", is_flag=True, help="Replace copies and manifest already in --out.")
def cli(folders: tuple[str, ...], out: str, sizes: str, quality: int, budget_mb: float, heldout_out: str | None,
        heldout_size: int, force: bool) -> None:
    try:
        long_sides = [int(s) for s in sizes.split(",") if s.strip()]
        if not long_sides or min(long_sides) < 64:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{sizes!r}: give long sides of at least 64 px, e.g. 1536,768,384",
                                 param_hint="--sizes") from None
    try:
        copies, manifest = prepare(folders, long_sides, quality=quality)
        held = heldout_copies(folders, heldout_size, quality=quality) if heldout_out else []
    except (OSError, ValueError) as e:
        click.echo(f"{PROG}: error: {first_line(e)}", err=True)
        sys.exit(1)
    mb = (manifest["bytes"] + sum(len(c.data) for c in held)) / 2**20
    if mb > budget_mb:
        click.echo(f"{PROG}: error: the copies take {mb:.1f} MiB, over --budget-mb {budget_mb:g}: use smaller "
                   "--sizes or a lower --quality", err=True)
        sys.exit(2)
    dest = Path(out)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for c in copies:
            write_bytes(dest / c.name, c.data, overwrite=force)
        write_bytes(dest / "manifest.json", json.dumps(manifest, indent=1).encode(), overwrite=force)
        if heldout_out:
            Path(heldout_out).mkdir(parents=True, exist_ok=True)
            for c in held:
                write_bytes(Path(heldout_out) / c.name, c.data, overwrite=force)
    except (OSError, FileExistsError) as e:
        click.echo(f"{PROG}: error: {first_line(e)}", err=True)
        sys.exit(1)
    click.echo(f"{len(copies)} copies of {len(manifest['sources'])} photos, {manifest['megapixels']} MP, "
               f"{mb:.1f} MiB -> {show_path(dest)} ({len(manifest['held_out_skipped'])} held-out photos skipped)")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name=PROG)


if __name__ == "__main__":
    main()
