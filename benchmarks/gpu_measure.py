"""Issue 22 in one prepared GPU run: latency at the defaults, folders, the U-Net per call, correctness, compile cost.

Built like ``gpu_session`` for a short lease on one H100 / H200: four phases, each with a wall-clock deadline in
seconds since the script started; every result goes to ``--out``/results.json as soon as it exists (the file is
rewritten after each measurement) and the log streams to ``--out``/log.txt; an item that would not fit its phase's
deadline is recorded as skipped with the estimate, and a failing item is logged in ``errors`` and skipped without
losing the others. Everything is measured with the project's own functions (``bench.bench_unet``,
``userview.bench_photo`` / ``bench_folder``, ``runner.torch_variant``, ``compile_cost``, ``rawdiff_infer.cli``'s own
option defaults and reconstructor), not copies of them.

**What is measured** (results.json ``phases``):

1. ``defaults``: rawdiff-infer's default settings on the bundled model (``rawdiff_infer/weights``): the default
   sampler, steps, grid, stride, window, batch (256 on CUDA) and dtype (fp16 on CUDA), channels_last, no compile.
   Rows: a 2048x2048 image and a 4000x3000 photo, each with consistency and patch skipping (the default), with
   consistency and without skipping, and without consistency (skipping needs consistency: ``pipeline`` skips only
   when the output is made consistent, so "off + skip" is "off", recorded as such, not measured twice); seconds
   per image (median of the repeats after one warm-up), the patches the model saw, the U-Net-only bound
   (``userview``). A folder of 32 frames of 1280x720 (a pan across a real photo), rawdiff 0.1's sequential loop
   against the pipelined ``FolderRunner``: images/s, the model-busy share (CUDA events around every backend call,
   ``userview.BusyMeter``) and, in a second profiled pass, the **GPU-busy share**: the union of the time
   intervals of every CUDA kernel (and, separately, kernels plus memcpy / memset) recorded by ``torch.profiler``
   (CUDA activity only, CUPTI) divided by that pass's wall time; the profiled pass's images/s is kept beside it to
   show the profiler's overhead. (On the CPU rehearsal the same union is taken over torch operator intervals.)
   Then, in phase 2, the 2048x2048 image at the defaults plus ``--compile``, and plus ``--compile --cuda-graph``.
2. ``unet``: one U-Net call (``bench_unet``: warm-up, then the median of timed calls with CUDA events on rotating
   random inputs) in fp16 and bf16 at batch 1024 and at the defaults' batch (256): eager NCHW, channels_last
   eager (``cl``), torch.compile (Inductor: fuses GroupNorm + SiLU and the elementwise tails), compile + CUDA graph;
   with and without ``torch.backends.cudnn.benchmark``. TFLOP/s from ``bench.flops_per_patch`` (FlopCounterMode,
   counted once). Every row's output is compared with the fp32 eager NCHW model on the same inputs
   (``rel_err`` = ||out - ref|| / ||ref||). ``winners`` names the fastest row per dtype and batch and the ratios
   (channels_last / NCHW, cudnn.benchmark on / off, compile / eager, graph / compile); a kernel profile of the
   compiled fp16 row at batch 1024 (``bench.profile_unet``: where the time goes, convolutions included).
3. ``correctness``: every ``gpu``-marked test (a pytest subprocess over the test files that hold the marker;
   output in gpu_tests.log, gpu_tests.xml); CUDA-graph replay of the bundled model equal to eager, also on a
   device index that is not the current device when there are several GPUs (else 'skipped: one GPU'); the
   whole-step CUDA graph with the consistency projection equal to the eager step on a real crop; the pinned-copy
   path (``transfer.DeviceTransfer``: stage in page-locked memory, copy stream) equal to plain copies bit for bit,
   and the folder runner's outputs equal to each image reconstructed alone (no packing, and packing); AOTInductor
   CUDA equal to eager (``rawdiff_export.aoti_parity`` on the package phase 4 built).
4. ``compile``: ``compile_cost``'s phases, each in a fresh process with its own cache folder: eager time to the
   first eps, the AOTInductor package's build and load (first: the package also serves the check in 3),
   ``torch.compile`` cold and with the warm cache, then eager / compiled / AOTInductor side by side.

**Budget.** Default deadlines 145 / 320 / 410 / 565 s for the four phases; inside each, items run in order of value
(the defaults first, bf16 at batch 256 last), so what a slow card cannot fit is what matters least, named in the
phase's ``skipped`` with its estimate. With the machine's start that is under 11 device-minutes.

**Inputs** come from ``--inputs``, a folder written by ``prep`` from real photos with clipped highlights (the
device machine does not get ``../shared``). From the repository root, once (2.5 MiB; ``.gpu/`` is ignored):

    python -m rawdiff_bench.gpu_measure prep --photos ../shared/data/train-photos --out .gpu/measure

**The device command** (one H100 or H200; about 9.5 minutes; carry ``[".gpu/measure"]``, timeout_s 600). It needs
no install and no network: the four packages are put on ``PYTHONPATH`` under their import names by symlinks (the
device image already has torch 2.11, triton, numpy, click, pillow, tifffile, safetensors, tqdm, pytest, onnx):

    mkdir -p /tmp/pp && for m in rawdiff_infer:rawdiff_infer benchmarks:rawdiff_bench export:rawdiff_export \
    train:rawdiff_train; do ln -sfn "$PWD/${m%%:*}" "/tmp/pp/${m##*:}"; done && export PYTHONPATH=/tmp/pp \
    PYTHONUNBUFFERED=1 && python3 -m rawdiff_bench.gpu_measure run --inputs .gpu/measure --out $OUT

It prints a short summary last; results.json, log.txt, gpu_tests.log and gpu_tests.xml come back in $OUT (4 files,
each far under 16 MiB). A rerun of what did not fit: ``--skip defaults --skip unet`` (etc.) and later deadlines.

**Rehearsal** (CPU, tiny U-Net with the bundled model's ISP, tiny crops of the same inputs with highlights, the
default sampler at ``REHEARSAL_STEPS`` steps, every phase): ``run --rehearse`` takes about 35 s on a shared 2-core
CPU (Inductor and AOTInductor compiles are recorded as skipped: there they take minutes); ``run --rehearse
--with-compile`` runs them too (about 7 minutes). ``tests/test_gpu_measure.py`` runs the fast rehearsal.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import click
import numpy as np
import torch

T0 = time.perf_counter()
log = logging.getLogger("gpu_measure")

PHASE_NAMES = ("defaults", "unet", "correctness", "compile")
#: prep: role -> (file written, width, height, preferred source photo)
ROLES = {"photo_2048": ("photo_2048x2048.jpg", 2048, 2048, "lomiri_Bridge_by_Sander_Klootwijk.jpg"),
         "photo_12mp": ("photo_4000x3000.jpg", 4000, 3000, "lomiri_Dragonfly_by_Bolly.jpg"),
         "pan": ("pan_1920x1200.jpg", 1920, 1200, "plasma_BytheWater.jpg")}
#: a pixel is clipped when a channel is at or above this 8-bit level (as rawdiff-eval's regions)
CLIP_LEVEL = 250
#: sampler steps of the rehearsal (the default sampler's own count on the GPU)
REHEARSAL_STEPS = 2
#: relative error (||out - ref|| / ||ref||) allowed against the fp32 model, per precision
REL_TOL = {"fp32": 2e-3, "fp16": 1e-2, "bf16": 3e-2}


def elapsed() -> float:
    """Seconds since the run started."""
    return time.perf_counter() - T0


# ---- inputs --------------------------------------------------------------------------------------------------------

def clipped_share(img: np.ndarray) -> float:
    """Share of pixels (0..1) with a channel at or above ``CLIP_LEVEL`` (8-bit)."""
    return float((img >= CLIP_LEVEL).any(axis=-1).mean())


def cover_crop(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale ``img`` (H x W x 3 uint8) so that it covers width x height (pixels), then crop the centre."""
    from PIL import Image

    h, w = img.shape[:2]
    s = max(width / w, height / h)
    if abs(s - 1.0) > 1e-6:
        img = np.asarray(Image.fromarray(img).resize((max(width, round(w * s)), max(height, round(h * s))),
                                                     Image.LANCZOS))
    h, w = img.shape[:2]
    y, x = (h - height) // 2, (w - width) // 2
    return np.ascontiguousarray(img[y:y + height, x:x + width])


