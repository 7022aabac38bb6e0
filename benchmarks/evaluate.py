"""rawdiff-eval: RAW quality of a model and its samplers on your own held-out data.

Two kinds of data, from any folder (file names do not matter):

\b
- ``--photos DIR``: sRGB photos rendered through the model's synthetic camera (``rawdiff_train.SyntheticCamera``
  with the camera the model describes), each with a fixed seed, so the RAW target is known exactly, and so is
  each input's JPEG quality (the camera's draw: the input's quantisation band);
- ``--raw DIR``: real camera RAW files, turned into (sRGB, RAW) pairs by the InvISP protocol
  (``rawdiff_train.fivek``; LibRaw renders the sRGB, JPEG quality 90). Files the protocol refuses are skipped
  with a warning.

For every ``--sampler METHOD[:STEPS][:options]``, every ``--consistency`` mode and every ``--seed``, each image (or
its ``--crop`` crops) is reconstructed (with its band) and compared with its RAW target: PSNR on the encoded RAW
(prediction clamped to [0, 1], peak 1, InvISP's definition) over all pixels, over the "determined" pixels (no
channel of the 8-bit input >= 250: the ISP's inverse fixes the RAW there) and over the "clipped" ones (a channel
>= 250); the brightness ratio (mean of the prediction over mean of the target; 1 is right), and the seconds per
image. A region's PSNR is the mean of the per-image PSNRs over the images that have pixels in it (the table says
how many). The table gives per row the mean PSNRs over images and seeds, the spread of the per-seed means
(all pixels, max - min), the evaluations per image and the time; ``--json`` keeps every row, ``--plot`` draws PSNR
against model evaluations, ``--figure`` shows input, output and error maps per image.

Two baseline rows come first, nothing learnt in either:

\b
- ``closed form``: the exact inverse of the ISP that rendered the input, applied to the 8-bit input
  (``IspModel.closed_form``, then the RAW encoding): the model's own ISP (``meta.isp``) for ``--photos``, the
  file's LibRaw render (``rawdiff_train.fivek.libraw_isp``) for ``--raw``. It is exact wherever the input is not
  clipped, so it is THE baseline: a model earns its keep only where it beats it, region by region;
- ``naive: inverse sRGB curve``: the sRGB curve inverted, no colour matrix, gain or tone (a straw man, kept for
  comparison with earlier reports).

\b
    rawdiff-eval --photos heldout/ --crop 128 --crops-per-side 2 --seed 0 --seed 1 \\
        --sampler dpm-sde:10 --sampler dpm:20 --consistency on --consistency off \\
        --json eval.json --plot eval.png --figure eval-maps.png
"""

from __future__ import annotations

from rawdiff_infer.startup import begin_command

begin_command("rawdiff-eval", __file__)  # before the heavy imports: closed streams, Ctrl-C while importing

import functools  # noqa: E402
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from rawdiff_infer.console import OneLineCommand
from rawdiff_infer.messages import first_line, show_path

if TYPE_CHECKING:
    from rawdiff_infer.consistency import Band, ConsistencyConfig
    from rawdiff_infer.isp import IspModel

__all__ = ["CLOSED_FORM", "EvalCase", "EvalRow", "NAIVE", "baseline_rows", "check_report_paths",
           "closed_form", "closed_form_rows", "crop_cases", "evaluate", "figure", "main", "photo_cases", "raw_cases",
           "row_label", "summarise"]

log = logging.getLogger(__name__)

#: label of the closed-form baseline row (the ISP's exact inverse of the 8-bit input)
CLOSED_FORM = "closed form"
#: label of the naive baseline row (the inverse sRGB curve alone)
NAIVE = "naive: inverse sRGB curve"
#: --figure shows at most this many images (the first ones), one row of panels each
FIGURE_MAX_IMAGES = 12


@dataclass(frozen=True)
class EvalCase:
    """One evaluation image.

    Attributes:
        name: the photo's or RAW file's stem (``#k`` for its k-th crop).
        srgb: the sRGB input, uint8 H x W x 3 (levels 0..255).
        target: its encoded RAW target, float32 H x W x 3 in [0, 1] (``RawEncoding()``).
        band: the input's quantisation band (``consistency.Band``: JPEG inputs get a wider one); None: lossless
            8-bit (the reconstructor's ``band_of``).
        isp: the ISP that rendered this input when the data source has its own (a RAW file's LibRaw render); None:
            the model's ISP (synthetic photos), or unknown.
        jpeg_quality: the JPEG quality the input went through (the synthetic camera's draw), None if lossless or
            unknown.
    """

    name: str
    srgb: np.ndarray
    target: np.ndarray
    band: Band | None = None
    isp: IspModel | None = None
    jpeg_quality: int | None = None


