"""Which consistency band serves JPEG inputs: PSNR by JPEG quality and band half-width, on held-out photos.

    python -m rawdiff_bench.band_study --photos HELDOUT_DIR --crop 128 --json out.json

Every photo of the folder goes through the model's synthetic camera once (``PhotoPairSource`` with ``jpeg=False``:
the ISP draw, over-exposure included, is kept; the camera's own JPEG step is not). Its centre crop's 8-bit sRGB is
then JPEG-encoded with Pillow at each ``--quality`` (chroma subsampling 4:2:0) and decoded with
``rawdiff_infer.io.read_image`` (which estimates the quality from the tables). Each decoded crop is reconstructed
with the bundled model (default sampler, overlap grid) for every ``--band`` W (``ConsistencyConfig(band=W)``, the
half-width of the band in 8-bit levels), without consistency ("off"), and by the ISP's closed-form inverse
(``meta.isp.closed_form``). With ``--skip`` (the library's default) the model is not run on patches without a
clipped or inconsistent pixel: those take the closed form, so the band acts only in patches that hold clipped
pixels; ``--no-skip`` runs it on every patch (the model may then move determined pixels within the band). PSNR
(dB) is measured on the encoded RAW against the camera's RAW, per image, over:

- all pixels;
- determined pixels: no channel of the decoded 8-bit input at or above 250 (``metrics.region_masks``);
- clipped pixels: some channel at or above it (images without such pixels are left out of that mean).

The tables give the mean over images of the per-image PSNR. Case i (the i-th photo) starts from the noise of seed
``1000 * seed + i`` in every configuration, so configurations differ by their band alone.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from rawdiff_infer.console import OneLineCommand

__all__ = ["Crop", "closed_form", "jpeg_roundtrip_file", "main", "markdown_table", "rendered_crops", "summarise"]

DEFAULT_QUALITIES = (50, 75, 90, 98)
DEFAULT_BANDS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)


@dataclass(frozen=True)
class Crop:
    """One held-out photo's centre crop.

    Attributes:
        name: the photo's file stem.
        srgb: H x W x 3 uint8, the camera's 8-bit sRGB render (before any JPEG).
        target: H x W x 3 float32 in [0, 1], the camera's RAW, gamma-encoded (the model's encoding).
    """

    name: str
    srgb: np.ndarray
    target: np.ndarray


def rendered_crops(folder: str | os.PathLike[str], meta: Any, crop: int, seed: int = 10_000) -> list[Crop]:
    """The photos of ``folder`` through ``meta``'s synthetic camera without its JPEG step (one fixed draw per photo,
    ``PhotoPairSource(seed=seed)``), centre crops of ``crop`` x ``crop`` pixels."""
    from rawdiff_train.data import PHOTO_EXTENSIONS, PhotoPairSource, list_files

    from .evaluate import crop_cases

    files = list_files(folder, PHOTO_EXTENSIONS)
    if not files:
        raise click.UsageError(f"{folder}: no photos")
    src = PhotoPairSource(files, camera=meta.camera, seed=seed, jpeg=False)
    out = []
    for i, f in enumerate(files):
        pair = src[i]
        srgb = np.round(np.clip(pair.srgb, 0, 1) * 255).astype(np.uint8)
        target = meta.encoding.encode(pair.raw.astype(np.float32))
        case = crop_cases(f.stem, srgb, target, crop)[0]  # the centre crop
        out.append(Crop(f.stem, case.srgb.copy(), case.target.copy()))
    return out


def jpeg_roundtrip_file(srgb: np.ndarray, quality: int, folder: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Encode uint8 H x W x 3 ``srgb`` as a JPEG (Pillow, ``quality`` 1..100, 4:2:0) in ``folder`` and decode it
    with ``read_image``; returns (decoded uint8 H x W x 3, the decoder's quality estimate)."""
    from PIL import Image

    from rawdiff_infer.io import read_image

    buf = io.BytesIO()
    Image.fromarray(srgb).save(buf, "JPEG", quality=int(quality), subsampling=2)
    path = Path(folder) / f"q{quality}.jpg"
    path.write_bytes(buf.getvalue())
    img = read_image(path)
    path.unlink()
    if img.jpeg_quality is None:
        raise RuntimeError(f"{path}: the decoder gave no JPEG quality")
    return img.pixels, img.jpeg_quality


