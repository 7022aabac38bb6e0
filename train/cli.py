"""rawdiff-train: train the paper's model on your camera's RAW files or on plain photos (synthetic camera).

A thin click layer over the library: every option is checked before any work (numbers finite and in range,
the device usable, the training configuration consistent), every problem is one line on stderr, and the exit
status means something:

| status | meaning |
|---|---|
| 0 | trained (a checkpoint was written) |
| 1 | the data, a checkpoint or the run failed (unreadable photos, --init not a checkpoint, divergence, ...) |
| 2 | bad command line or output folder (checked before any compute) |
| 130 / 143 / 129 | interrupted by Ctrl-C / SIGTERM / SIGHUP (the last checkpoint is intact; --resume continues) |
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from pathlib import Path
from dataclasses import dataclass, fields
from typing import Any

from rawdiff_infer.startup import begin_command

begin_command("rawdiff-train", __file__)  # before the heavy imports: closed streams, Ctrl-C while importing

import click  # noqa: E402

from rawdiff_infer.console import OneLineCommand
from rawdiff_infer.messages import first_line, show_path

__all__ = ["main", "cli", "build_data", "training_isp", "FiniteFloat", "formulation_options", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]

log = logging.getLogger("rawdiff.train")

PROG = "rawdiff-train"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

HELP = """Train rawdiff's conditional diffusion U-Net.

\b
Data, one of:
  --photos DIR   plain sRGB photos (repeat the option to combine folders); a synthetic camera (--camera) turns
                 each into --variants training pairs (RAW target by inverting the camera's fixed ISP, sRGB input
                 re-rendered from it), with random scene exposure, illuminant, hue and saturation
                 (--scene-aug, on by default) and JPEG quality. The held-out photos (rawdiff_train.heldout:
                 kodim03, kodim07, kodim13, grace_hopper) never train; they are the validation images.
  --raw DIR      RAW files of one camera, InvISP protocol (sRGB rendered by LibRaw with the camera white
                 balance, JPEG quality 90; RAW target demosaiced, white-balanced, gamma 1/2.2).
  --fivek DIR    the same, with InvISP's train/test list files if given (--train-list / --test-list).

Defaults are the paper's recipe: 64x64 patches, batch 256, Adam, 1k warm-up to 2e-4 then cosine to 2e-6,
gradient-norm clip 1, 20k steps, eps-MSE; plus EMA weights (saved as the inference checkpoint).

Every saved model describes the ISP that renders its data's RAW to sRGB ("isp", for ISP-consistent inference):
the synthetic camera's own; LibRaw's render of the RAW files (one per camera; fitted to the pairs where the
files' renders differ, with the fit's residual in the provenance).

Exit status: 0 done, 1 data / checkpoint / run failure (including divergence: no non-finite checkpoint is ever
written), 2 bad command line, 130 / 143 / 129 interrupted (the last checkpoint is intact).

\b
Examples:
  rawdiff-train --photos photos/ --out runs/synth --steps 20000
  rawdiff-train --photos shared/data/photos --photos train/photos --out runs/synth --init rawdiff_infer/weights
  rawdiff-train --raw nikon_d700/ --out runs/d700 --compile
  torchrun --nproc-per-node 4 -m rawdiff_train.cli --raw nikon_d700/ --out runs/d700   # 4 GPUs, same results
  rawdiff-train --photos photos/ --out runs/synth --resume                              # continue from latest
"""


class _Fail(Exception):
    """A user-facing failure: one line, and the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _err(msg: str) -> None:
    """``rawdiff-train: <msg>`` on stderr, one line (never failing: a closed stderr is not an error)."""
    from rawdiff_infer.console import Console

    Console(PROG).err(msg)