@dataclass
class EvalRow:
    """One result: a baseline or a (sampler spec, consistency setting) on one image with one seed.

    Attributes:
        label: the row of the summary this result belongs to (``row_label``; the baselines' own names).
        spec: the sampler spec (``METHOD[:STEPS][:options]``), or the baseline's label.
        method: the sampler method, or what the baseline does.
        evaluations: model evaluations per image (0 for the baselines).
        image: the case's name.
        seed: the seed of the run (0 for the baselines).
        psnr: dB on the encoded RAW over all pixels.
        brightness: mean of the prediction over mean of the target (1 is right).
        seconds: wall time per image (s).
        psnr_determined, psnr_clipped: dB over the determined / clipped pixels (``metrics.region_masks``), None
            where the image has no such pixel.
        consistency: the requested mode ("auto", "on", "off"; "" for the baselines).
        consistent: whether the reconstruction projected onto the ISP-consistent set.
        skip: the patch-skipping setting (None for the baselines).
    """

    label: str
    spec: str
    method: str
    evaluations: int
    image: str
    seed: int
    psnr: float
    brightness: float
    seconds: float
    psnr_determined: float | None = None
    psnr_clipped: float | None = None
    consistency: str = ""
    consistent: bool = False
    skip: bool | None = None


def _result(label: str, spec: str, method: str, evaluations: int, case: EvalCase, seed: int, pred: np.ndarray,
            seconds: float, **extra: Any) -> EvalRow:
    """The row of prediction ``pred`` (encoded RAW H x W x 3) for ``case``: PSNR per region, brightness."""
    from rawdiff_infer.metrics import psnr_regions

    p = psnr_regions(pred, case.target, case.srgb)
    assert p["all"] is not None
    return EvalRow(label, spec, method, evaluations, case.name, seed, p["all"],
                   float(np.clip(pred, 0.0, 1.0).mean() / max(float(case.target.mean()), 1e-6)), seconds,
                   psnr_determined=p["determined"], psnr_clipped=p["clipped"], **extra)


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


def crop_cases(name: str, srgb: np.ndarray, target: np.ndarray, crop: int | None, per_side: int = 1, *,
               band: Band | None = None, isp: IspModel | None = None,
               jpeg_quality: int | None = None) -> list[EvalCase]:
    """The cases of one (sRGB, target) pair: the whole pair (no ``crop``), or its ``per_side`` x ``per_side``
    crops, named ``name#k``; every case keeps the pair's ``band``, ``isp`` and ``jpeg_quality`` (``EvalCase``)."""
    xs, ys = _crops(srgb, crop, per_side), _crops(target, crop, per_side)
    if len(xs) == 1:
        return [EvalCase(name, xs[0], ys[0], band, isp, jpeg_quality)]
    return [EvalCase(f"{name}#{k}", x, y, band, isp, jpeg_quality) for k, (x, y) in enumerate(zip(xs, ys))]


def photo_cases(folder: str | Path, camera: Any, *, crop: int | None = None, per_side: int = 1,
                seed: int = 10_000) -> list[EvalCase]:
    """Photos of ``folder`` rendered by the synthetic camera of ``camera`` (the model's), one fixed draw each; whole,
    or ``per_side`` x ``per_side`` crops of each. Each case's band is that of the camera's JPEG draw for its photo
    (``Band.for_input(255, jpeg_quality=q)``; lossless where the draw had no JPEG).

    Raises:
        click.UsageError: no photos, or one that cannot be read (one line naming it).
    """
    from rawdiff_infer.consistency import Band
    from rawdiff_infer.rawspace import RawEncoding
    from rawdiff_train.data import PHOTO_EXTENSIONS, PhotoError, PhotoPairSource, list_files

    files = list_files(folder, PHOTO_EXTENSIONS)
    if not files:
        raise click.UsageError(f"{show_path(folder)}: no photos")
    src = PhotoPairSource(files, camera=camera, seed=seed)
    enc = RawEncoding()
    cases = []
    for i, f in enumerate(files):
        try:
            pair = src[i]
        except PhotoError as e:
            raise click.UsageError(first_line(e)) from None
        srgb = np.round(np.clip(pair.srgb, 0, 1) * 255).astype(np.uint8)
        quality = pair.meta.get("jpeg_quality")
        band = Band.for_input(255, jpeg_quality=quality)
        cases += crop_cases(f.stem, srgb, enc.encode(pair.raw.astype(np.float32)), crop, per_side, band=band,
                            jpeg_quality=quality)
    return cases