def _row(q: int, est: int, config: str, crop: Crop, srgb: np.ndarray, pred: np.ndarray,
         seconds: float) -> dict[str, Any]:
    """One report row: PSNR (dB) of encoded RAW ``pred`` over each region of the decoded input ``srgb``."""
    from rawdiff_infer.metrics import psnr_regions, region_masks

    return {"quality": q, "estimated_quality": est, "config": config, "image": crop.name, "seconds": seconds,
            "clipped_pixels": int(region_masks(srgb)["clipped"].sum()), **psnr_regions(pred, crop.target, srgb)}


def closed_form(meta: Any, srgb: np.ndarray) -> np.ndarray:
    """The ISP's exact inverse of uint8 H x W x 3 ``srgb``, gamma-encoded: H x W x 3 float32 in [0, 1]."""
    import torch

    x = torch.from_numpy(srgb.astype(np.float32) / 255.0).permute(2, 0, 1)
    raw = meta.isp.closed_form(x).permute(1, 2, 0).numpy()
    return np.asarray(meta.encoding.encode(raw), dtype=np.float32)


def _reconstructors(be: Any, bands: Sequence[float], batch_size: int, off: bool = True,
                    skip: bool = True) -> dict[str, Any]:
    """Config label -> RawReconstructor ("off" when ``off``, and "band W" for each W, skipping the model on patches
    without a clipped or inconsistent pixel when ``skip``)."""
    from rawdiff_infer.consistency import ConsistencyConfig
    from rawdiff_infer.pipeline import RawReconstructor
    from rawdiff_infer.tiling import TileConfig

    tiles = TileConfig(patch_size=64, stride=48, batch_size=batch_size)
    recs = {"off": RawReconstructor(be, tiles=tiles, consistency=ConsistencyConfig(mode="off"))} if off else {}
    for w in bands:
        cfg = ConsistencyConfig(mode="on", band=w, skip=skip)
        recs[f"band {w:g}"] = RawReconstructor(be, tiles=tiles, consistency=cfg)
    return recs