class FiniteFloat(click.ParamType):
    """A finite real number in a range: 'nan', 'inf' and out-of-range values are command-line errors.

    Args:
        lo, hi: bounds (None: unbounded); ``lo_open`` / ``hi_open`` exclude them.
    """

    name = "number"

    def __init__(self, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False) -> None:
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def _describe(self) -> str:
        left = "(" if self.lo_open or self.lo is None else "["
        right = ")" if self.hi_open or self.hi is None else "]"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{left}{lo}, {hi}{right}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        below = self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo))
        above = self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi))
        if below or above:
            self.fail(f"{v:g} is not in {self._describe()}", param, ctx)
        return v

    def __repr__(self) -> str:
        return f"FiniteFloat{self._describe()}"


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value == "auto":
        return value
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{value!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter(f"{value}: CUDA is not available on this machine") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise click.BadParameter(f"{value}: there are {torch.cuda.device_count()} CUDA devices") from None
    elif dev.type != "cpu":
        raise click.BadParameter(f"{value}: use auto, cpu, cuda or cuda:N") from None
    return value


def _check_camera(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from rawdiff_infer.camera import get_camera

    try:
        get_camera(value)
    except ValueError as e:
        raise click.BadParameter(first_line(e)) from None
    return value


def build_data(photos, raw, fivek, *, camera, variants, wb, train_list, test_list, val_count, seed, cache,
               augmentation=None):
    """Training and validation pairs for the chosen data.

    ``photos``: one folder or a sequence of folders (their photos are combined; two photos of the same name are
    an error). The held-out photos (``heldout.split_held_out``) are never training pairs: they are the
    validation photos (up to ``val_count``); if fewer are present, the rest of the validation photos is a
    seeded random split of the others, as for RAW files. ``augmentation`` (``SceneAugmentation`` or None) acts
    on the training pairs only: validation pairs are the plain synthetic camera, comparable across runs.

    Returns (training pairs, validation pairs, camera description, provenance dict). Raises ``PhotoError``,
    ``RawFileError``, ``OSError`` or ``ValueError`` with a one-line message for unusable data.
    """
    if photos:
        return _photo_data(photos, camera=camera, variants=variants, val_count=val_count, seed=seed,
                           augmentation=augmentation)
    return _raw_data(raw or fivek, camera=camera, wb=wb, train_list=train_list, test_list=test_list,
                     val_count=val_count, seed=seed, cache=cache)


def _photo_split(folders: list, val_count: int, seed: int) -> tuple[list, list, list]:
    """(training files, validation files, held-out files) of photo folders (see ``build_data``)."""
    from .data import PHOTO_EXTENSIONS, PhotoError, list_photos
    from .fivek import split_files
    from .heldout import sort_held_out, split_held_out

    files = list_photos(folders)
    train_files, held = split_held_out(files)
    held = sort_held_out(held)
    where = ", ".join(show_path(f) for f in folders)
    if held:
        log.info("held out of training (validation only): %s", ", ".join(f.name for f in held))
    val_files = held[:val_count]
    if len(val_files) < val_count and train_files:
        more = val_count - len(val_files)
        if len(train_files) <= more:
            raise PhotoError(f"{where}: {len(train_files)} training photos, need more than the {more} "
                             f"validation photos still needed for --val-count {val_count}")
        train_files, extra = split_files(train_files, test_fraction=more / len(train_files), seed=seed)
        val_files += extra
    if not files:
        raise PhotoError(f"{where}: no photos ({', '.join(PHOTO_EXTENSIONS)})")
    if not train_files:
        raise PhotoError(f"{where}: no photos to train on ({len(files)} found, {len(held)} of them held out)")
    return train_files, val_files, held


def _photo_data(photos, *, camera, variants, val_count, seed, augmentation):
    from rawdiff_infer.camera import get_camera

    from .camera_isp import described_camera
    from .data import PhotoPairSource

    folders = [photos] if isinstance(photos, (str, os.PathLike)) else list(photos)
    train_files, val_files, held = _photo_split(folders, val_count, seed)
    cam = described_camera(get_camera(camera))
    rnd = _randomization()
    src = PhotoPairSource(train_files, camera=cam, randomization=rnd, seed=seed, augmentation=augmentation)
    pairs = []
    for epoch in range(variants):
        src.set_epoch(epoch)
        pairs.extend(src[i] for i in range(len(src)))
    val_src = PhotoPairSource(val_files, camera=cam, randomization=rnd, seed=seed + 10_000)
    val = [val_src[i] for i in range(len(val_src))]
    desc = {"data": "synthetic camera over photos", "camera": camera,
            "photo_folders": [str(f) for f in folders], "train_files": [f.name for f in train_files],
            "val_files": [f.name for f in val_files], "held_out_files": [f.name for f in held],
            "variants_per_photo": variants,
            "scene_augmentation": augmentation.to_dict() if augmentation is not None else None}
    return pairs, val, cam, desc


def _raw_data(root, *, camera, wb, train_list, test_list, val_count, seed, cache):
    from rawdiff_infer.camera import Camera, get_camera

    from .data import RawPairSource, list_files
    from .fivek import RAW_EXTENSIONS, read_list_file, select_by_stem, split_files

    files = list_files(root, RAW_EXTENSIONS)
    if not files:
        raise ValueError(f"{show_path(root)}: no RAW files ({', '.join(RAW_EXTENSIONS)})")
    if train_list:
        train_files = select_by_stem(files, read_list_file(train_list))
        test_files = select_by_stem(files, read_list_file(test_list)) if test_list else []
    else:
        train_files, test_files = split_files(files, test_fraction=0.15, seed=seed)
    src = RawPairSource(train_files, wb=wb, cache_dir=cache)
    pairs = [src[i] for i in range(len(src))]
    val_src = RawPairSource(test_files[:val_count] if test_files else [], wb=wb, cache_dir=cache)
    val = [val_src[i] for i in range(len(val_src))]
    cam_meta = (pairs[0].meta if pairs else {}).get("camera_description")
    cam = Camera.from_dict(cam_meta) if isinstance(cam_meta, dict) else get_camera(camera)
    desc = {"data": "InvISP protocol over RAW files", "root": str(root), "train_files": len(train_files),
            "test_files": len(test_files), "wb": wb}
    return pairs, val, cam, desc


def _randomization():  # noqa: ANN202 - camera_isp.IspRandomization, imported lazily
    """The synthetic camera's ISP draws for --photos: the defaults (one fixed ISP: gain 2, tone 0.5)."""
    from .camera_isp import IspRandomization

    return IspRandomization()


def training_isp(photos: bool, pairs: list, camera: Any, *, wb: str = "camera") -> tuple[Any, dict[str, Any]]:
    """The ISP a model trained on ``pairs`` renders with (``ModelMeta.isp``), and how it was found (provenance).

    Args:
        photos: True for the synthetic camera (``--photos``), False for RAW files (``--raw`` / ``--fivek``).
        pairs: the training ``data.ImagePair`` list ``build_data`` returned.
        camera: the ``Camera`` ``build_data`` returned (the synthetic camera's colour matrix).
        wb: the RAW pairs' white balance ('camera' or 'daylight').
    Returns (IspModel or None, provenance dict). Photos: exactly ``SyntheticCamera(camera).isp_model()`` of the
    draws the pairs were made with. RAW files: LibRaw's render of each training file (``fivek.libraw_isp``, kept
    in the pair's metadata, or from the file for pairs cached before it was); if every file agrees, that ISP,
    with its residual on the training pairs (demosaicing and JPEG are not in it); else an ISP fitted to the
    training pairs (``isp_fit.fit_isp``), with the fit's residual. Raises RawFileError / ValueError (one line).
    """
    from rawdiff_infer.isp import IspModel

    from .camera_isp import SyntheticCamera
    from .isp_fit import common_isp, fit_isp, isp_residual

    if photos:
        isp = SyntheticCamera(camera).isp_model(_randomization())
        return isp, {"source": "the synthetic camera's own ISP (exact)" if isp is not None
                     else "none (the synthetic camera draws its gain or tone per image)"}
    from .fivek import libraw_isp

    if not pairs:
        return None, {"source": "none (no training pairs)"}
    isps = [IspModel.from_dict(p.meta["isp"]) if p.meta.get("isp") is not None
            else libraw_isp(p.meta["path"], wb=wb) for p in pairs]
    srgb, raw = [p.srgb for p in pairs], [p.raw for p in pairs]
    isp = common_isp(isps)
    if isp is not None:
        return isp, {"source": "LibRaw's render (InvISP protocol, fivek.libraw_isp), the same for all "
                     f"{len(isps)} training files", **isp_residual(isp, srgb, raw)}
    isp, fit = fit_isp(srgb, raw, bits=8)
    log.info("LibRaw's render differs between the training files: fitted one ISP to them (%.2f dB)", fit["psnr_db"])
    return isp, {"source": f"fitted to the training pairs (isp_fit.fit_isp): LibRaw's render differs between "
                 f"the {len(isps)} training files", **fit}


def formulation_options(f: Any) -> Any:
    """The model's formulation and its loss as click options (``--prediction --space --loss --clipped-weight``):
    rawdiff-train's, and the GPU session's (``rawdiff_bench.gpu_session``). The choices are
    ``rawdiff_infer.formulation.PREDICTIONS`` / ``SPACES`` and ``trainer.LOSSES``, written out here so that
    ``--help`` does not import torch."""
    for option in reversed((
        click.option("--prediction", type=click.Choice(["eps", "x0"]), default="eps", show_default=True,
                     help="What the U-Net predicts: the noise (the paper's) or the clean RAW (with pixel losses)."),
        click.option("--space", type=click.Choice(["raw", "residual"]), default="raw", show_default=True,
                     help="What is diffused: the RAW (the paper's) or its residual over the closed-form inverse of "
                     "the input under the data's ISP (the network only adds what the ISP lost)."),
        click.option("--loss", type=click.Choice(["l2", "l2+l1"]), default="l2", show_default=True,
                     help="Per-pixel loss on the prediction."),
        click.option("--clipped-weight", type=FiniteFloat(1.0, 1000.0), default=1.0, show_default=True,
                     help="Loss weight of pixels with a clipped input channel, relative to the others, in "
                     "[1, 1000]."))):
        f = option(f)
    return f


@click.command(PROG, cls=OneLineCommand, help=HELP,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--photos", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of sRGB photos; repeat to combine folders.")
@click.option("--raw", type=click.Path(exists=True, file_okay=False), help="Folder of RAW files (one camera).")
@click.option("--fivek", type=click.Path(exists=True, file_okay=False), help="FiveK camera folder (InvISP).")
@click.option("--train-list", type=click.Path(exists=True, dir_okay=False), help="InvISP train list file.")
@click.option("--test-list", type=click.Path(exists=True, dir_okay=False), help="InvISP test list file.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoints, log.csv).")
@click.option("--camera", default="nikon-d700", show_default=True, callback=_check_camera,
              help="Synthetic camera (see rawdiff_infer.camera).")
@click.option("--variants", type=click.IntRange(1), default=16, show_default=True,
              help="ISP and scene draws per photo (synthetic camera).")
@click.option("--scene-aug/--no-scene-aug", default=True, show_default=True,
              help="Random scene exposure, illuminant, hue, saturation and colour matrix before the fixed ISP "
              "(--photos; rawdiff_train.scene_aug.SceneAugmentation defaults).")
@click.option("--wb", type=click.Choice(["camera", "daylight"]), default="camera", show_default=True,
              help="White balance of RAW pairs.")
@click.option("--cache", type=click.Path(file_okay=False), help="Cache folder for decoded RAW pairs.")
@click.option("--val-count", type=click.IntRange(0), default=3, show_default=True,
              help="Validation images (--photos: the held-out photos found, then a seeded split of the others).")
@click.option("--val-crop", type=click.IntRange(64), default=256, show_default=True, help="Validation crop (px).")
@click.option("--val-steps", type=click.IntRange(1, 1000), default=10, show_default=True, help="dpm steps.")
@click.option("--config", "config_name", type=click.Choice(["paper", "tiny"]), default="paper", show_default=True)
@click.option("--steps", type=click.IntRange(1), default=20_000, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True, help="Global batch.")
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True)
@click.option("--lr", type=FiniteFloat(0.0, 1.0, lo_open=True), default=2e-4, show_default=True,
              help="Peak learning rate, in (0, 1].")
@click.option("--lr-min", type=FiniteFloat(0.0), default=2e-6, show_default=True,
              help="Final learning rate of the cosine (0 <= lr-min <= lr).")
@click.option("--warmup", type=click.IntRange(0), default=1000, show_default=True)
@click.option("--grad-clip", type=FiniteFloat(0.0, lo_open=True), default=1.0, show_default=True,
              help="Gradient-norm clip (> 0).")
@click.option("--ema", type=FiniteFloat(0.0, 1.0, hi_open=True), default=0.999, show_default=True,
              help="EMA decay, in [0, 1).")
@click.option("--schedule", type=click.Choice(["scaled_linear", "linear"]), default="scaled_linear", show_default=True)
@formulation_options
@click.option("--seed", type=click.IntRange(0, 2**62), default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, callback=_check_device, help="auto, cpu, cuda, cuda:N.")
@click.option("--bf16/--no-bf16", default=True, show_default=True, help="bf16 autocast (CUDA).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the training step (CUDA).")
@click.option("--ckpt-every", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--val-every", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--log-every", type=click.IntRange(1), default=50, show_default=True)
@click.option("--max-minutes", type=FiniteFloat(0.0, lo_open=True), help="Stop (and save) after this much wall time.")
@click.option("--resume", is_flag=True, help="Continue from the run folder's latest checkpoint (same data and "
              "camera: a different ISP is refused).")
@click.option("--init", "init_ckpt", type=click.Path(exists=True),
              help="Fine-tune: start from this model's weights (.safetensors or sharded folder, e.g. "
              "rawdiff_infer/weights) with a fresh optimizer and lr schedule. Same U-Net and noise schedule.")
@click.option("--tensorboard", is_flag=True, help="Also log to TensorBoard (needs tensorboard).")
@click.option("-q", "--quiet", is_flag=True)
@click.option("-v", "--verbose", is_flag=True, help="Show the traceback of an internal error.")
def cli(**params: Any) -> None:
    opts = TrainOptions.from_click(params)
    if sum(bool(x) for x in (opts.photos, opts.raw, opts.fivek)) != 1:
        raise click.UsageError("give exactly one of --photos, --raw, --fivek")
    if opts.init_ckpt and opts.resume:
        raise click.UsageError("--init (fine-tune from a model) and --resume (continue this run) contradict "
                               "each other")
    sys.exit(_guarded(opts))


@dataclass(frozen=True)
class TrainOptions:
    """Everything rawdiff-train was asked to do (built from click's parameters)."""

    out: str
    photos: tuple[str, ...] = ()
    raw: str | None = None
    fivek: str | None = None
    train_list: str | None = None
    test_list: str | None = None
    camera: str = "nikon-d700"
    variants: int = 16
    scene_aug: bool = True
    wb: str = "camera"
    cache: str | None = None
    val_count: int = 3
    val_crop: int = 256
    val_steps: int = 10
    config_name: str = "paper"
    steps: int = 20_000
    batch_size: int = 256
    grad_accum: int = 1
    lr: float = 2e-4
    lr_min: float = 2e-6
    warmup: int = 1000
    grad_clip: float = 1.0
    ema: float = 0.999
    schedule: str = "scaled_linear"
    prediction: str = "eps"
    space: str = "raw"
    loss: str = "l2"
    clipped_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    compile_: bool = False
    ckpt_every: int = 1000
    val_every: int = 1000
    log_every: int = 50
    max_minutes: float | None = None
    resume: bool = False
    init_ckpt: str | None = None
    tensorboard: bool = False
    quiet: bool = False
    verbose: bool = False

    @classmethod
    def from_click(cls, params: dict[str, Any]) -> "TrainOptions":
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items() if k in names})

    def train_config(self):  # noqa: ANN201 - TrainConfig, imported lazily
        """The trainer's configuration; every number checked (exit 2) before any work."""
        from .trainer import TrainConfig

        try:
            return TrainConfig(steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
                               lr_min=self.lr_min, warmup=self.warmup, grad_clip=self.grad_clip,
                               ema_decay=self.ema, seed=self.seed, bf16=self.bf16, compile=self.compile_,
                               ckpt_every=self.ckpt_every, val_every=self.val_every, log_every=self.log_every,
                               loss=self.loss, clipped_weight=self.clipped_weight)
        except ValueError as e:
            raise _Fail(f"invalid training settings: {first_line(e)}", EXIT_USAGE) from None