@functools.lru_cache(maxsize=1)
def _libraw_isp() -> Callable[..., IspModel] | None:
    """``rawdiff_train.fivek.libraw_isp`` (a RAW file -> the ``IspModel`` of its LibRaw render), or None with one
    warning where this build does not have it (then ``--raw`` reports no closed form)."""
    try:
        from rawdiff_train.fivek import libraw_isp
    except ImportError:
        log.warning("no closed form for --raw: this build has no rawdiff_train.fivek.libraw_isp (the ISP of a RAW "
                    "file's LibRaw render); the closed-form row is left out")
        return None
    return libraw_isp


def render_isp(path: str | Path, *, wb: str = "camera") -> IspModel | None:
    """The ISP of LibRaw's render of one RAW file (the InvISP protocol's forward ISP, white balance ``wb``: 'camera'
    or 'daylight', as the pairs were made), or None where it is not available (see ``_libraw_isp``) or the file's
    render has none (one warning line naming the file)."""
    from rawdiff_train.fivek import RawFileError

    fn = _libraw_isp()
    if fn is None:
        return None
    try:
        return fn(path, wb=wb)
    except (RawFileError, ValueError, OSError) as e:
        log.warning("%s: no closed form (%s)", show_path(path), first_line(e))
        return None


def raw_cases(folder: str | Path, *, crop: int | None = None, per_side: int = 1) -> list[EvalCase]:
    """Real RAW files of ``folder`` through the InvISP protocol (camera white balance, JPEG quality 90): the band of
    that JPEG, and each file's own render ISP (``render_isp``) for the closed form. A file the protocol refuses is
    skipped with one warning line.

    Raises:
        click.UsageError: no RAW file, or none that gives a pair.
    """
    from rawdiff_infer.consistency import Band
    from rawdiff_infer.rawspace import RawEncoding
    from rawdiff_train.data import RawPairSource
    from rawdiff_train.fivek import RawFileError

    src = RawPairSource(folder)
    if not len(src):
        raise click.UsageError(f"{show_path(folder)}: no RAW files")
    enc = RawEncoding()
    cases = []
    for i in range(len(src)):
        try:
            pair = src[i]
        except RawFileError as e:
            log.warning("skipped: %s", first_line(e))
            continue
        srgb = np.round(np.clip(pair.srgb, 0, 1) * 255).astype(np.uint8)
        band = Band.for_input(255, jpeg_quality=pair.meta.get("jpeg_quality"))
        cases += crop_cases(pair.name, srgb, enc.encode(pair.raw), crop, per_side, band=band,
                            isp=render_isp(pair.meta.get("path", src.files[i]), wb=src.wb))
    if not cases:
        raise click.UsageError(f"{show_path(folder)}: no RAW file gives a pair under the InvISP protocol")
    return cases


def closed_form(isp: IspModel, srgb: np.ndarray) -> np.ndarray:
    """The closed-form RAW of an input: ``isp.closed_form`` of the sRGB levels (uint8 / 255 or uint16 / 65535, or
    float in [0, 1]), then ``RawEncoding().encode``: encoded RAW, float32 H x W x 3 in [0, 1]. Exact (up to the
    input's quantisation) wherever no channel is clipped; a clipped channel comes back at the clip level."""
    import torch

    from rawdiff_infer.rawspace import RawEncoding

    a = np.asarray(srgb)
    scale = 255.0 if a.dtype == np.uint8 else 65535.0 if a.dtype == np.uint16 else 1.0
    # in fp64: a fine curve table (LibRaw's exact 4096-entry LUT) has neighbours that fp32 cannot tell apart
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64) / scale).permute(2, 0, 1)
    lin = isp.closed_form(x.clamp(0.0, 1.0)).permute(1, 2, 0).contiguous().numpy()
    return np.asarray(RawEncoding().encode(lin), dtype=np.float32)


def closed_form_rows(cases: Sequence[EvalCase], isp: IspModel | None) -> list[EvalRow]:
    """The closed-form baseline: per case ``closed_form`` with the case's own ISP (``EvalCase.isp``), else ``isp``
    (the model's; None: cases without their own ISP get no row)."""
    rows = []
    for c in cases:
        use = c.isp if c.isp is not None else isp
        if use is None:
            continue
        what = "ISP inverse (the render's own ISP)" if c.isp is not None else "ISP inverse (the model's ISP)"
        rows.append(_result(CLOSED_FORM, CLOSED_FORM, what, 0, c, 0, closed_form(use, c.srgb), 0.0))
    return rows


def baseline_rows(cases: Sequence[EvalCase]) -> list[EvalRow]:
    """The naive baseline (a straw man): the inverse sRGB curve, then the RAW encoding (no colour, gain or tone)."""
    import torch

    from rawdiff_infer.isp import srgb_to_linear
    from rawdiff_infer.rawspace import RawEncoding

    enc = RawEncoding()
    rows = []
    for c in cases:
        pred = enc.encode(srgb_to_linear(torch.from_numpy(c.srgb / 255.0).float()).numpy())
        rows.append(_result(NAIVE, NAIVE, "inverse sRGB curve (naive baseline)", 0, c, 0, pred, 0.0))
    return rows