def bright_crop(img: np.ndarray, width: int, height: int, target: float = 0.03) -> np.ndarray:
    """The width x height window of ``img`` (both clamped to its size) whose share of clipped pixels is closest to
    ``target`` among the windows holding any (on an 8-pixel lattice): a small crop with highlights for the model
    and determined patches beside them."""
    h, w = img.shape[:2]
    width, height = min(width, w), min(height, h)
    mask = (img >= CLIP_LEVEL).any(axis=-1).astype(np.int64)
    ii = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    ys, xs = np.arange(0, h - height + 1, 8), np.arange(0, w - width + 1, 8)
    sums = (ii[ys[:, None] + height, xs[None, :] + width] - ii[ys[:, None], xs[None, :] + width]
            - ii[ys[:, None] + height, xs[None, :]] + ii[ys[:, None], xs[None, :]]) / (width * height)
    score = np.where(sums > 0, np.abs(sums - target), np.inf)
    iy, ix = np.unravel_index(int(np.argmin(score)), score.shape)
    return np.ascontiguousarray(img[ys[iy]:ys[iy] + height, xs[ix]:xs[ix] + width])


def prepare_inputs(photo_dirs: list[Path], out: Path, *, quality: int = 90) -> dict[str, Any]:
    """Write the run's inputs into ``out``: one JPEG per role of ``ROLES`` (the preferred photo if present, else the
    largest photos of the folders in turn), and manifest.json. Returns the manifest."""
    from PIL import Image

    from rawdiff_infer.fsio import atomic_write, write_bytes
    from rawdiff_infer.io import read_image

    photos = sorted((p for d in photo_dirs for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")),
                    key=lambda p: p.name)
    if not photos:
        raise click.UsageError("no photos in " + ", ".join(map(str, photo_dirs)))
    by_name = {p.name: p for p in photos}
    largest = sorted(photos, key=lambda p: -np.prod(Image.open(p).size))
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {}
    for k, (role, (name, w, h, preferred)) in enumerate(ROLES.items()):
        src = by_name.get(preferred, largest[k % len(largest)])
        img = cover_crop(read_image(src).pixels, w, h)
        with atomic_write(out / name, overwrite=True) as f:
            Image.fromarray(img).save(f, format="JPEG", quality=quality)
        manifest[role] = {"file": name, "width": w, "height": h, "source": src.name,
                          "clipped_pixel_share": clipped_share(img), "bytes": (out / name).stat().st_size}
        log.info("%s: %s from %s, %.2f %% of pixels clipped", role, name, src.name,
                 100 * manifest[role]["clipped_pixel_share"])
    write_bytes(out / "manifest.json", json.dumps(manifest, indent=1).encode(), overwrite=True)
    return manifest


@dataclass
class Inputs:
    """The images of one run (H x W x 3 uint8): the two photos, and the pan the folder frames are cut from."""

    photos: dict[str, np.ndarray]
    pan: np.ndarray
    frames: int
    frame_size: tuple[int, int]  # (height, width)

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` of the folder: a window moving across the pan, like a camera pan (frame_size)."""
        fh, fw = self.frame_size
        h, w = self.pan.shape[:2]
        f = i / max(1, self.frames - 1)
        y, x = round(f * (h - fh)), round(f * (w - fw))
        return np.ascontiguousarray(self.pan[y:y + fh, x:x + fw])


def load_inputs(folder: Path, rehearse: bool, frames: int) -> Inputs:
    """The prepared inputs; the rehearsal cuts small crops with highlights out of them."""
    from rawdiff_infer.io import read_image

    manifest = json.loads((folder / "manifest.json").read_text())
    img = {role: read_image(folder / manifest[role]["file"]).pixels for role in ROLES}
    if rehearse:
        photos = {"2048x2048": bright_crop(img["photo_2048"], 128, 128),
                  "4000x3000": bright_crop(img["photo_12mp"], 192, 144)}
        return Inputs(photos, bright_crop(img["pan"], 256, 112), min(frames, 4), (80, 128))
    return Inputs({"2048x2048": img["photo_2048"], "4000x3000": img["photo_12mp"]}, img["pan"], frames, (720, 1280))


# ---- the run's context and budget -----------------------------------------------------------------------------------

@dataclass
class Context:
    """What every phase shares."""

    res: Any                       # gpu_session.Results
    out: Path
    device: str
    rehearse: bool
    with_compile: bool
    model: Any                     # rawdiff_infer.model.UNet, fp32 on the CPU (never moved: backends copy it)
    meta: Any                      # ModelMeta (with the bundled model's ISP)
    model_spec: tuple[str, str]    # compile_cost's (model, config)
    inputs: Inputs
    gflop: float                   # GFLOP per 64x64 patch
    default_batch: int
    default_dtype: str
    until: dict[str, float]        # phase -> deadline (s since start)
    tests_dir: Path | None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def fits(self, phase: str, what: str, estimate_s: float) -> bool:
        """True when ``what`` (estimated at ``estimate_s`` seconds) ends before ``phase``'s deadline; else records
        it as skipped in the phase's ``skipped`` list."""
        left = self.until[phase] - elapsed()
        if estimate_s <= left:
            return True
        self.skip(phase, what, f"budget: needs about {estimate_s:.0f} s, {max(left, 0):.0f} s left")
        return False

    def skip(self, phase: str, what: str, reason: str) -> None:
        skipped = self.res.data["phases"].setdefault(phase, {}).setdefault("skipped", [])
        skipped.append({"what": what, "reason": reason, "at_s": round(elapsed(), 1)})
        self.res.flush()
        log.warning("%s: skip %s (%s)", phase, what, reason)

    @contextlib.contextmanager
    def item(self, phase: str, what: str) -> Iterator[None]:
        """Run one measurement; an exception is recorded (``errors``) and the phase goes on."""
        t = time.perf_counter()
        try:
            yield
            log.info("%s: %s done in %.1f s (at %.0f s)", phase, what, time.perf_counter() - t, elapsed())
        except Exception as e:  # noqa: BLE001 - recorded, the other measurements go on
            self.res.error(f"{phase}: {what}", e)
            if self.cuda:
                torch.cuda.empty_cache()


def _free(*backends: Any) -> None:
    for be in backends:
        if be is not None:
            be.close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# ---- phase 1: the defaults -------------------------------------------------------------------------------------------

def _default_reconstructor(ctx: Context, be: Any, consistency: str = "auto", skip: bool = True,
                           **options: Any) -> Any:
    """rawdiff-infer's own reconstructor for its default options (``cli._reconstructor``), with these changes."""
    from rawdiff_infer.cli import InferOptions, _reconstructor

    if ctx.rehearse:
        options.setdefault("steps", REHEARSAL_STEPS)
    opts = InferOptions(inputs=("x",), consistency=consistency, skip_determined=skip, **options)
    return _reconstructor(opts, be, ctx.device)


def _photo_row(ctx: Context, rec: Any, label: str, img: np.ndarray, mpp: float, repeats: int,
               **tags: Any) -> dict[str, Any]:
    """One ``bench_photo`` row (seconds per image, median of ``repeats`` after a warm-up) with its tags, the share
    of patches the model saw and the effective TFLOP/s of the U-Net work done."""
    from rawdiff_bench.userview import bench_photo

    h, w = img.shape[:2]
    r = bench_photo(rec, h, w, label=label, repeats=repeats, ms_per_patch=mpp, image=img)
    evaluated = r.evaluated_patches if r.evaluated_patches is not None else r.patches
    row = {**asdict(r), **tags, "evaluated_share": evaluated / r.patches,
           "tflops_effective": ctx.gflop * evaluated * r.evaluations / r.seconds / 1e3,
           "clipped_pixel_share": clipped_share(img), "ratio_to_bound": _finite(r.ratio_to_bound)}
    log.info("photo %s %s: %.3f s (%d of %d patches through the model)", label, tags, r.seconds, evaluated,
             r.patches)
    return row


def _photo_estimate(rec: Any, img: np.ndarray, mpp: float, repeats: int) -> float:
    """Upper estimate (s) of a photo row: warm-up + repeats, every patch through the model, 50 % overhead."""
    n = rec.patches_for(*img.shape[:2])
    return (1 + repeats) * (1.5 * rec.sampler.num_steps * n * mpp / 1e3 + 0.3)


def _interval_union_s(intervals: list[tuple[int, int]]) -> float:
    """Seconds covered by the union of [start, end) intervals given in nanoseconds."""
    total, cur_s, cur_e = 0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e9


def _event_intervals(prof: Any, cuda: bool) -> dict[str, list[tuple[int, int]]]:
    """Intervals (ns) of the profiler's device events: {"kernels": CUDA kernels, "device": kernels and memcpy /
    memset}; on the CPU {"ops": every torch operator}."""
    kinds: dict[str, list[tuple[int, int]]] = {"kernels": [], "device": []} if cuda else {"ops": []}
    for e in prof.profiler.kineto_results.events():
        if ("CUDA" in str(e.device_type())) != cuda:
            continue
        if getattr(e, "is_user_annotation", lambda: False)():  # a range drawn on the GPU's timeline, not work
            continue
        if hasattr(e, "start_ns"):
            s, d = int(e.start_ns()), int(e.duration_ns())
        else:  # older torch
            s, d = int(e.start_us() * 1000), int(e.duration_us() * 1000)
        if cuda:
            kinds["device"].append((s, s + d))
            if not e.name().lower().startswith(("memcpy", "memset")):
                kinds["kernels"].append((s, s + d))
        else:
            kinds["ops"].append((s, s + d))
    return kinds


def busy_probe(device: str, record: dict[str, Any]) -> Callable[[str], contextlib.AbstractContextManager[Any]]:
    """``around`` for ``bench_folder``: profiles each mode's timed run (CUDA activity only on a GPU) and stores, per
    mode, the share of the run's wall time covered by the union of kernel intervals (and kernels + copies)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")

    @contextlib.contextmanager
    def around(mode: str) -> Iterator[None]:
        acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            yield
            if cuda:
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
        kinds = _event_intervals(prof, cuda)
        record[mode] = {"wall_s": wall, "events": {k: len(v) for k, v in kinds.items()},
                        **{f"{k}_busy_share": _interval_union_s(v) / wall for k, v in kinds.items()},
                        "method": "torch.profiler CUDA activity: union of kernel intervals / wall" if cuda else
                        "torch.profiler CPU activity: union of torch operator intervals / wall (no GPU)"}

    return around


def phase_defaults(ctx: Context) -> None:
    """Photos and the folder at rawdiff-infer's defaults (module docstring, 1)."""
    from rawdiff_bench.bench import bench_unet
    from rawdiff_bench.runner import torch_variant
    from rawdiff_bench.userview import bench_folder

    ph = "defaults"
    be = torch_variant(ctx.model, ctx.meta, "cl", ctx.default_dtype, ctx.device, ctx.default_batch)
    be.self_test()
    recs = {(c, s): _default_reconstructor(ctx, be, c, s) for c, s in (("auto", True), ("auto", False),
                                                                        ("off", True))}
    rec = recs[("auto", True)]
    ctx.res.phase(ph, settings={"sampler": rec.sampler.label(), "tiles": asdict(rec.tiles), "dtype": ctx.default_dtype,
                                "backend": be.describe(), "consistent": rec.consistent,
                                "cudnn_benchmark": torch.backends.cudnn.benchmark})
    u = bench_unet(be, batch=ctx.default_batch, variant="torch/cl (defaults)", warmup=1 if ctx.rehearse else 2,
                   repeats=2 if ctx.rehearse else 5, gflop=ctx.gflop)
    mpp = u.ms_median / ctx.default_batch
    ctx.res.phase(ph, unet_at_defaults=asdict(u), ms_per_patch=mpp)
    photos: list[dict[str, Any]] = []
    # in order of value: the defaults, the folder and its GPU-busy share, then consistency and skipping toggled
    todo = [("2048x2048", "auto", True), ("4000x3000", "auto", True), ("folder", "", True), ("busy", "", True),
            ("2048x2048", "off", True), ("2048x2048", "auto", False), ("4000x3000", "off", True),
            ("4000x3000", "auto", False)]
    for label, c, s in todo:
        if label in ("folder", "busy"):
            (_folder_rows if label == "folder" else _profiled_folder)(ctx, rec, mpp, bench_folder)
            continue
        # 12 MP: one timed run after the warm-up (several seconds each, and steady on a GPU)
        repeats = 1 if ctx.rehearse or label == "4000x3000" else 2
        img, what = ctx.inputs.photos[label], f"photo {label} consistency={c} skip={s}"
        if not ctx.fits(ph, what, _photo_estimate(recs[(c, s)], img, mpp, repeats)):
            continue
        with ctx.item(ph, what):
            photos.append(_photo_row(ctx, recs[(c, s)], label, img, mpp, repeats, consistency=c,
                                     skip_determined=s and c != "off"))
            ctx.res.phase(ph, photos=photos)
    ctx.res.phase(ph, not_measured=[{"what": "consistency off + skip", "same_as": "consistency off", "why":
                                     "patch skipping needs consistency (RawReconstructor skips only when it "
                                     "projects)"}])
    _free(be)


def _folder_rows(ctx: Context, rec: Any, mpp: float, bench_folder: Callable[..., Any]) -> None:
    """The folder, sequential against pipelined (images/s, model-busy share from CUDA events)."""
    fh, fw = ctx.inputs.frame_size
    n = ctx.inputs.frames
    est = 2.2 * n * (1.5 * rec.sampler.num_steps * rec.patches_for(fh, fw) * mpp / 1e3 + 0.2)
    what = f"folder of {n} frames {fw}x{fh}"
    if not ctx.fits("defaults", what, est):
        return
    with ctx.item("defaults", what):
        rows = bench_folder(rec, n, fh, fw, ms_per_patch=mpp, max_pack=8, frame=ctx.inputs.frame)
        ctx.state["folder_wall_s"] = sum(r.seconds for r in rows)
        ctx.res.phase("defaults", folder=[{**asdict(r), "ratio_to_bound": _finite(r.ratio_to_bound)} for r in rows])


def _profiled_folder(ctx: Context, rec: Any, mpp: float, bench_folder: Callable[..., Any]) -> None:
    """The folder again under torch.profiler: the GPU-busy share of each loop (``busy_probe``)."""
    fh, fw = ctx.inputs.frame_size
    est = 1.3 * ctx.state.get("folder_wall_s", 1e9) + 10
    if not ctx.fits("defaults", "folder GPU-busy share (profiled pass)", est):
        return
    with ctx.item("defaults", "folder GPU-busy share (profiled pass)"):
        record: dict[str, Any] = {}
        rows = bench_folder(rec, ctx.inputs.frames, fh, fw, ms_per_patch=mpp, max_pack=8, frame=ctx.inputs.frame,
                            around=busy_probe(ctx.device, record))
        for r in rows:
            record[r.mode]["images_per_s_profiled"] = r.images_per_s
            record[r.mode]["model_busy_share_profiled"] = r.model_busy_share
        ctx.res.phase("defaults", folder_busy=record)


# ---- phase 2: the U-Net per call -------------------------------------------------------------------------------------

def _unet_specs(ctx: Context) -> list[tuple[str, str, int, bool]]:
    """(dtype, variant, batch, cudnn.benchmark) in order of value: what a short lease must measure first."""
    b, d = ctx.default_batch, ctx.default_dtype
    if ctx.rehearse:  # every kind of row once (NCHW eager is slow on a CPU: batch 4 only)
        rows = [(d, "cl", b, False), (d, "cl", b, True), (d, "eager", 4, False), (d, "compile", b, False),
                (d, "compile", b, True), (d, "graph", b, False)]
        return rows + ([("fp32", "cl", 4, False), ("fp32", "compile", 4, False)] if d != "fp32" else [])
    # a cudnn.benchmark row right after its plain row reuses that backend (no second compilation)
    return [("fp16", "cl", b, False), ("fp16", "compile", 1024, False), ("fp16", "compile", 1024, True),
            ("fp16", "graph", 1024, False), ("fp16", "cl", 1024, False), ("fp16", "cl", 1024, True),
            ("fp16", "eager", 1024, False), ("fp16", "compile", b, False), ("fp16", "graph", b, False),
            ("bf16", "compile", 1024, False), ("bf16", "graph", 1024, False), ("bf16", "cl", 1024, False),
            ("bf16", "cl", b, False), ("fp16", "eager", b, False), ("fp16", "graph", 1024, True),
            ("bf16", "compile", b, False), ("bf16", "graph", b, False), ("bf16", "eager", 1024, False)]


def _ref_inputs(ctx: Context, batch: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Fixed random inputs of this batch and the fp32 eager NCHW model's eps on them (cached per batch)."""
    cache = ctx.state.setdefault("refs", {})
    if batch not in cache:
        from rawdiff_infer.backends.torch import TorchBackend

        g = torch.Generator().manual_seed(7)
        p = ctx.meta.model.patch_size
        args = (torch.randn(batch, 3, p, p, generator=g), torch.rand(batch, 3, p, p, generator=g) * 2 - 1,
                torch.linspace(1.0, 999.0, batch))
        args = tuple(a.to(ctx.device) for a in args)
        ref_be = TorchBackend(copy.deepcopy(ctx.model), ctx.meta, device=ctx.device, dtype="fp32",
                              channels_last=False)
        cache[batch] = (args, ref_be(*args).float())
        _free(ref_be)
    return cache[batch]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||out - ref|| / ||ref||, max |out - ref|), in fp64; NaN anywhere gives NaN."""
    d = out.double() - ref.double()
    return float(d.norm() / ref.double().norm().clamp_min(1e-30)), float(d.abs().max())


def _unet_estimate(ctx: Context, variant: str, batch: int) -> float:
    """Seconds a row will take: the first call (compilation) as measured so far, plus 16 calls."""
    per_call = ctx.state.get("ms_per_patch_eager", 0.2) * batch / 1e3
    first = {"compile": ctx.state.get("compile_s", 60.0), "graph": 0.6 * ctx.state.get("compile_s", 60.0)}
    return first.get(variant, 2.0) + 16 * per_call + 2


def _unet_row(ctx: Context, dtype: str, variant: str, batch: int, cudnn: bool, keep: dict[str, Any]) -> dict:
    from rawdiff_bench.bench import bench_unet
    from rawdiff_bench.runner import torch_variant

    args, ref = _ref_inputs(ctx, batch)
    torch.backends.cudnn.benchmark = cudnn
    key = (dtype, variant, batch)
    be = keep.pop(key, None)
    if be is None:
        be = torch_variant(ctx.model, ctx.meta, variant, dtype, ctx.device, batch)
    t = time.perf_counter()
    out = be(*args)
    ctx.sync()
    first_s = time.perf_counter() - t
    if variant == "compile" and "compile_s" not in ctx.state:
        ctx.state["compile_s"] = first_s
    rel, mx = _rel_err(out, ref)
    r = bench_unet(be, batch=batch, variant=f"torch/{variant}", warmup=1 if ctx.rehearse else 3,
                   repeats=2 if ctx.rehearse else 10, gflop=ctx.gflop)
    r.dtype = dtype
    if variant in ("eager", "cl") and "ms_per_patch_eager" not in ctx.state:
        ctx.state["ms_per_patch_eager"] = r.ms_median / batch
    keep[key] = be
    return {**asdict(r), "cudnn_benchmark": cudnn, "first_call_s": first_s, "rel_err": rel, "max_abs_err": mx,
            "rel_ok": bool(rel < REL_TOL[dtype]), "describe": be.describe()}


def _winners(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest row per (dtype, batch) and the ratios that say which option wins (> 1: the option is faster)."""
    def tf(dtype: str, variant: str, batch: int, cudnn: bool = False) -> float | None:
        for r in rows:
            if (r["dtype"], r["variant"], r["batch"], r["cudnn_benchmark"]) == (dtype, f"torch/{variant}", batch,
                                                                                  cudnn):
                return r["tflops"]
        return None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    best: dict[str, Any] = {}
    for r in rows:
        k = f"{r['dtype']} batch {r['batch']}"
        if k not in best or r["tflops"] > best[k]["tflops"]:
            best[k] = {"variant": r["variant"], "cudnn_benchmark": r["cudnn_benchmark"], "tflops": r["tflops"],
                       "ms_median": r["ms_median"]}
    out: dict[str, Any] = {"fastest": best}
    for dt in ("fp16", "bf16", "fp32"):
        for b in sorted({r["batch"] for r in rows}):
            k = f"{dt} batch {b}"
            ratios = {"channels_last_over_nchw": ratio(tf(dt, "cl", b), tf(dt, "eager", b)),
                      "cudnn_benchmark_on_over_off (cl)": ratio(tf(dt, "cl", b, True), tf(dt, "cl", b)),
                      "cudnn_benchmark_on_over_off (compile)": ratio(tf(dt, "compile", b, True), tf(dt, "compile", b)),
                      "compile_over_cl": ratio(tf(dt, "compile", b), tf(dt, "cl", b)),
                      "graph_over_compile": ratio(tf(dt, "graph", b), tf(dt, "compile", b))}
            ratios = {n: v for n, v in ratios.items() if v is not None}
            if ratios:
                out[k] = ratios
    fp16 = [r["tflops"] for r in rows if r["dtype"] == "fp16"]
    if fp16:
        out["best_fp16_tflops"] = max(fp16)
        out["goal_300_tflops_fp16_met"] = max(fp16) >= 300
    return out


def phase_unet(ctx: Context) -> None:
    """The U-Net per call (module docstring, 2), then the 2048x2048 image with --compile (--cuda-graph)."""
    ph = "unet"
    rows: list[dict[str, Any]] = []
    keep: dict[Any, Any] = {}
    ctx.res.phase(ph, gflop_per_patch=ctx.gflop)
    for dtype, variant, batch, cudnn in _unet_specs(ctx):
        what = f"{dtype} {variant} batch {batch} cudnn.benchmark={cudnn}"
        if variant == "graph" and not ctx.cuda:
            ctx.skip(ph, what, "CUDA graphs need a GPU")
            continue
        if variant in ("compile", "graph") and ctx.rehearse and not ctx.with_compile:
            ctx.skip(ph, what, "rehearsal without --with-compile: Inductor on this CPU takes minutes")
            continue
        if not ctx.fits(ph, what, _unet_estimate(ctx, variant, batch)):
            continue
        with ctx.item(ph, what):
            rows.append(_unet_row(ctx, dtype, variant, batch, cudnn, keep))
            r = rows[-1]
            log.info("U-Net %s: %.2f ms, %.1f TFLOP/s, rel err %.1e", what, r["ms_median"], r["tflops"], r["rel_err"])
            ctx.res.phase(ph, rows=rows, winners=_winners(rows))
        be = keep.get((dtype, variant, batch))
        if be is not None and (dtype, variant, batch, cudnn) == _profile_target(ctx):
            _profile_row(ctx, be, batch, what)
        if be is not None and (variant, batch, dtype, cudnn) == ("compile", ctx.default_batch, ctx.default_dtype,
                                                                 False):
            _compiled_photo(ctx, be, rows[-1]["ms_median"] / batch)
        for k in [k for k in keep if k != (dtype, variant, batch) or k[1] == "graph"]:
            _free(keep.pop(k))  # keep only the backend a cudnn.benchmark toggle may reuse next
    torch.backends.cudnn.benchmark = False
    _free(*keep.values())


def _compiled_photo(ctx: Context, be: Any, mpp: float) -> None:
    """The 2048x2048 image at the defaults plus --compile, and plus --compile --cuda-graph (whole-step graph)."""
    img = ctx.inputs.photos["2048x2048"]
    rows = ctx.res.data["phases"].setdefault("defaults", {}).setdefault("photos_fast", [])
    torch.backends.cudnn.benchmark = False
    for graph in (False, True):
        what = "photo 2048x2048 --compile" + (" --cuda-graph" if graph else "")
        if graph and not ctx.cuda:
            ctx.skip("unet", what, "CUDA graphs need a GPU")
            continue
        rec = _default_reconstructor(ctx, be, compile=True, cuda_graph=graph)
        if not ctx.fits("unet", what, _photo_estimate(rec, img, mpp, 2) + (10 if graph else 0)):
            continue
        with ctx.item("unet", what):
            rows.append(_photo_row(ctx, rec, "2048x2048", img, mpp, 1 if ctx.rehearse else 2, consistency="auto",
                                   skip_determined=not graph, compile=True, cuda_graph=graph))
            ctx.res.phase("defaults", photos_fast=rows)
        rec.close()


def _profile_target(ctx: Context) -> tuple[str, str, int, bool]:
    """The row whose kernels are profiled: compiled (no graph: the profiler then sees every kernel) at batch 1024 on
    the GPU; channels_last at the defaults' batch in a rehearsal without compiles."""
    if ctx.rehearse:
        return (ctx.default_dtype, "compile" if ctx.with_compile else "cl", ctx.default_batch, False)
    return (ctx.default_dtype, "compile", 1024, False)


def _profile_row(ctx: Context, be: Any, batch: int, what: str) -> None:
    """Where one call of this backend spends its device time (``bench.profile_unet``: kernel categories)."""
    from rawdiff_bench.bench import profile_unet

    if not ctx.fits("unet", f"kernel profile of {what}", 10.0):
        return
    with ctx.item("unet", f"kernel profile of {what}"):
        prof = profile_unet(be, batch=batch, calls=3 if ctx.cuda else 1)
        ctx.res.phase("unet", profile={**prof, "of": what})


# ---- phase 3: correctness ----------------------------------------------------------------------------------------

def _graph_vs_eager(ctx: Context, device: str) -> dict[str, Any]:
    """The bundled model's CUDA-graph replay (padded batch) against eager on ``device`` (fp16/defaults' dtype)."""
    from rawdiff_infer.backends.torch import TorchBackend

    g = torch.Generator().manual_seed(3)
    p = ctx.meta.model.patch_size
    x, c = torch.randn(40, 3, p, p, generator=g), torch.rand(40, 3, p, p, generator=g) * 2 - 1
    t = torch.linspace(5.0, 995.0, 40)
    eager = TorchBackend(copy.deepcopy(ctx.model), ctx.meta, device=device, dtype=ctx.default_dtype)
    graphed = TorchBackend(copy.deepcopy(ctx.model), ctx.meta, device=device, dtype=ctx.default_dtype,
                           cuda_graph=True, max_batch_size=64)
    args = tuple(v.to(device) for v in (x, c, t))
    a, b = graphed(*args), eager(*args)
    a2 = graphed(*(v.flip(0) for v in args))  # a second replay with other data
    rel, mx = _rel_err(a, b)
    rel2, _ = _rel_err(a2, b.flip(0))
    _free(eager, graphed)
    return {"device": device, "current_device": torch.cuda.current_device(), "rel_err": rel, "max_abs_err": mx,
            "rel_err_second_replay": rel2, "ok": bool(max(rel, rel2) < REL_TOL[ctx.default_dtype])}


def _step_graph_vs_eager(ctx: Context, device: str) -> dict[str, Any]:
    """The whole-step CUDA graph with the consistency projection against the eager step, on a real crop with
    highlights (bundled model, defaults' dtype, step fusion, no patch skipping inside a graph)."""
    from rawdiff_bench.runner import torch_variant
    from rawdiff_infer.consistency import ConsistencyConfig
    from rawdiff_infer.pipeline import RawReconstructor, SamplerConfig
    from rawdiff_infer.tiling import TileConfig

    be = torch_variant(ctx.model, ctx.meta, "cl", ctx.default_dtype, device, ctx.default_batch)
    tiles = TileConfig(patch_size=be.patch_size, stride=48, batch_size=ctx.default_batch)
    recs = [RawReconstructor(be, sampler=SamplerConfig(), tiles=tiles, step_graph=sg,
                             consistency=ConsistencyConfig(skip=False)) for sg in (True, False)]
    diffs = []
    for seed, img in enumerate((bright_crop(ctx.inputs.photos["2048x2048"], 256, 192),
                                bright_crop(ctx.inputs.pan, 256, 192))):
        a, b = (r.reconstruct(img, seed=seed) for r in recs)
        assert a.extra["step_graph"] and not b.extra["step_graph"]
        diffs.append(float(np.abs(a.encoded - b.encoded).max()))
    for r in recs:
        r.close()
    _free(be)
    return {"device": device, "max_abs_diff_each": diffs, "ok": bool(max(diffs) < 1e-3),
            "what": "dpm-sde 10 with consistency, 256x192 crops, graph reused for the second image"}


def _pinned_vs_plain(ctx: Context) -> dict[str, Any]:
    """Pinned staging and copy-stream transfers against plain copies (bit for bit), and the folder runner's outputs
    against each image alone (max |diff| of the encoded RAW), without and with packing."""
    from rawdiff_bench.runner import torch_variant
    from rawdiff_infer.plan import Job
    from rawdiff_infer.rawspace import host_srgb
    from rawdiff_infer.runner import FolderRunner
    from rawdiff_infer.transfer import DeviceTransfer

    imgs = {"a.jpg": bright_crop(ctx.inputs.photos["2048x2048"], 160, 128),
            "b.jpg": bright_crop(ctx.inputs.pan, 128, 96),
            "c.jpg": bright_crop(ctx.inputs.photos["4000x3000"], 96, 160)}
    tr = DeviceTransfer(ctx.device)
    staged = tr.stage(imgs["a.jpg"])
    up = tr.upload(staged)
    plain = host_srgb(imgs["a.jpg"]).to(ctx.device)
    ctx.sync()
    x = torch.randn(3, 64, 96, device=ctx.device)
    down = tr.download(x).result()
    out: dict[str, Any] = {"pinned": bool(staged.is_pinned()) if ctx.cuda else None,
                           "upload_equal": bool(torch.equal(up, plain)),
                           "download_equal": bool(np.array_equal(down, x.cpu().numpy()))}
    be = torch_variant(ctx.model, ctx.meta, "cl", ctx.default_dtype, ctx.device, ctx.default_batch)
    rec = _default_reconstructor(ctx, be)
    alone = {k: rec.reconstruct(v, seed=0).encoded for k, v in imgs.items()}
    for pack in (1, 8):
        got: dict[str, np.ndarray] = {}
        runner = FolderRunner(rec, decode=lambda j: imgs[j.source.name],
                              write=lambda j, r, px: got.__setitem__(j.source.name, r.encoded), seed=0, fail_on=(),
                              max_pack=pack)
        runner.run([Job(Path(k), {}) for k in imgs])
        out[f"runner_max_pack_{pack}"] = {"max_abs_diff": max(float(np.abs(got[k] - alone[k]).max()) for k in imgs),
                                          "packs": runner.stats.packs, "images": len(got)}
    _free(be)
    out["ok"] = bool(out["upload_equal"] and out["download_equal"] and out["runner_max_pack_1"]["max_abs_diff"]
                     < 1e-6 and out["runner_max_pack_8"]["max_abs_diff"] < 1e-3 and out["pinned"] is not False)
    return out


def _gpu_test_files(tests_dir: Path) -> list[Path]:
    return sorted(p for p in tests_dir.glob("test_*.py") if "mark.gpu" in p.read_text(errors="replace"))


def _parse_junit(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    cases = []
    for tc in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                cases.append({"test": f"{tc.get('classname')}::{tc.get('name')}", "outcome": outcome,
                              "message": (el.get("message") or "")[:300]})
                break
        else:
            cases.append({"test": f"{tc.get('classname')}::{tc.get('name')}", "outcome": outcome,
                          "seconds": float(tc.get("time") or 0)})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {**counts, "total": len(cases), "cases": cases}


def _gpu_tests(ctx: Context, timeout_s: float) -> dict[str, Any]:
    """Every ``gpu``-marked test, in a pytest subprocess (its own process group, killed at ``timeout_s``)."""
    from rawdiff_infer.fsio import open_append

    assert ctx.tests_dir is not None
    files = _gpu_test_files(ctx.tests_dir)
    xml, logf = ctx.out / "gpu_tests.xml", ctx.out / "gpu_tests.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rA", f"--junitxml={xml}",
           *map(str, files)]
    t = time.perf_counter()
    with open_append(logf) as f:  # the test run's own output, streamed
        proc = subprocess.Popen(cmd, cwd=ctx.tests_dir.parent, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    res: dict[str, Any] = {"returncode": rc, "seconds": time.perf_counter() - t, "files": [p.name for p in files],
                           "command": " ".join(cmd[1:])}
    if xml.exists():
        res.update(_parse_junit(xml))
    res["ok"] = rc == 0 and res.get("failed", 1) == 0 and res.get("error", 1) == 0
    return res


def phase_correctness(ctx: Context) -> None:
    """Correctness on the device (module docstring, 3); AOTInductor's check follows its build in phase 4."""
    ph = "correctness"
    rows = ctx.res.data["phases"].get("unet", {}).get("rows", [])
    ctx.res.phase(ph, unet_variants_vs_fp32=[{k: r[k] for k in ("dtype", "variant", "batch", "cudnn_benchmark",
                                                                   "rel_err", "max_abs_err", "rel_ok")} for r in rows])
    checks: list[tuple[str, Callable[[], dict[str, Any]], str | None]] = [
        ("cuda_graph_vs_eager", lambda: _graph_vs_eager(ctx, ctx.device), None if ctx.cuda else "needs CUDA"),
        ("cuda_graph_vs_eager_other_device", lambda: _other_device(ctx),
         None if torch.cuda.device_count() > 1 else ("skipped: one GPU" if ctx.cuda else "needs CUDA (two GPUs)")),
        ("step_graph_vs_eager", lambda: _step_graph_vs_eager(ctx, ctx.device), None if ctx.cuda else "needs CUDA"),
        ("pinned_vs_plain", lambda: _pinned_vs_plain(ctx), None)]
    for name, fn, why_not in checks:
        if why_not is not None:
            ctx.res.phase(ph, **{name: {"skipped": why_not}})
            continue
        if ctx.fits(ph, name, 30 if ctx.cuda else 20):
            with ctx.item(ph, name):
                ctx.res.phase(ph, **{name: fn()})
    if ctx.tests_dir is None or not ctx.tests_dir.is_dir():
        ctx.res.phase(ph, gpu_tests={"skipped": "no tests folder beside the package"})
        return
    left = ctx.until[ph] - elapsed()
    if ctx.fits(ph, "gpu-marked tests", 15.0):
        with ctx.item(ph, "gpu-marked tests"):
            ctx.res.phase(ph, gpu_tests=_gpu_tests(ctx, left))


def _other_device(ctx: Context) -> dict[str, Any]:
    """Graph replay and the step graph on cuda:1 while cuda:0 is the current device."""
    with torch.cuda.device(0):
        r = _graph_vs_eager(ctx, "cuda:1")
        s = _step_graph_vs_eager(ctx, "cuda:1")
    return {"per_batch_graph": r, "step_graph": s, "ok": bool(r["ok"] and s["ok"])}


# ---- phase 4: compile cost ---------------------------------------------------------------------------------------

#: compile_cost phase -> (phases it needs, seconds to plan for it on the GPU), in the order they run: the AOTInductor
#: package first (it also serves the AOTInductor-against-eager check); each phase has its own cache folder, so the
#: order leaves "cold" cold
_COMPILE_PLAN = {"eager-first": ((), 20), "aoti-build": ((), 110), "aoti-first": (("aoti-build",), 25),
                 "compile-cold": ((), 70), "compile-warm": (("compile-cold",), 35),
                 "steady": (("compile-cold", "aoti-build"), 40)}


def phase_compile(ctx: Context) -> None:
    """``compile_cost``'s phases in fresh processes (module docstring, 4), then AOTInductor CUDA against eager."""
    ph = "compile"
    work = Path(tempfile.mkdtemp(prefix="rawdiff-gpu-measure-"))
    o = {"model": ctx.model_spec[0], "config": ctx.model_spec[1], "device": ctx.device,
         "batch": ctx.default_batch, "patch": ctx.meta.model.patch_size, "max_batch": ctx.default_batch,
         "repeats": 5 if ctx.cuda else 2, "workdir": str(work), "dtype": ctx.default_dtype}
    ctx.res.phase(ph, options=o)
    try:
        _compile_phases(ctx, o, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _compile_phases(ctx: Context, o: dict[str, Any], work: Path) -> None:
    """Each of ``_COMPILE_PLAN`` that fits (``compile_cost._spawn``: a fresh process), in ``work``."""
    from rawdiff_bench import compile_cost

    ph = "compile"
    done: set[str] = set()
    assert set(_COMPILE_PLAN) == set(compile_cost.PHASES)
    for name, (needs, est) in _COMPILE_PLAN.items():
        if ctx.rehearse and not ctx.with_compile and name != "eager-first":
            ctx.skip(ph, name, "rehearsal without --with-compile: Inductor / AOTInductor on this CPU take minutes")
            continue
        if not set(needs) <= done:
            ctx.skip(ph, name, f"needs {', '.join(sorted(set(needs) - done))}")
            continue
        if not ctx.fits(ph, name, est if ctx.cuda else 4 * est):
            continue
        with ctx.item(ph, name):
            ctx.res.phase(ph, **{name: compile_cost._spawn(name, o)})
            done.add(name)
        if name == "aoti-build" and name in done:
            with ctx.item("correctness", "aoti_vs_eager"):
                from rawdiff_export.aoti_export import aoti_parity

                err, what = aoti_parity(work / "model.pt2", ctx.model, batch=min(64, ctx.default_batch))
                tol = REL_TOL.get(ctx.default_dtype, 1e-2)
                ctx.res.phase("correctness", aoti_vs_eager={"max_rel_err": err, "reference": what,
                                                            "ok": bool(err < tol), "tolerance": tol})
    if "aoti-build" not in done:
        ctx.res.phase("correctness", aoti_vs_eager={"skipped": "no AOTInductor package was built in this run "
                                                               "(see compile.skipped / errors)"})


# ---- the run ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunArgs:
    """The command line of ``run`` (deadlines in seconds since the start)."""

    inputs: str
    out: str
    rehearse: bool = False
    with_compile: bool = False
    frames: int = 32
    defaults_until: float = 145.0
    unet_until: float = 320.0
    correctness_until: float = 410.0
    compile_until: float = 565.0
    skip: tuple[str, ...] = ()
    device: str = "auto"


@contextlib.contextmanager
def _logging(out: Path) -> Iterator[None]:
    """Inside: INFO records to stdout and, line-buffered, to out/log.txt (appended through ``fsio.open_append``)."""
    from rawdiff_infer.fsio import open_append

    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    logfile = io.TextIOWrapper(open_append(out / "log.txt"), line_buffering=True)
    handlers = [logging.StreamHandler(stream) for stream in (sys.stdout, logfile)]
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    writers = logging.getLogger("rawdiff_infer.io.writers")  # one line per frame written: 128 lines of noise
    writers_level = writers.level
    writers.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for h in handlers:
            root.removeHandler(h)
        root.setLevel(level)
        writers.setLevel(writers_level)
        logfile.close()


def _context(args: RunArgs, res: Any, device: str) -> Context:
    """Model (bundled, or the tiny config with the bundled model's ISP for the rehearsal), inputs, defaults."""
    from rawdiff_bench.bench import flops_per_patch
    from rawdiff_bench.compile_cost import _load_model
    from rawdiff_infer.cli import InferOptions, _batch_size, _dtype

    spec = ("random", "tiny") if args.rehearse else ("bundled", "paper")
    model, meta = _load_model("bundled", "paper")
    if args.rehearse:  # the tiny U-Net with the bundled model's camera, schedule and ISP: consistency runs
        model, tiny = _load_model(*spec)
        meta = dataclasses.replace(meta, model=tiny.model)
    opts = InferOptions(inputs=("x",))
    tests = Path(__file__).resolve().parents[1] / "tests"
    return Context(res=res, out=Path(args.out), device=device, rehearse=args.rehearse, with_compile=args.with_compile,
                   model=model.float().eval(), meta=meta, model_spec=spec,
                   inputs=load_inputs(Path(args.inputs), args.rehearse, args.frames),
                   gflop=flops_per_patch(meta.model, meta.model.patch_size) / 1e9,
                   default_batch=_batch_size(opts, device), default_dtype=_dtype(opts, device),
                   until={"defaults": args.defaults_until, "unet": args.unet_until,
                          "correctness": args.correctness_until, "compile": args.compile_until},
                   tests_dir=tests if tests.is_dir() else None)


def run_measure(args: RunArgs) -> dict[str, Any]:
    """Every phase in order, each within its deadline; returns results.json's data (errors are recorded there)."""
    global T0
    T0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _logging(out):
        return _run_phases(args, out)


def _run_phases(args: RunArgs, out: Path) -> dict[str, Any]:
    from rawdiff_bench.bench import environment
    from rawdiff_bench.gpu_session import Results, _matmul_tflops

    res = Results(out / "results.json")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    res.set("args", asdict(args))
    res.set("env", {**environment(), "device": device, "gpus": torch.cuda.device_count(),
                    "mode": "rehearsal (CPU, tiny model)" if args.rehearse else "measurement"})
    if device.startswith("cuda"):
        res.set("env", {**res.data["env"], "matmul_fp16_tflops": _matmul_tflops(device)})
    ctx = _context(args, res, device)
    res.set("setup", {"model": ctx.model_spec, "gflop_per_patch": ctx.gflop, "default_batch": ctx.default_batch,
                      "default_dtype": ctx.default_dtype, "photos": {k: list(v.shape) for k, v in
                                                                       ctx.inputs.photos.items()},
                      "frames": ctx.inputs.frames, "frame_size_hw": list(ctx.inputs.frame_size),
                      "clipped_pixel_share": {k: clipped_share(v) for k, v in ctx.inputs.photos.items()},
                      "seconds": elapsed()})
    for name, fn in (("defaults", phase_defaults), ("unet", phase_unet), ("correctness", phase_correctness),
                     ("compile", phase_compile)):
        if name in args.skip:
            res.phase(name, skipped_phase="--skip " + name)
            continue
        t = time.perf_counter()
        with ctx.item(name, "phase"):
            fn(ctx)
        res.phase(name, seconds=time.perf_counter() - t, ended_at_s=elapsed())
        log.info("phase %s done at %.0f s", name, elapsed())
    torch.backends.cudnn.benchmark = False
    res.set("total_seconds", elapsed())
    print(summary(res.data), flush=True)
    return res.data


def summary(data: dict[str, Any]) -> str:
    """A short plain-text table of the headline figures (the device reply carries the end of the output)."""
    ph = data.get("phases", {})
    lines = [f"== gpu_measure: {data.get('env', {}).get('gpu') or data.get('env', {}).get('cpu')} "
             f"({data.get('env', {}).get('mode')}), {data.get('total_seconds', 0):.0f} s"]
    for r in ph.get("defaults", {}).get("photos", []) + ph.get("defaults", {}).get("photos_fast", []):
        lines.append(f"photo {r['label']:>9} consistency={r['consistency']:<4} skip={r['skip_determined']!s:<5}"
                     f"{' compile' if r.get('compile') else ''}{' graph' if r.get('cuda_graph') else ''}: "
                     f"{r['seconds']:.3f} s, model saw {r['evaluated_share']:.0%} of {r['patches']} patches")
    for r in ph.get("defaults", {}).get("folder", []):
        lines.append(f"folder {r['mode']:<10}: {r['images_per_s']:.2f} images/s, "
                     f"model busy {r['model_busy_share']:.0%}")
    for mode, r in ph.get("defaults", {}).get("folder_busy", {}).items():
        share = r.get("kernels_busy_share", r.get("ops_busy_share"))
        lines.append(f"folder {mode:<10}: busy {share:.0%} (profiled, {r['images_per_s_profiled']:.2f} images/s)")
    for r in ph.get("unet", {}).get("rows", []):
        lines.append(f"unet {r['dtype']} {r['variant']:<13} b{r['batch']:<5} cudnn.bm={r['cudnn_benchmark']!s:<5}: "
                     f"{r['ms_median']:8.2f} ms {r['tflops']:7.1f} TFLOP/s rel err {r['rel_err']:.1e}")
    c = ph.get("correctness", {})
    for k in ("cuda_graph_vs_eager", "cuda_graph_vs_eager_other_device", "step_graph_vs_eager", "pinned_vs_plain",
              "aoti_vs_eager"):
        if k in c:
            lines.append(f"{k}: " + ("ok" if c[k].get("ok") else c[k].get("skipped", "FAILED")))
    g = c.get("gpu_tests", {})
    if g:
        lines.append(f"gpu tests: {g.get('passed')} passed, {g.get('failed')} failed, {g.get('error')} errors, "
                     f"{g.get('skipped')} skipped (rc {g.get('returncode')})")
    for k, v in ph.get("compile", {}).items():
        if k == "steady" and isinstance(v, dict):
            lines.append("compile steady ms/batch: " + ", ".join(f"{n} {v[f'{n}_ms']['median']:.1f}" for n in
                                                                  ("eager", "compiled", "aoti") if f"{n}_ms" in v))
        elif isinstance(v, dict) and "process_wall_s" in v:
            lines.append(f"compile {k}: first eps / build {v.get('first_eps_s', v.get('build_s', float('nan'))):.1f} s"
                         f" (process {v['process_wall_s']:.1f} s)")
    lines.append(f"errors: {len(data.get('errors', []))}; skipped: "
                 f"{sum(len(p.get('skipped', [])) for p in ph.values() if isinstance(p, dict))}")
    return "\n".join(lines)


# ---- the command line --------------------------------------------------------------------------------------------

def _seconds() -> click.ParamType:
    from rawdiff_train.cli import FiniteFloat

    return FiniteFloat(0.0)


@click.group(help=__doc__, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli() -> None:
    pass


@cli.command()
@click.option("--photos", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="Photo folder(s) to take the inputs from (e.g. ../shared/data/train-photos).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the inputs (e.g. "
              ".gpu/measure, which git ignores).")
def prep(photos: tuple[str, ...], out: str) -> None:
    """Write the run's inputs: a 2048x2048 and a 4000x3000 photo and a 1920x1200 pan (JPEG), manifest.json."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    m = prepare_inputs([Path(p) for p in photos], Path(out))
    click.echo(f"{out}: {sum(v['bytes'] for v in m.values()) / 2**20:.1f} MiB in {len(m)} images")


@cli.command()
@click.option("--inputs", required=True, type=click.Path(exists=True, file_okay=False),
              help="The folder ``prep`` wrote.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="results.json, log.txt, gpu_tests.*")
@click.option("--rehearse", is_flag=True, help="CPU rehearsal: tiny model, tiny crops, every phase.")
@click.option("--with-compile", is_flag=True, help="Rehearsal: also run the Inductor / AOTInductor compiles.")
@click.option("--frames", type=click.IntRange(2, 1000), default=32, show_default=True, help="Frames in the folder.")
@click.option("--defaults-until", type=_seconds(), default=145.0, show_default=True, help="Seconds since start.")
@click.option("--unet-until", type=_seconds(), default=320.0, show_default=True)
@click.option("--correctness-until", type=_seconds(), default=410.0, show_default=True)
@click.option("--compile-until", type=_seconds(), default=565.0, show_default=True)
@click.option("--skip", multiple=True, type=click.Choice(PHASE_NAMES), help="Leave this phase out; repeat.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
def run(**opts: Any) -> None:
    """Measure (or rehearse) every phase; see the module docstring."""
    run_measure(RunArgs(**opts))


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m rawdiff_bench.gpu_measure {prep,run} ...``."""
    cli.main(args=argv, prog_name="python -m rawdiff_bench.gpu_measure")


if __name__ == "__main__":
    main()