def _run_quality(q: int, crops: Sequence[Crop], be: Any, recs: dict[str, Any], seed: int, tmp: str,
                 echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every row of one JPEG quality: closed form and each reconstructor, each crop."""
    decoded = [jpeg_roundtrip_file(c.srgb, q, tmp) for c in crops]
    inputs = [d for d, _ in decoded]
    seeds = [1000 * seed + i for i in range(len(crops))]
    rows = [_row(q, est, "closed form", c, x, closed_form(be.meta, x), 0.0) for c, (x, est) in zip(crops, decoded)]
    for label, rec in recs.items():
        t0 = time.perf_counter()
        outs = rec.reconstruct_many(inputs, seeds=seeds)
        dt = time.perf_counter() - t0
        rows += [_row(q, est, label, c, x, o.encoded, dt / len(crops))
                 for c, (x, est), o in zip(crops, decoded, outs)]
        echo(f"quality {q}, {label}: {dt:.1f} s")
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (quality, config): the mean over images of each region's PSNR (None where no image has the region) and
    how many images that mean is over."""
    from rawdiff_infer.metrics import REGIONS

    keys = list(dict.fromkeys((r["quality"], r["config"]) for r in rows))
    out = []
    for q, cfg in keys:
        sel = [r for r in rows if r["quality"] == q and r["config"] == cfg]
        s: dict[str, Any] = {"quality": q, "config": cfg}
        for region in REGIONS:
            vals = [r[region] for r in sel if r[region] is not None]
            s[region] = statistics.fmean(vals) if vals else None
            s[f"{region}_images"] = len(vals)
        s["seconds_per_image"] = statistics.fmean(r["seconds"] for r in sel)
        out.append(s)
    return out


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a markdown table: one row per (quality, config); determined-pixel PSNR also as the
    difference to the closed form's."""
    cf = {s["quality"]: s for s in summary if s["config"] == "closed form"}

    def f(v: float | None) -> str:
        return "-" if v is None or not math.isfinite(v) else f"{v:.2f}"

    lines = ["| JPEG quality | config | all (dB) | determined (dB) | determined - closed form | clipped (dB) "
             "| s/image |", "|---:|---|---:|---:|---:|---:|---:|"]
    for s in summary:
        ref = cf.get(s["quality"], {}).get("determined")
        d = None if ref is None or s["determined"] is None else s["determined"] - ref
        lines.append(f"| {s['quality']} | {s['config']} | {f(s['all'])} | {f(s['determined'])} | "
                     f"{'-' if d is None else f'{d:+.2f}'} | {f(s['clipped'])} | {s['seconds_per_image']:.1f} |")
    return "\n".join(lines)


@click.command("band-study", cls=OneLineCommand, help=__doc__)
@click.option("--photos", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--crop", type=click.IntRange(64), default=128, show_default=True, help="Centre crop, pixels.")
@click.option("--quality", "qualities", multiple=True, type=click.IntRange(1, 100),
              help="JPEG quality; repeat (default 50 75 90 98).")
@click.option("--band", "bands", multiple=True, type=click.FloatRange(0.0, 64.0),
              help="Band half-width in 8-bit levels; repeat (default 0.5 1 2 3 4 6 8).")
@click.option("--off/--no-off", default=True, show_default=True, help="Also reconstruct without consistency.")
@click.option("--skip/--no-skip", default=True, show_default=True,
              help="Skip the model on patches whose every pixel is determined (ConsistencyConfig.skip).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Case i uses 1000 seed + i.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True, help="Patches per model call.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True, help="torch CPU threads.")
@click.option("--max-photos", type=click.IntRange(1), help="Only the first N photos (timing runs).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every row and the summary here.")
@click.option("--force", is_flag=True, help="Replace an existing --json file.")
def main(photos: str, crop: int, qualities: tuple[int, ...], bands: tuple[float, ...], off: bool, skip: bool,
         seed: int, batch_size: int, threads: int, max_photos: int | None, json_path: str | None, force: bool) -> None:
    import torch

    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_infer.checkpoint import load_checkpoint

    from .evaluate import check_report_paths

    check_report_paths(json_path, force=force)
    torch.set_num_threads(threads)
    weights = Path(__file__).resolve().parents[1] / "rawdiff_infer" / "weights"
    model, meta = load_checkpoint(weights)
    if meta.isp is None:
        raise click.UsageError("the model describes no ISP: no band to study")
    be = TorchBackend(model, meta, device="cpu")
    crops = rendered_crops(photos, meta, crop)[:max_photos]
    recs = _reconstructors(be, bands or DEFAULT_BANDS, batch_size, off, skip)
    if not recs:
        raise click.UsageError("nothing to reconstruct: give a --band or leave --off on")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="band-study-") as tmp:
        for q in qualities or DEFAULT_QUALITIES:
            rows += _run_quality(q, crops, be, recs, seed, tmp, lambda s: click.echo(s, err=True))
    summary = summarise(rows)
    click.echo(markdown_table(summary))
    report = {"photos": [c.name for c in crops], "crop": crop, "seed": seed, "batch_size": batch_size,
              "threads": threads, "skip": skip, "sampler": next(iter(recs.values())).sampler.label(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
              "seconds": time.perf_counter() - t0, "summary": summary, "rows": rows}
    if json_path:
        from rawdiff_infer.fsio import write_bytes

        write_bytes(json_path, json.dumps(report, indent=1).encode(), overwrite=force)


if __name__ == "__main__":
    main()
