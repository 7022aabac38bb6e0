"""Shifted-grid against overlap-grid step fusion: PSNR, seams and patches per image, on held-out photos.

    python -m rawdiff_bench.grid_study --photos HELDOUT_DIR --crop 256 --seed 0 --seed 1 --json out.json

For every photo (its centre crop), every grid configuration and every seed, the default sampler reconstructs the
RAW; the report gives the PSNR on the encoded RAW, the patches per model evaluation (for the crop, and for the
whole photo), and a seam metric measured on the output:

    seam ratio = mean squared difference between neighbouring pixels *across* the grid's patch borders
                 / the same across every other pixel boundary

computed on the encoded RAW, along both axes, at the borders of the grid the last model evaluation used (where a
seam would survive into the output), and the same ratio on the target RAW at the same lines (what the content
alone gives). A seamless output has the target's ratio (about 1); a visible seam raises it.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from rawdiff_infer.console import OneLineCommand

__all__ = ["grid_lines", "seam_ratio"]


def grid_lines(length: int, patch: int, *, stride: int | None = None, offset: int | None = None) -> np.ndarray:
    """Pixel boundaries (index b: between pixels b-1 and b, 0 < b < length) where patches start or end: the overlap
    grid (``stride``) or the shifted grid moved by ``offset``."""
    from rawdiff_infer.tiling import grid_starts

    if offset is not None:
        lines = np.arange(patch - offset, length, patch)
    else:
        starts = grid_starts(max(length, patch), patch, stride or patch)
        lines = np.concatenate([starts, starts + patch])
    lines = np.unique(lines)
    return lines[(lines > 0) & (lines < length)]


def seam_ratio(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    """Mean squared neighbour difference across the given row / column boundaries over that across all others
    (both axes pooled); ``img`` H x W x C."""
    dy = np.square(np.diff(img.astype(np.float64), axis=0)).mean(axis=(1, 2))  # boundary b is between b-1, b
    dx = np.square(np.diff(img.astype(np.float64), axis=1)).mean(axis=(0, 2))
    on_y = np.zeros(len(dy), bool)
    on_y[rows - 1] = True
    on_x = np.zeros(len(dx), bool)
    on_x[cols - 1] = True
    on = np.concatenate([dy[on_y], dx[on_x]])
    off = np.concatenate([dy[~on_y], dx[~on_x]])
    return float(on.mean() / max(off.mean(), 1e-20))


def _configs(stride: int) -> dict[str, dict[str, Any]]:
    return {f"overlap stride {stride} (hann)": {"grid": "overlap", "stride": stride},
            "shifted": {"grid": "shifted", "stride": 64},
            "shifted, last evaluation on the overlap grid": {"grid": "shifted", "stride": stride, "overlap_last": 1}}


def _lines_of_last_evaluation(cfg: dict[str, Any], h: int, w: int, steps: int, patch: int) -> tuple[Any, Any]:
    from rawdiff_infer.tiling import grid_offset

    if cfg["grid"] == "overlap" or cfg.get("overlap_last"):
        return grid_lines(h, patch, stride=cfg["stride"]), grid_lines(w, patch, stride=cfg["stride"])
    oy, ox = grid_offset(steps - 1, patch, 0)
    return grid_lines(h, patch, offset=oy), grid_lines(w, patch, offset=ox)


@click.command("grid-study", cls=OneLineCommand, help=__doc__)
@click.option("--photos", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--crop", type=click.IntRange(64), default=256, show_default=True)
@click.option("--seed", "seeds", multiple=True, type=click.IntRange(0), help="Repeat (default 0).")
@click.option("--sampler", "spec", default="", help="METHOD[:STEPS] (default: the default sampler).")
@click.option("--stride", type=click.IntRange(1, 64), default=48, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing --json file.")
def main(photos: str, crop: int, seeds: tuple[int, ...], spec: str, stride: int, json_path: str | None,
         force: bool) -> None:
    from rawdiff_infer.backends import default_checkpoint
    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_infer.metrics import psnr
    from rawdiff_infer.pipeline import RawReconstructor, SamplerConfig
    from rawdiff_infer.tiling import TileConfig

    from .evaluate import check_report_paths, crop_cases, photo_cases

    check_report_paths(json_path, force=force)
    be = TorchBackend.from_checkpoint(default_checkpoint())
    sampler = SamplerConfig.from_spec(spec) if spec else SamplerConfig()
    full = photo_cases(photos, be.meta.camera)  # rendered once: the crops are cut from these
    cases = [c for f in full for c in crop_cases(f.name, f.srgb, f.target, crop)]
    rows = []
    for name, cfg in _configs(stride).items():
        tiles = TileConfig(batch_size=64, **cfg)
        rec = RawReconstructor(be, sampler=sampler, tiles=tiles)
        for seed in seeds or (0,):
            t0 = time.perf_counter()
            outs = rec.reconstruct_many([c.srgb for c in cases], seeds=[seed] * len(cases))
            for c, o, f in zip(cases, outs, full):
                h, w = c.target.shape[:2]
                ly, lx = _lines_of_last_evaluation(cfg, h, w, sampler.num_steps, 64)
                rows.append({"config": name, "image": c.name, "seed": seed, "psnr": psnr(o.encoded, c.target),
                             "seam_out": seam_ratio(o.encoded, ly, lx), "seam_target": seam_ratio(c.target, ly, lx),
                             "patches_crop": o.patches, "patches_full": rec.patches_for(*f.target.shape[:2]),
                             "full_size": f"{f.target.shape[1]}x{f.target.shape[0]}"})
            click.echo(f"{name}, seed {seed}: {time.perf_counter() - t0:.0f} s", err=True)
    summary = []
    for name in _configs(stride):
        sel = [r for r in rows if r["config"] == name]
        summary.append({"config": name, "psnr": statistics.fmean(r["psnr"] for r in sel),
                        "seam_out": statistics.fmean(r["seam_out"] for r in sel),
                        "seam_target": statistics.fmean(r["seam_target"] for r in sel),
                        "patches_per_photo": statistics.fmean(r["patches_full"] for r in sel)})
        s = summary[-1]
        click.echo(f"{name:48s} PSNR {s['psnr']:6.2f} dB  seam ratio {s['seam_out']:.3f} (target {s['seam_target']:.3f})"
                   f"  patches per photo {s['patches_per_photo']:.0f}")
    if json_path:
        from rawdiff_infer.fsio import write_bytes

        write_bytes(json_path, json.dumps({"sampler": sampler.label(), "crop": crop, "summary": summary,
                                           "rows": rows}, indent=1).encode(), overwrite=force)


if __name__ == "__main__":
    main()
