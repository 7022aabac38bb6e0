"""rawdiff-eval: RAW quality of a model and its samplers on your own held-out data.

Two kinds of data, from any folder (file names do not matter):

- ``--photos DIR``: sRGB photos rendered through the model's synthetic camera (``rawdiff_train.SyntheticCamera``
  with the camera the model describes), each with a fixed seed, so the RAW target is known exactly;
- ``--raw DIR``: real camera RAW files, turned into (sRGB, RAW) pairs by the InvISP protocol
  (``rawdiff_train.fivek``; LibRaw renders the sRGB).

For every ``--sampler METHOD[:STEPS][:options]`` and every ``--seed``, each image (or its ``--crop`` crops) is
reconstructed and compared with its RAW target: PSNR on the encoded RAW (prediction clamped to [0, 1], peak 1,
InvISP's definition), the brightness ratio (mean of the prediction over mean of the target; 1 is right), and the
seconds per image. The table gives per sampler the mean PSNR over images and seeds, the spread of the per-seed
means (max - min), the evaluations per image and the time; ``--json`` keeps every row, ``--plot`` draws PSNR
against model evaluations. The first row is the identity-like baseline: the sRGB curve inverted, nothing learnt.

    rawdiff-eval --photos heldout/ --crop 128 --crops-per-side 2 --seed 0 --seed 1 \\
        --sampler dpm-sde:10 --sampler dpm-sde:20 --sampler dpm:20 --json eval.json --plot eval.png
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from rawdiff_infer.console import OneLineCommand

__all__ = ["EvalCase", "EvalRow", "check_report_paths", "crop_cases", "evaluate", "main", "photo_cases", "raw_cases",
           "summarise"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalCase:
    """One evaluation image: sRGB input (uint8 H x W x 3) and its encoded RAW target (float32 H x W x 3 in [0, 1])."""

    name: str
    srgb: np.ndarray
    target: np.ndarray


@dataclass
class EvalRow:
    """One reconstruction: a sampler spec on one image with one seed."""

    spec: str
    method: str
    evaluations: int
    image: str
    seed: int
    psnr: float
    brightness: float
    seconds: float


def _crops(a: np.ndarray, crop: int | None, per_side: int = 1) -> list[np.ndarray]:
    """The whole image (no ``crop``), or ``per_side`` x ``per_side`` crops of crop x crop pixels spread evenly
    over it (one: the centre crop)."""
    if not crop:
        return [a]
    h, w = a.shape[:2]
    out = []
    for i in range(per_side):
        for j in range(per_side):
            top = max(0, round((h - crop) * (i + 0.5) / per_side))
            left = max(0, round((w - crop) * (j + 0.5) / per_side))
            out.append(a[top:top + crop, left:left + crop])
    return out


def crop_cases(name: str, srgb: np.ndarray, target: np.ndarray, crop: int | None,
               per_side: int = 1) -> list[EvalCase]:
    """The cases of one (sRGB, target) pair: the whole pair (no ``crop``), or its ``per_side`` x ``per_side``
    crops, named ``name#k``."""
    xs, ys = _crops(srgb, crop, per_side), _crops(target, crop, per_side)
    if len(xs) == 1:
        return [EvalCase(name, xs[0], ys[0])]
    return [EvalCase(f"{name}#{k}", x, y) for k, (x, y) in enumerate(zip(xs, ys))]


def photo_cases(folder: str | Path, camera: Any, *, crop: int | None = None, per_side: int = 1,
                seed: int = 10_000) -> list[EvalCase]:
    """Photos of ``folder`` rendered by the synthetic camera of ``camera`` (the model's), one fixed draw each; whole,
    or ``per_side`` x ``per_side`` crops of each."""
    from rawdiff_infer.rawspace import RawEncoding
    from rawdiff_train.data import PHOTO_EXTENSIONS, PhotoPairSource, list_files

    files = list_files(folder, PHOTO_EXTENSIONS)
    if not files:
        raise click.UsageError(f"{folder}: no photos")
    src = PhotoPairSource(files, camera=camera, seed=seed)
    enc = RawEncoding()
    cases = []
    for i, f in enumerate(files):
        pair = src[i]
        srgb = np.round(np.clip(pair.srgb, 0, 1) * 255).astype(np.uint8)
        cases += crop_cases(f.stem, srgb, enc.encode(pair.raw.astype(np.float32)), crop, per_side)
    return cases


def raw_cases(folder: str | Path, *, crop: int | None = None, per_side: int = 1) -> list[EvalCase]:
    """Real RAW files of ``folder`` through the InvISP protocol (camera white balance, JPEG quality 90)."""
    from rawdiff_infer.rawspace import RawEncoding
    from rawdiff_train.data import RawPairSource

    src = RawPairSource(folder)
    if not len(src):
        raise click.UsageError(f"{folder}: no RAW files")
    enc = RawEncoding()
    cases = []
    for i in range(len(src)):
        pair = src[i]
        srgb = np.round(np.clip(pair.srgb, 0, 1) * 255).astype(np.uint8)
        cases += crop_cases(pair.name, srgb, enc.encode(pair.raw), crop, per_side)
    return cases