def _guarded(opts: TrainOptions) -> int:
    """Run with interrupt handling; map every failure to one line and an exit status."""
    from rawdiff_infer.interrupts import Interrupted, handle_interrupts, signal_name

    from .trainer import TrainingDiverged

    def last_words(e: Interrupted) -> None:  # the watchdog's hard exit (the main thread did not unwind in time)
        _err(f"{e.verb} ({signal_name(e.signum)}); the last checkpoint is intact (--resume continues)")

    from rawdiff_infer.console import Console
    from rawdiff_infer.fsio import reading

    console = Console(PROG, verbose=not opts.quiet)  # log records and warnings (Pillow's too) become our lines
    inputs = [*opts.photos, opts.raw, opts.fivek, opts.train_list, opts.test_list, opts.init_ckpt]
    try:
        with console.capture(), handle_interrupts(last_words), reading(inputs):  # inputs: never replaced
            return _run(opts)
    except Interrupted as e:
        last_words(e)
        return e.exit_code
    except KeyboardInterrupt:
        _err("interrupted; the last checkpoint is intact (--resume continues)")
        return 130
    except click.UsageError:
        raise
    except _Fail as e:
        _err(f"error: {e}")
        return e.code
    except TrainingDiverged as e:
        _err(f"error: {first_line(e)}; lower --lr or raise --warmup")
        return EXIT_FAILED
    except Exception as e:  # noqa: BLE001 - a bug: one line for the user, the traceback with -v
        if opts.verbose:
            import traceback

            traceback.print_exc()
        _err(f"internal error: {type(e).__name__}: {first_line(e)} (please report it; -v shows the traceback)")
        return EXIT_FAILED