def row_label(spec: str, consistency: ConsistencyConfig, has_isp: bool) -> str:
    """The summary row of a sampler spec under a consistency setting, e.g. ``dpm-sde:10 [consistency auto: on,
    skip]``: the requested mode (with what "auto" became for this model) and, when projecting, the patch skipping."""
    on = has_isp and consistency.mode != "off"
    mode = f"auto: {'on' if on else 'off'}" if consistency.mode == "auto" else consistency.mode
    extra = (", skip" if consistency.skip else ", no skip") if on else ""
    return f"{spec} [consistency {mode}{extra}]"


Outputs = Callable[[str, int, list[np.ndarray]], None]


def evaluate(backend: Any, cases: Sequence[EvalCase], specs: Sequence[str], seeds: Sequence[int], *,
             tiles: Any, pack: bool = True, echo: Callable[[str], None] = lambda s: None,
             consistency: Sequence[ConsistencyConfig] | None = None,
             on_outputs: Outputs | None = None) -> list[EvalRow]:
    """Reconstruct every case with every spec, consistency setting and seed; one row each (PSNR per region,
    brightness ratio, seconds).

    Args:
        backend: a loaded backend (its ``meta.isp`` decides what "auto" does).
        cases: the images; each is reconstructed with its own band (``EvalCase.band``).
        specs: sampler specs (``SamplerConfig.from_spec``).
        seeds: run seeds; case i of seed s starts from the noise of seed ``1000 s + i``, so that no two cases share
            their starting noise.
        tiles: the ``TileConfig``.
        pack: reconstruct all cases of one run together (their patches share backend calls; the seconds per image
            are then the pack's time divided by the number of images).
        echo: one progress line per run.
        consistency: the ``ConsistencyConfig`` of each row family (default: one, the default "auto").
        on_outputs: called as ``on_outputs(label, seed, encoded)`` after each run, ``encoded`` the outputs per case
            (H x W x 3 float32 in [0, 1]).
    """
    from rawdiff_infer.consistency import ConsistencyConfig
    from rawdiff_infer.pipeline import RawReconstructor, SamplerConfig

    configs = list(consistency) if consistency else [ConsistencyConfig()]
    bands = [c.band for c in cases]
    has_isp = backend.meta.isp is not None
    rows: list[EvalRow] = []
    for spec in specs:
        cfg = SamplerConfig.from_spec(spec)
        for cc in configs:
            rec = RawReconstructor(backend, sampler=cfg, tiles=tiles, consistency=cc)
            label = row_label(spec, cc, has_isp)
            for seed in seeds:
                case_seeds = [1000 * seed + i for i in range(len(cases))]
                t0 = time.perf_counter()
                if pack:
                    outs = rec.reconstruct_many([c.srgb for c in cases], seeds=case_seeds, bands=bands)
                    per = [(time.perf_counter() - t0) / len(cases)] * len(cases)
                else:
                    outs, per = [], []
                    for c, case_seed in zip(cases, case_seeds):
                        t1 = time.perf_counter()
                        outs.append(rec.reconstruct(c.srgb, seed=case_seed, band=c.band))
                        per.append(time.perf_counter() - t1)
                encoded = [o.encoded for o in outs]
                if on_outputs is not None:
                    on_outputs(label, seed, encoded)
                for c, e, s in zip(cases, encoded, per):
                    rows.append(_result(label, spec, cfg.method, cfg.num_steps, c, seed, e, s, consistency=cc.mode,
                                        consistent=rec.consistent, skip=cc.skip))
                run = summarise(rows[-len(cases):])[0]
                echo(f"{label} seed {seed}: {_regions_text(run)} ({time.perf_counter() - t0:.1f} s, "
                     f"{rec.last_stats.get('evaluated_patches', '?')} patches per evaluation)")
            rec.close()
    return rows


def _regions_text(s: dict[str, Any]) -> str:
    return f"{s['psnr']:.2f} dB all, {_db(s['psnr_determined'])} determined, {_db(s['psnr_clipped'])} clipped"