def baseline_rows(cases: Sequence[EvalCase]) -> list[EvalRow]:
    """The identity-like baseline: the inverse sRGB curve, then the RAW encoding (no colour, gain or tone)."""
    import torch

    from rawdiff_infer.metrics import psnr
    from rawdiff_infer.rawspace import RawEncoding
    from rawdiff_train.camera_isp import srgb_to_linear

    enc = RawEncoding()
    rows = []
    for c in cases:
        pred = enc.encode(srgb_to_linear(torch.from_numpy(c.srgb / 255.0).float()).numpy())
        rows.append(EvalRow("baseline", "inverse sRGB curve", 0, c.name, 0, psnr(pred, c.target),
                            float(pred.mean() / max(c.target.mean(), 1e-6)), 0.0))
    return rows


def evaluate(backend: Any, cases: Sequence[EvalCase], specs: Sequence[str], seeds: Sequence[int], *,
             tiles: Any, pack: bool = True, echo: Callable[[str], None] = lambda s: None) -> list[EvalRow]:
    """Reconstruct every case with every spec and seed; one row each (PSNR, brightness ratio, seconds).

    ``pack``: reconstruct all cases of one (spec, seed) together (their patches share backend calls; the seconds
    per image are then the pack's time divided by the number of images). Case i of seed s starts from the noise
    of seed ``1000 s + i``, so that no two cases share their starting noise."""
    from rawdiff_infer.metrics import psnr
    from rawdiff_infer.pipeline import RawReconstructor, SamplerConfig

    rows: list[EvalRow] = []
    for spec in specs:
        cfg = SamplerConfig.from_spec(spec)
        rec = RawReconstructor(backend, sampler=cfg, tiles=tiles)
        for seed in seeds:
            case_seeds = [1000 * seed + i for i in range(len(cases))]
            t0 = time.perf_counter()
            if pack:
                outs = rec.reconstruct_many([c.srgb for c in cases], seeds=case_seeds)
                per = [(time.perf_counter() - t0) / len(cases)] * len(cases)
            else:
                outs, per = [], []
                for c, case_seed in zip(cases, case_seeds):
                    t1 = time.perf_counter()
                    outs.append(rec.reconstruct(c.srgb, seed=case_seed))
                    per.append(time.perf_counter() - t1)
            for c, o, s in zip(cases, outs, per):
                rows.append(EvalRow(spec, cfg.method, cfg.num_steps, c.name, seed, psnr(o.encoded, c.target),
                                    float(o.encoded.mean() / max(c.target.mean(), 1e-6)), s))
            mean = statistics.fmean(r.psnr for r in rows[-len(cases):])
            echo(f"{spec} seed {seed}: {mean:.2f} dB ({time.perf_counter() - t0:.1f} s)")
    return rows


def summarise(rows: Sequence[EvalRow]) -> list[dict[str, Any]]:
    """Per spec: mean PSNR over images and seeds, spread of the per-seed means, brightness and time."""
    out = []
    for spec in dict.fromkeys(r.spec for r in rows):
        sel = [r for r in rows if r.spec == spec]
        seeds = sorted({r.seed for r in sel})
        per_seed = [statistics.fmean(r.psnr for r in sel if r.seed == s) for s in seeds]
        br = [r.brightness for r in sel]
        out.append({"spec": spec, "method": sel[0].method, "evaluations": sel[0].evaluations,
                    "psnr": statistics.fmean(r.psnr for r in sel), "seed_spread": max(per_seed) - min(per_seed),
                    "brightness_mean": statistics.fmean(br), "brightness_min": min(br), "brightness_max": max(br),
                    "seconds_per_image": statistics.fmean(r.seconds for r in sel), "images": len(sel) // len(seeds),
                    "seeds": len(seeds)})
    return out


def table(summary: Sequence[dict[str, Any]]) -> str:
    head = f"{'sampler':34s} {'evals':>5s} {'PSNR dB':>8s} {'seed spread':>11s} {'brightness (min-max)':>22s} " \
           f"{'s/image':>8s}"
    lines = [head, "-" * len(head)]
    for s in summary:
        lines.append(f"{s['spec']:34s} {s['evaluations']:5d} {s['psnr']:8.2f} {s['seed_spread']:11.2f} "
                     f"{s['brightness_mean']:8.3f} ({s['brightness_min']:.2f}-{s['brightness_max']:.2f}) "
                     f"{s['seconds_per_image']:8.2f}")
    return "\n".join(lines)