def _run(opts: TrainOptions) -> int:
    """The phases: check -> device -> data -> trainer (init / resume) -> train."""
    from rawdiff_infer.plan import UsageError, world_from_env

    cfg = opts.train_config()
    try:
        _, world = world_from_env()
    except UsageError as e:
        raise _Fail(str(e), EXIT_USAGE) from None
    if opts.batch_size % (world * opts.grad_accum):
        raise _Fail(f"--batch-size {opts.batch_size} must divide by the number of processes x --grad-accum "
                    f"({world} x {opts.grad_accum})", EXIT_USAGE)
    _check_list_files(opts)
    out_dir = Path(opts.out)
    _check_out_dir(out_dir)
    resume_from = _resume_point(out_dir) if opts.resume else None
    if not opts.resume:
        _refuse_existing_run(out_dir)
    device = _device(opts.device, world)
    pool, val, meta = _data(opts, device, out_dir)
    trainer = _trainer(opts, cfg, pool, val, meta, device, out_dir, resume_from)
    rows = trainer.run(progress=not opts.quiet and sys.stderr.isatty(),
                       max_seconds=opts.max_minutes * 60 if opts.max_minutes else None)
    if trainer.rank == 0 and rows:
        last = rows[-1]
        click.echo(f"done: step {trainer.step}, loss {last['loss']:.4f}, {last['samples_per_s']:.0f} samples/s; "
                   f"checkpoint {out_dir / f'ckpt-{trainer.step:07d}' / 'model.safetensors'}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return EXIT_OK


def _device(device: str, world: int) -> str:
    """auto -> cuda:LOCAL_RANK or cpu; joins the process group under torchrun."""
    import torch
    import torch.distributed as dist

    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
    return device


def _data(opts: TrainOptions, device: str, out_dir: Path):  # noqa: ANN202
    """(pair pool on the device, validation pairs, model description); creates the run folder."""
    from rawdiff_infer.checkpoint import ModelMeta
    from rawdiff_infer.formulation import Formulation
    from rawdiff_infer.model import UNetConfig
    from rawdiff_infer.schedule import ScheduleConfig

    from .fivek import RawFileError
    from .pool import PairPool
    from .scene_aug import SceneAugmentation

    try:
        pairs, val, cam, desc = build_data(opts.photos, opts.raw, opts.fivek, camera=opts.camera,
                                           variants=opts.variants, wb=opts.wb, train_list=opts.train_list,
                                           test_list=opts.test_list, val_count=opts.val_count, seed=opts.seed,
                                           cache=opts.cache, augmentation=SceneAugmentation() if opts.scene_aug
                                           else None)
        isp, isp_desc = training_isp(bool(opts.photos), pairs, cam, wb=opts.wb)
    except (RawFileError, ValueError, OSError) as e:
        raise _Fail(_data_message(e)) from None
    desc["isp"] = isp_desc
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _Fail(f"--out {show_path(opts.out)}: cannot create the run folder ({e.strerror or first_line(e)})",
                    EXIT_USAGE) from None
    model_cfg = UNetConfig() if opts.config_name == "paper" else UNetConfig.tiny()
    try:
        meta = ModelMeta(model=model_cfg, schedule=ScheduleConfig(kind=opts.schedule), camera=cam, provenance=desc,
                         isp=isp, formulation=Formulation(prediction=opts.prediction, space=opts.space))
    except ValueError as e:  # a residual model of data whose ISP is unknown
        raise _Fail(f"--space {opts.space}: {first_line(e)}", EXIT_USAGE) from None
    try:
        pool = PairPool(pairs, patch=model_cfg.patch_size, device=device)
    except ValueError as e:
        raise _Fail(f"training data: {first_line(e)}") from None
    return pool, val, meta


def _trainer(opts: TrainOptions, cfg: Any, pool: Any, val: list, meta: Any, device: str, out_dir: Path,  # noqa
             resume_from: Path | None = None):
    """The Trainer, with its validation set, started from --init or restored by --resume (from ``resume_from``,
    the checkpoint folder ``_resume_point`` checked)."""
    from rawdiff_infer.checkpoint import CheckpointError

    from .trainer import Trainer
    from .validation import ValidationSet, center_crop

    if resume_from is not None:
        meta = _resumed_meta(meta, resume_from)
    validate = None
    if val:
        import numpy as np

        from rawdiff_infer.rawspace import RawEncoding

        enc = RawEncoding()
        inputs = [center_crop(np.round(np.clip(p.srgb, 0, 1) * 255).astype(np.uint8), opts.val_crop) for p in val]
        targets = [center_crop(enc.encode(p.raw).astype(np.float32), opts.val_crop) for p in val]
        validate = ValidationSet(inputs, targets, meta, device=device, steps=opts.val_steps)
    trainer = Trainer(pool, out_dir, config=cfg, meta=meta, device=device, validate=validate,
                      tensorboard=opts.tensorboard)
    if opts.init_ckpt:
        try:
            origin = trainer.init_from(opts.init_ckpt)
        except (CheckpointError, OSError, ValueError) as e:
            raise _Fail(f"--init {show_path(opts.init_ckpt)}: {_ckpt_message(e, opts.init_ckpt)}") from None
        meta.provenance["initialised_from"] = {"path": str(opts.init_ckpt), **origin}
    if resume_from is not None:
        from .trainer import ResumeMismatch

        try:
            trainer.load(resume_from)
        except ResumeMismatch as e:  # this run's command line asks for another model: a usage error
            raise _Fail(f"--resume: {first_line(e)}", EXIT_USAGE) from None
        except Exception as e:  # noqa: BLE001 - a damaged run folder: any failure to restore is the user's data
            raise _Fail(f"--resume: cannot restore {show_path(resume_from)} ({first_line(e)})") from None
        if not opts.quiet:
            _err(f"resumed from step {trainer.step}")
    return trainer


#: what rawdiff-train writes into a run folder (checkpoint folders are ``ckpt-NNNNNNN``)
RUN_FILES = ("latest", "log.csv", "tb")
_CKPT_NAME = re.compile(r"ckpt-\d{7,}")


def _refuse_existing_run(out_dir: Path) -> None:
    """Without --resume, a run folder that holds a run (or any file of the names rawdiff-train writes: ``latest``,
    ``log.csv``, ``tb``, ``ckpt-*``, a user's own included) is refused before any compute (exit 2): nothing it did
    not write in this run is ever replaced."""
    if not out_dir.is_dir():
        return
    try:
        found = sorted(q.name for q in out_dir.iterdir() if q.name in RUN_FILES or _CKPT_NAME.fullmatch(q.name))
    except OSError as e:
        raise _Fail(f"--out {show_path(out_dir)}: cannot list it ({e.strerror or first_line(e)})", EXIT_USAGE) from None
    if found:
        shown = ", ".join(show_path(n) for n in found[:3]) + (", ..." if len(found) > 3 else "")
        raise _Fail(f"--out {show_path(out_dir)}: already holds {shown}; --resume continues a run there, or train "
                    "into a new --out (nothing was replaced)", EXIT_USAGE)


def _resume_point(out_dir: Path) -> Path:
    """The checkpoint folder --resume continues: ``latest`` must be rawdiff-train's (a regular file naming a
    ``ckpt-NNNNNNN`` folder) and every file read from that folder a regular file, checked without opening a FIFO
    (exit 2 otherwise; exit 1 when there is no checkpoint yet)."""
    from rawdiff_infer.fsio import NotRegularFileError, check_regular, open_regular

    latest = out_dir / "latest"
    if not os.path.lexists(latest):
        raise _Fail(f"--resume: {show_path(out_dir)} has no checkpoint yet")
    try:
        for name in ("log.csv",):
            if os.path.lexists(out_dir / name):
                check_regular(out_dir / name)
        with open_regular(latest) as f:
            text = f.read(256).decode("utf-8", "replace").strip()
        if not _CKPT_NAME.fullmatch(text):
            raise _Fail(f"--resume: {show_path(latest)} was not written by rawdiff-train (it does not name a "
                        "ckpt-NNNNNNN folder); not replaced", EXIT_USAGE)
        where = out_dir / text
        for name in ("model.safetensors", "train_state.safetensors", "train_state.json"):
            check_regular(where / name)
    except NotRegularFileError as e:
        raise _Fail(f"--resume: {show_path(e.filename)}: {e.strerror}", EXIT_USAGE) from None
    except OSError as e:
        raise _Fail(f"--resume: cannot restore {show_path(e.filename or latest)} ({e.strerror or first_line(e)})") \
            from None
    return where


#: the largest --train-list / --test-list file read (InvISP's lists are about 100 KB)
MAX_LIST_BYTES = 16 << 20


def _check_list_files(opts: TrainOptions) -> None:
    """--train-list / --test-list are regular files (a FIFO would block the read for ever) of at most
    ``MAX_LIST_BYTES``: exit 2 otherwise."""
    from rawdiff_infer.fsio import check_regular

    for option, path in (("--train-list", opts.train_list), ("--test-list", opts.test_list)):
        if path is None:
            continue
        try:
            size = check_regular(path).st_size
        except OSError as e:
            raise _Fail(f"{option} {show_path(path)}: {e.strerror or first_line(e)}", EXIT_USAGE) from None
        if size > MAX_LIST_BYTES:
            raise _Fail(f"{option} {show_path(path)}: {size} bytes; a list of file names is at most "
                        f"{MAX_LIST_BYTES >> 20} MiB", EXIT_USAGE)


def _resumed_meta(meta: Any, where: Path) -> Any:
    """``meta`` with the ISP of the checkpoint --resume continues (the same ISP, as stored), or this run's where
    that checkpoint predates ISP descriptions. A different ISP (other --camera, other data) is a command-line
    error (exit 2): the model would be described with an ISP it was not trained for."""
    import dataclasses

    from rawdiff_infer.checkpoint import read_meta

    from .isp_fit import isp_close, isp_summary

    try:
        stored = read_meta(where / "model.safetensors")
    except Exception as e:  # noqa: BLE001 - a damaged run folder: any failure to restore is the user's data
        raise _Fail(f"--resume: cannot restore {show_path(where)} ({first_line(e)})") from None
    if stored.isp is None:
        return meta
    if not isp_close(stored.isp, meta.isp):
        raise _Fail(f"--resume: this run's ISP ({isp_summary(meta.isp)}) is not the one {show_path(where)} was "
                    f"trained with ({isp_summary(stored.isp)}); resume with the same data and --camera, or train "
                    "into a new --out", EXIT_USAGE)
    return dataclasses.replace(meta, isp=stored.isp)


def _check_out_dir(out_dir: Path) -> None:
    """Refuse (exit 2) a run folder that cannot be created or written, before any work; create nothing yet (a
    failure while loading the data then leaves no empty run folder behind)."""
    probe = out_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise _Fail(f"--out {show_path(out_dir)}: {show_path(probe)} is not a folder", EXIT_USAGE)
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "the run folder" if probe == out_dir else f"cannot create it in {show_path(probe)}:"
        raise _Fail(f"--out {show_path(out_dir)}: {what} not writable", EXIT_USAGE)


def _data_message(e: BaseException) -> str:
    """One line for a data problem: OSError's file name and reason, else the exception's first line."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{show_path(e.filename)}: {e.strerror}"
    return first_line(e)


def _ckpt_message(e: BaseException, path: str | os.PathLike[str]) -> str:
    """The reason a checkpoint cannot be used, without repeating its path."""
    msg = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
    for prefix in (f"{path}: ", f"{Path(path)}: "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (exits with the status of the table in the module docstring)."""
    cli.main(args=argv, prog_name=PROG)


if __name__ == "__main__":  # torchrun -m rawdiff_train.cli ...
    main()