def _db(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _region_mean(rows: Sequence[EvalRow], key: str) -> tuple[float | None, int]:
    """(mean of the rows' ``key`` PSNRs over those that have the region, number of distinct images that have it)."""
    have = [r for r in rows if getattr(r, key) is not None]
    if not have:
        return None, 0
    return statistics.fmean(getattr(r, key) for r in have), len({r.image for r in have})


def summarise(rows: Sequence[EvalRow]) -> list[dict[str, Any]]:
    """Per row label (in order of appearance): mean PSNR over images and seeds for all pixels and per region, the
    spread of the per-seed means (all pixels, dB), brightness and time.

    A region's PSNR is the image-level mean: the mean of the per-image (and per-seed) PSNRs over the images that
    have pixels in that region; ``images_determined`` / ``images_clipped`` say how many images that is."""
    out = []
    for label in dict.fromkeys(r.label for r in rows):
        sel = [r for r in rows if r.label == label]
        seeds = sorted({r.seed for r in sel})
        per_seed = [statistics.fmean(r.psnr for r in sel if r.seed == s) for s in seeds]
        det, n_det = _region_mean(sel, "psnr_determined")
        clip, n_clip = _region_mean(sel, "psnr_clipped")
        br = [r.brightness for r in sel]
        out.append({"label": label, "spec": sel[0].spec, "method": sel[0].method,
                    "evaluations": sel[0].evaluations, "consistency": sel[0].consistency,
                    "consistent": sel[0].consistent, "skip": sel[0].skip,
                    "psnr": statistics.fmean(r.psnr for r in sel), "psnr_determined": det, "psnr_clipped": clip,
                    "images_determined": n_det, "images_clipped": n_clip,
                    "seed_spread": max(per_seed) - min(per_seed),
                    "brightness_mean": statistics.fmean(br), "brightness_min": min(br), "brightness_max": max(br),
                    "seconds_per_image": statistics.fmean(r.seconds for r in sel),
                    "images": len({r.image for r in sel}), "seeds": len(seeds)})
    return out


def table(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as text: one line per row, PSNR (dB) over all / determined / clipped pixels, and a footer that
    says how the region means are taken and over how many images."""
    w = max([len("row")] + [len(s["label"]) for s in summary])
    head = (f"{'row':{w}s} {'evals':>5s} {'images':>6s} {'all dB':>7s} {'determ.':>7s} {'clipped':>7s} "
            f"{'seed spread':>11s} {'brightness (min-max)':>22s} {'s/image':>8s}")
    lines = [head, "-" * len(head)]
    for s in summary:
        lines.append(f"{s['label']:{w}s} {s['evaluations']:5d} {s['images']:6d} {s['psnr']:7.2f} "
                     f"{_db(s['psnr_determined']):>7s} {_db(s['psnr_clipped']):>7s} {s['seed_spread']:11.2f} "
                     f"{s['brightness_mean']:8.3f} ({s['brightness_min']:.2f}-{s['brightness_max']:.2f}) "
                     f"{s['seconds_per_image']:8.2f}")
    if summary:
        ref = max(summary, key=lambda s: s["images"])
        lines.append(f"PSNR on the encoded RAW. determined: no channel of the 8-bit input >= 250 "
                     f"({ref['images_determined']} of {ref['images']} images have such pixels); clipped: one >= 250 "
                     f"({ref['images_clipped']} of {ref['images']});")
        lines.append("a region's PSNR is the mean of the per-image PSNRs over the images that have pixels in it")
    return "\n".join(lines)


def plot(summary: Sequence[dict[str, Any]], path: str | Path, title: str = "", *, overwrite: bool = False) -> None:
    """PSNR (all pixels) against model evaluations, one line per method (with its options and consistency
    setting); the closed form as a solid horizontal line (the reference), the naive baseline as a dotted one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[dict[str, Any]]] = {}
    for s in summary:
        if s["label"] == CLOSED_FORM:
            ax.axhline(s["psnr"], color="black", linestyle="-", linewidth=1.2,
                       label="closed form (ISP inverse, the baseline)")
            continue
        if s["label"] == NAIVE:
            ax.axhline(s["psnr"], color="grey", linestyle=":", label="naive: inverse sRGB curve")
            continue
        parts = s["spec"].split(":")
        setting = s["label"][len(s["spec"]):].strip()
        fam = parts[0] + (f" ({parts[2]})" if len(parts) > 2 else "") + (f" {setting}" if setting else "")
        families.setdefault(fam, []).append(s)
    for fam, items in families.items():
        items.sort(key=lambda s: s["evaluations"])
        ax.plot([s["evaluations"] for s in items], [s["psnr"] for s in items], "o-", label=fam)
    ax.set_xscale("log")
    ax.set_xlabel("model evaluations per image")
    ax.set_ylabel("PSNR on encoded RAW, all pixels (dB)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, overwrite=overwrite, dpi=120)


def _save(fig: Any, path: str | Path, *, overwrite: bool, dpi: int = 100) -> None:
    """A matplotlib figure to ``path`` as PNG (``dpi`` dots per inch) through ``fsio.atomic_write``; the figure is
    closed."""
    import matplotlib.pyplot as plt

    from rawdiff_infer.fsio import atomic_write

    try:
        with atomic_write(path, overwrite=overwrite) as f:
            fig.savefig(f, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def figure(cases: Sequence[EvalCase], outputs: Sequence[np.ndarray], closed_forms: Sequence[np.ndarray | None],
           path: str | Path, *, title: str = "", overwrite: bool = False) -> None:
    """Side-by-side panels, one row per image (the first ``FIGURE_MAX_IMAGES``): the sRGB input, the output (encoded
    RAW shown as RGB), |output - closed form| and |output - truth| as heat maps (max over channels, in encoded RAW
    units) on one colour scale shared by every heat map of the figure (0 to the 99.5th percentile of all their
    values, at least 0.001); the clipped pixels (a channel of the input >= 250) outlined in cyan on every panel.

    Args:
        cases: the images (``EvalCase``).
        outputs: per case the encoded RAW output, H x W x 3 in [0, 1].
        closed_forms: per case its closed form (``closed_form``), or None where there is none.
        path: the PNG to write (through ``fsio.atomic_write``; an existing file only with ``overwrite``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rawdiff_infer.metrics import psnr_regions, region_masks

    n = min(len(cases), FIGURE_MAX_IMAGES)
    outs = [np.clip(np.asarray(o, dtype=np.float32), 0.0, 1.0) for o in outputs[:n]]
    d_cf = [None if cf is None else np.abs(o - cf).max(axis=2) for o, cf in zip(outs, closed_forms[:n])]
    d_gt = [np.abs(o - c.target).max(axis=2) for o, c in zip(outs, cases[:n])]
    pooled = np.concatenate([d.ravel() for d in d_cf + d_gt if d is not None])
    vmax = max(float(np.percentile(pooled, 99.5)), 1e-3)
    fig, axes = plt.subplots(n, 4, figsize=(11.5, 2.7 * n + 0.6), squeeze=False, constrained_layout=True)
    heat = None
    names = ("input (sRGB)", "output (encoded RAW)", "|output - closed form|", "|output - truth|")
    for i, c in enumerate(cases[:n]):
        clipped = region_masks(c.srgb)["clipped"]
        for j, img in enumerate((c.srgb, outs[i], d_cf[i], d_gt[i])):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(names[j], fontsize=9)
            if img is None:
                ax.text(0.5, 0.5, "no closed form", ha="center", va="center", transform=ax.transAxes, fontsize=8)
                continue
            if img.ndim == 3:
                ax.imshow(img, interpolation="nearest")
            else:
                heat = ax.imshow(img, cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
            if clipped.any() and not clipped.all():
                ax.contour(clipped.astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.7)
        p = psnr_regions(outs[i], c.target, c.srgb)
        axes[i, 0].set_ylabel(f"{c.name}\n{100 * clipped.mean():.1f}% clipped\n{p['all']:.1f} dB all, "
                              f"{_db(p['determined'])} det., {_db(p['clipped'])} clip.", fontsize=7)
    if heat is not None:
        fig.colorbar(heat, ax=axes[:, 2:].ravel().tolist(), extend="max", shrink=0.9,
                     label="|difference|, encoded RAW units (max over channels)")
    fig.suptitle(title + (f" (first {n} of {len(cases)} images)" if n < len(cases) else "")
                 + "; cyan: clipped input pixels", fontsize=9)
    _save(fig, path, overwrite=overwrite)


def check_report_paths(*paths: str | None, force: bool) -> None:
    """Report and plot targets (``--json``, ``--plot``, ``--figure``; None: not asked for), checked before any
    compute by ``plan.check_output_files`` (no file the run reads, even with --force: ``fsio.reading``; no two the
    same file); click.UsageError (one line) otherwise."""
    from rawdiff_infer.plan import UsageError, check_output_files

    try:
        check_output_files({f"report {k + 1}": p for k, p in enumerate(paths)}, force=force)
    except UsageError as e:
        raise click.UsageError(str(e)) from None


#: the --consistency modes (``rawdiff_infer.consistency.MODES``; spelled out so that --help needs no torch)
_MODES = ("auto", "on", "off")


def _load_backend(path: str | os.PathLike[str], device: str, dtype: str) -> Any:
    """The torch backend of a checkpoint; a bad checkpoint or device is a click.UsageError (one line)."""
    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_infer.checkpoint import CheckpointError

    try:
        return TorchBackend.from_checkpoint(path, device=device, dtype=dtype)
    except (CheckpointError, ValueError, RuntimeError, OSError) as e:
        raise click.UsageError(f"{show_path(path)}: {first_line(e)}" if isinstance(e, OSError)
                               else first_line(e)) from None


@click.command("rawdiff-eval", cls=OneLineCommand, help=__doc__,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--photos", type=click.Path(exists=True, file_okay=False), help="Folder of sRGB photos (synthetic "
              "camera of the model).")
@click.option("--raw", "raw_dir", type=click.Path(exists=True, file_okay=False), help="Folder of camera RAW files "
              "(InvISP protocol).")
@click.option("--ckpt", help="Model (default: the bundled one).")
@click.option("--sampler", "specs", multiple=True, required=True, metavar="METHOD[:STEPS][:k=v,...]",
              help="Sampler to evaluate; repeat. Options: eta, order, spacing, clip_x0.")
@click.option("--consistency", "modes", multiple=True, type=click.Choice(_MODES),
              help="Project onto the RAWs the model's ISP renders to the input: auto (when the model has an ISP), "
                   "on, off. Repeat to compare side by side (one row each). [default: auto]")
@click.option("--skip/--no-skip", default=True, show_default=True,
              help="With consistency: skip the model on patches whose every pixel is determined (lossless inputs).")
@click.option("--seed", "seeds", multiple=True, type=click.IntRange(0, 2**64 - 1), help="Repeat (default 0).")
@click.option("--crop", type=click.IntRange(8), help="Crops of N x N pixels instead of the whole image.")
@click.option("--crops-per-side", "per_side", type=click.IntRange(1, 8), default=1, show_default=True,
              help="With --crop: K x K crops spread over each image (1: the centre crop).")
@click.option("--stride", type=click.IntRange(1), default=48, show_default=True)
@click.option("--grid", type=click.Choice(["overlap", "shifted"]), default="overlap", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), help="Patches per model call (default 16 on CPU as rawdiff-infer, 512 on CUDA).")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="As rawdiff-infer: auto is fp16 on CUDA, bf16 on a CPU with native bf16 (avx512_bf16 or AMX), "
              "else fp32.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every row and the summary here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="PSNR against evaluations (PNG).")
@click.option("--figure", "figure_path", type=click.Path(dir_okay=False),
              help=f"Input, output, |output - closed form| and |output - truth| per image (PNG; the first "
                   f"{FIGURE_MAX_IMAGES} images) for the first sampler, consistency mode and seed only.")
@click.option("--force", is_flag=True, help="Replace existing --json / --plot / --figure files (never an input).")
def cli(**p: Any) -> None:
    """rawdiff-eval: one line on stderr for every problem, exit 2 before any compute, 1 after, 128+N on a signal
    (temporary report files removed); the files the run reads are never replaced (``fsio.reading``)."""
    from rawdiff_infer.console import Console
    from rawdiff_infer.fsio import reading
    from rawdiff_infer.interrupts import exit_code_of, handle_interrupts

    console = Console(_PROG)
    with console.capture(), handle_interrupts(lambda e: console.err(f"{e.verb}; no report was written")):
        try:
            with reading([p["photos"], p["raw_dir"], p["ckpt"]]):
                _run(p, console)
            code = 0
        except click.UsageError:
            raise
        except KeyboardInterrupt as e:
            console.err(f"{getattr(e, 'verb', 'interrupted')}; no report was written")
            code = exit_code_of(e)
        except OSError as e:  # a report that cannot be written (a full disk, ...): its temporary file is gone
            where = f"{show_path(e.filename)}: " if e.filename else ""
            console.err(f"error: {where}{e.strerror or first_line(e)}")
            code = 1
        except Exception as e:  # noqa: BLE001 - one line, never a traceback
            console.err(f"error: {type(e).__name__}: {first_line(e)}")
            code = 1
    sys.exit(code)


_PROG = "rawdiff-eval"


def _device(device: str) -> str:
    """auto -> cuda or cpu; cpu, cuda or cuda:N that torch sees, else click.UsageError (one line)."""
    import re

    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise click.UsageError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError(f"--device {device}: torch sees no CUDA device (a CPU-only build, or no GPU)")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise click.UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def _checked(p: dict[str, Any]) -> tuple[Any, list[Any]]:
    """Everything checked before the model loads (click.UsageError): data, samplers, model path, reports."""
    from rawdiff_infer.backends import default_checkpoint
    from rawdiff_infer.consistency import ConsistencyConfig
    from rawdiff_infer.pipeline import SamplerConfig

    if bool(p["photos"]) == bool(p["raw_dir"]):
        raise click.UsageError("give one of --photos and --raw")
    for spec in p["specs"]:
        try:
            SamplerConfig.from_spec(spec)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    configs = [ConsistencyConfig(mode=m, skip=p["skip"]) for m in dict.fromkeys(p["modes"] or ("auto",))]
    model_path = p["ckpt"] or default_checkpoint()
    if model_path is None:
        raise click.UsageError("this build has no bundled model: give --ckpt")
    from rawdiff_infer.plan import UsageError, check_output_files

    try:
        check_output_files({"--json": p["json_path"], "--plot": p["plot_path"], "--figure": p["figure_path"]},
                           force=p["force"])
    except UsageError as e:
        raise click.UsageError(str(e)) from None
    return model_path, configs


def _tiles(p: dict[str, Any], be: Any, device: str) -> Any:
    """The tiling of rawdiff-infer's defaults; a stride the patch cannot take is a click.UsageError."""
    from rawdiff_infer.tiling import TileConfig

    try:
        return TileConfig(patch_size=be.patch_size, stride=p["stride"], grid=p["grid"],
                          batch_size=p["batch_size"] or (512 if device.startswith("cuda") else 16))
    except ValueError as e:
        raise click.UsageError(f"--stride {p['stride']} / --grid {p['grid']}: {first_line(e)}") from None


def _run(p: dict[str, Any], console: Any) -> None:
    """Check, load, evaluate, write the reports (each through ``fsio``)."""
    from rawdiff_infer.cpu import resolve_dtype

    model_path, configs = _checked(p)
    device = _device(p["device"])
    dt, why = resolve_dtype(p["dtype"], device)  # rawdiff-infer's rule: what a user's run gets
    be = _load_backend(model_path, device, dt)
    if be.meta.isp is None and any(c.mode == "on" for c in configs):
        raise click.UsageError(f"--consistency on: the model {show_path(model_path)} does not describe its ISP "
                               "(its description has no 'isp')")
    tiles = _tiles(p, be, device)
    crop, per_side = p["crop"], p["per_side"]
    cases = (photo_cases(p["photos"], be.meta.camera, crop=crop, per_side=per_side) if p["photos"]
             else raw_cases(p["raw_dir"], crop=crop, per_side=per_side))
    cf_isp = be.meta.isp if p["photos"] else None  # --raw: each file's own render ISP (EvalCase.isp)
    console.err(f"{len(cases)} images{f' ({crop}x{crop} crops)' if crop else ''}, {be.describe()} ({why})")
    shown: dict[str, Any] = {}

    def keep(label: str, seed: int, encoded: list[np.ndarray]) -> None:
        if p["figure_path"] and not shown:
            shown.update(label=label, seed=seed, outputs=encoded[:FIGURE_MAX_IMAGES])

    rows = (closed_form_rows(cases, cf_isp) + baseline_rows(cases)
            + evaluate(be, cases, p["specs"], p["seeds"] or (0,), tiles=tiles, echo=console.err,
                       consistency=configs, on_outputs=keep))
    summary = summarise(rows)
    console.out(table(summary))
    _reports(p, console, model_path, device, be, configs, cases, rows, summary, shown, cf_isp)


def _reports(p: dict[str, Any], console: Any, model_path: Any, device: str, be: Any, configs: list[Any],
             cases: list[EvalCase], rows: list[EvalRow], summary: list[dict[str, Any]], shown: dict[str, Any],
             cf_isp: Any) -> None:
    """--json, --plot and --figure, each written atomically (a failed write leaves no temporary)."""
    force, figure_path = p["force"], p["figure_path"]
    if p["json_path"]:
        from rawdiff_infer.fsio import write_bytes

        report = {"device": device, "model": str(model_path), "crop": p["crop"], "stride": p["stride"],
                  "grid": p["grid"], "isp": be.meta.isp.to_dict() if be.meta.isp is not None else None,
                  "consistency": [c.mode for c in configs], "skip": p["skip"],
                  "regions": {"determined": "no channel of the 8-bit input >= 250", "clipped": "a channel >= 250",
                              "mean": "image-level: the mean of per-image PSNRs over the images with pixels in "
                                      "the region (images_determined / images_clipped of them)"},
                  "images": [c.name for c in cases],
                  "bands": [c.band.width if c.band is not None else None for c in cases],
                  "figure": ({"path": str(figure_path), "row": shown.get("label"), "seed": shown.get("seed")}
                             if figure_path else None),
                  "summary": summary, "rows": [asdict(r) for r in rows]}
        write_bytes(p["json_path"], json.dumps(report, indent=1).encode(), overwrite=force)
    if p["plot_path"]:
        plot(summary, p["plot_path"], title=f"{len(cases)} held-out images, {device}", overwrite=force)
    if figure_path:
        n = len(shown["outputs"])
        forms = [closed_form(c.isp or cf_isp, c.srgb) if (c.isp or cf_isp) is not None else None
                 for c in cases[:n]]
        figure(cases[:n], shown["outputs"], forms, figure_path, overwrite=force,
               title=f"{shown['label']}, seed {shown['seed']} (the first sampler, consistency mode and seed only)")
        console.err(f"figure: {show_path(figure_path)} ({shown['label']}, seed {shown['seed']}, {n} images)")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name=_PROG)


if __name__ == "__main__":
    main()