def plot(summary: Sequence[dict[str, Any]], path: str | Path, title: str = "", *, overwrite: bool = False) -> None:
    """PSNR against model evaluations, one line per method (and options), the baseline as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[dict[str, Any]]] = {}
    for s in summary:
        if s["spec"] == "baseline":
            ax.axhline(s["psnr"], color="grey", linestyle="--", label="inverse sRGB curve (baseline)")
            continue
        parts = s["spec"].split(":")
        fam = parts[0] + (f" ({parts[2]})" if len(parts) > 2 else "")
        families.setdefault(fam, []).append(s)
    for fam, items in families.items():
        items.sort(key=lambda s: s["evaluations"])
        ax.plot([s["evaluations"] for s in items], [s["psnr"] for s in items], "o-", label=fam)
    ax.set_xscale("log")
    ax.set_xlabel("model evaluations per image")
    ax.set_ylabel("PSNR on encoded RAW (dB)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    from rawdiff_infer.fsio import atomic_write

    with atomic_write(path, overwrite=overwrite) as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


def check_report_paths(*paths: str | None, force: bool) -> None:
    """Report and plot targets (``--json``, ``--plot``; None: not asked for), checked before any compute: see
    ``plan.check_output_file``; click.UsageError (one line) otherwise."""
    from rawdiff_infer.plan import UsageError, check_output_file

    try:
        for p in paths:
            if p:
                check_output_file(p, force=force)
    except UsageError as e:
        raise click.UsageError(str(e)) from None


@click.command("rawdiff-eval", cls=OneLineCommand, help=__doc__,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--photos", type=click.Path(exists=True, file_okay=False), help="Folder of sRGB photos (synthetic "
              "camera of the model).")
@click.option("--raw", "raw_dir", type=click.Path(exists=True, file_okay=False), help="Folder of camera RAW files "
              "(InvISP protocol).")
@click.option("--ckpt", help="Model (default: the bundled one).")
@click.option("--sampler", "specs", multiple=True, required=True, metavar="METHOD[:STEPS][:k=v,...]",
              help="Sampler to evaluate; repeat. Options: eta, order, spacing, clip_x0.")
@click.option("--seed", "seeds", multiple=True, type=click.IntRange(0, 2**64 - 1), help="Repeat (default 0).")
@click.option("--crop", type=click.IntRange(8), help="Crops of N x N pixels instead of the whole image.")
@click.option("--crops-per-side", "per_side", type=click.IntRange(1, 8), default=1, show_default=True,
              help="With --crop: K x K crops spread over each image (1: the centre crop).")
@click.option("--stride", type=click.IntRange(1), default=48, show_default=True)
@click.option("--grid", type=click.Choice(["overlap", "shifted"]), default="overlap", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), help="Patches per model call (default 64 on CPU, 512 on CUDA).")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every row and the summary here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="PSNR against evaluations (PNG).")
@click.option("--force", is_flag=True, help="Replace existing --json / --plot files.")
def cli(photos, raw_dir, ckpt, specs, seeds, crop, per_side, stride, grid, batch_size, device, dtype, json_path,
        plot_path, force) -> None:
    import torch

    from rawdiff_infer.backends import default_checkpoint
    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_infer.pipeline import SamplerConfig
    from rawdiff_infer.tiling import TileConfig

    if bool(photos) == bool(raw_dir):
        raise click.UsageError("give one of --photos and --raw")
    for spec in specs:
        try:
            SamplerConfig.from_spec(spec)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    check_report_paths(json_path, plot_path, force=force)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = dtype if dtype != "auto" else ("fp16" if device.startswith("cuda") else "fp32")
    be = TorchBackend.from_checkpoint(ckpt or default_checkpoint(), device=device, dtype=dt)
    tiles = TileConfig(patch_size=be.patch_size, stride=stride, grid=grid,
                       batch_size=batch_size or (512 if device.startswith("cuda") else 64))
    cases = (photo_cases(photos, be.meta.camera, crop=crop, per_side=per_side) if photos
             else raw_cases(raw_dir, crop=crop, per_side=per_side))
    echo = lambda s: click.echo(s, err=True)  # noqa: E731
    echo(f"{len(cases)} images{f' ({crop}x{crop} crops)' if crop else ''}, {be.describe()}")
    rows = baseline_rows(cases) + evaluate(be, cases, specs, seeds or (0,), tiles=tiles, echo=echo)
    summary = summarise(rows)
    click.echo(table(summary))
    if json_path:
        from rawdiff_infer.fsio import write_bytes

        write_bytes(json_path, json.dumps({"device": device, "model": str(ckpt or default_checkpoint()),
                                           "crop": crop, "stride": stride, "grid": grid,
                                           "images": [c.name for c in cases], "summary": summary,
                                           "rows": [asdict(r) for r in rows]}, indent=1).encode(), overwrite=force)
    if plot_path:
        plot(summary, plot_path, title=f"{len(cases)} held-out images, {device}", overwrite=force)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="rawdiff-eval: %(levelname)s: %(message)s")
    try:
        cli.main(args=argv, prog_name="rawdiff-eval")
    except KeyboardInterrupt:
        click.echo("rawdiff-eval: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
