"""rawdiff-train: train the paper's model on your camera's RAW files or on plain photos (synthetic camera)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

__all__ = ["main", "cli", "build_data"]

log = logging.getLogger("rawdiff.train")

HELP = """Train rawdiff's conditional diffusion U-Net.

Data, one of:
  --photos DIR   plain sRGB photos; a synthetic camera (--camera) turns each into --variants training pairs
                 (RAW target by inverting the camera's ISP, sRGB input by re-rendering it with random exposure,
                 tone curve and JPEG quality).
  --raw DIR      RAW files of one camera, InvISP protocol (sRGB rendered by LibRaw with the camera white
                 balance, JPEG quality 90; RAW target demosaiced, white-balanced, gamma 1/2.2).
  --fivek DIR    the same, with InvISP's train/test list files if given (--train-list / --test-list).

Defaults are the paper's recipe: 64x64 patches, batch 256, Adam, 1k warm-up to 2e-4 then cosine to 2e-6,
gradient-norm clip 1, 20k steps, eps-MSE; plus EMA weights (saved as the inference checkpoint).

\b
Examples:
  rawdiff-train --photos photos/ --out runs/synth --steps 20000
  rawdiff-train --raw nikon_d700/ --out runs/d700 --compile
  torchrun --nproc-per-node 4 -m rawdiff_train.cli --raw nikon_d700/ --out runs/d700   # 4 GPUs, same results
  rawdiff-train --photos photos/ --out runs/synth --resume                              # continue from latest
"""


def build_data(photos, raw, fivek, *, camera, variants, wb, train_list, test_list, val_count, seed, cache):
    """-> (list of training pairs, list of validation pairs, meta camera, description)."""
    from rawdiff_infer.camera import get_camera

    from .data import PhotoPairSource, RawPairSource, list_files
    from .fivek import read_list_file, select_by_stem, split_files

    if photos:
        files = list_files(photos, (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"))
        if len(files) <= val_count:
            raise click.UsageError(f"{photos}: {len(files)} photos, need more than --val-count {val_count}")
        train_files, val_files = split_files(files, test_fraction=val_count / len(files), seed=seed)
        from .camera_isp import described_camera

        cam = described_camera(get_camera(camera))
        src = PhotoPairSource(train_files, camera=cam, seed=seed)
        pairs = []
        for epoch in range(variants):
            src.set_epoch(epoch)
            pairs.extend(src[i] for i in range(len(src)))
        val_src = PhotoPairSource(val_files, camera=cam, seed=seed + 10_000)
        val = [val_src[i] for i in range(len(val_src))]
        desc = {"data": "synthetic camera over photos", "camera": camera, "train_files": [f.name for f in train_files],
                "val_files": [f.name for f in val_files], "variants_per_photo": variants}
        return pairs, val, cam, desc
    root = raw or fivek
    from .fivek import RAW_EXTENSIONS

    files = list_files(root, RAW_EXTENSIONS)
    if train_list:
        train_files = select_by_stem(files, read_list_file(train_list))
        test_files = select_by_stem(files, read_list_file(test_list)) if test_list else []
    else:
        train_files, test_files = split_files(files, test_fraction=0.15, seed=seed)
    src = RawPairSource(train_files, wb=wb, cache_dir=cache)
    pairs = [src[i] for i in range(len(src))]
    val_src = RawPairSource(test_files[:val_count] if test_files else [], wb=wb, cache_dir=cache)
    val = [val_src[i] for i in range(len(val_src))]
    first = pairs[0].meta if pairs else {}
    from rawdiff_infer.camera import Camera

    cam_meta = first.get("camera_description")
    cam = Camera.from_dict(cam_meta) if isinstance(cam_meta, dict) else get_camera(camera)
    desc = {"data": "InvISP protocol over RAW files", "root": str(root), "train_files": len(train_files),
            "test_files": len(test_files), "wb": wb}
    return pairs, val, cam, desc


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--photos", type=click.Path(exists=True, file_okay=False), help="Folder of sRGB photos.")
@click.option("--raw", type=click.Path(exists=True, file_okay=False), help="Folder of RAW files (one camera).")
@click.option("--fivek", type=click.Path(exists=True, file_okay=False), help="FiveK camera folder (InvISP).")
@click.option("--train-list", type=click.Path(exists=True, dir_okay=False), help="InvISP train list file.")
@click.option("--test-list", type=click.Path(exists=True, dir_okay=False), help="InvISP test list file.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoints, log.csv).")
@click.option("--camera", default="nikon-d700", show_default=True, help="Synthetic camera (see rawdiff_infer.camera).")
@click.option("--variants", type=click.IntRange(1), default=16, show_default=True,
              help="ISP draws per photo (synthetic camera).")
@click.option("--wb", type=click.Choice(["camera", "daylight"]), default="camera", show_default=True,
              help="White balance of RAW pairs.")
@click.option("--cache", type=click.Path(file_okay=False), help="Cache folder for decoded RAW pairs.")
@click.option("--val-count", type=click.IntRange(0), default=3, show_default=True, help="Validation images.")
@click.option("--val-crop", type=click.IntRange(64), default=256, show_default=True, help="Validation crop (px).")
@click.option("--val-steps", type=click.IntRange(1, 1000), default=10, show_default=True, help="dpm steps.")
@click.option("--config", "config_name", type=click.Choice(["paper", "tiny"]), default="paper", show_default=True)
@click.option("--steps", type=click.IntRange(1), default=20_000, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True, help="Global batch.")
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--lr-min", type=float, default=2e-6, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=1000, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True)
@click.option("--ema", type=click.FloatRange(0.0, 1.0), default=0.999, show_default=True)
@click.option("--schedule", type=click.Choice(["scaled_linear", "linear"]), default="scaled_linear", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--bf16/--no-bf16", default=True, show_default=True, help="bf16 autocast (CUDA).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the training step (CUDA).")
@click.option("--ckpt-every", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--val-every", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--log-every", type=click.IntRange(1), default=50, show_default=True)
@click.option("--max-minutes", type=float, help="Stop (and save) after this much wall time.")
@click.option("--resume", is_flag=True, help="Continue from the run folder's latest checkpoint.")
@click.option("--init", "init_ckpt", type=click.Path(exists=True),
              help="Fine-tune: start from this model's weights (.safetensors or sharded folder, e.g. "
              "rawdiff_infer/weights) with a fresh optimizer and lr schedule. Same U-Net and noise schedule.")
@click.option("--tensorboard", is_flag=True, help="Also log to TensorBoard (needs tensorboard).")
@click.option("-q", "--quiet", is_flag=True)
def cli(photos, raw, fivek, train_list, test_list, out, camera, variants, wb, cache, val_count, val_crop, val_steps,
        config_name, steps, batch_size, grad_accum, lr, lr_min, warmup, grad_clip, ema, schedule, seed, device, bf16,
        compile_, ckpt_every, val_every, log_every, max_minutes, resume, init_ckpt, tensorboard, quiet) -> None:
    logging.basicConfig(level=logging.INFO if not quiet else logging.WARNING, format="%(levelname)s: %(message)s")
    if sum(bool(x) for x in (photos, raw, fivek)) != 1:
        raise click.UsageError("give exactly one of --photos, --raw, --fivek")
    try:
        sys.exit(_run(**locals()))
    except KeyboardInterrupt:
        click.echo("rawdiff-train: interrupted (the last checkpoint is intact; --resume continues)", err=True)
        sys.exit(130)


def _run(photos, raw, fivek, train_list, test_list, out, camera, variants, wb, cache, val_count, val_crop, val_steps,
         config_name, steps, batch_size, grad_accum, lr, lr_min, warmup, grad_clip, ema, schedule, seed, device, bf16,
         compile_, ckpt_every, val_every, log_every, max_minutes, resume, init_ckpt, tensorboard, quiet) -> int:
    import torch
    import torch.distributed as dist

    from rawdiff_infer.checkpoint import ModelMeta
    from rawdiff_infer.model import UNetConfig
    from rawdiff_infer.schedule import ScheduleConfig

    from .fivek import RawFileError
    from .pool import PairPool
    from .trainer import TrainConfig, Trainer
    from .validation import ValidationSet, center_crop

    if init_ckpt and resume:
        click.echo("rawdiff-train: error: --init (fine-tune from a model) and --resume (continue this run) "
                   "contradict each other", err=True)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
    try:
        pairs, val, cam, desc = build_data(photos, raw, fivek, camera=camera, variants=variants, wb=wb,
                                           train_list=train_list, test_list=test_list, val_count=val_count,
                                           seed=seed, cache=cache)
    except (RawFileError, ValueError, OSError) as e:
        click.echo(f"rawdiff-train: error: {e}", err=True)
        return 1
    model_cfg = UNetConfig() if config_name == "paper" else UNetConfig.tiny()
    meta = ModelMeta(model=model_cfg, schedule=ScheduleConfig(kind=schedule), camera=cam, provenance=desc)
    pool = PairPool(pairs, patch=model_cfg.patch_size, device=device)
    del pairs
    cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, lr_min=lr_min,
                      warmup=warmup, grad_clip=grad_clip, ema_decay=ema, seed=seed, bf16=bf16, compile=compile_,
                      ckpt_every=ckpt_every, val_every=val_every, log_every=log_every)
    validate = None
    if val:
        import numpy as np

        from rawdiff_infer.rawspace import RawEncoding

        enc = RawEncoding()
        inputs = [center_crop(np.round(np.clip(p.srgb, 0, 1) * 255).astype(np.uint8), val_crop) for p in val]
        targets = [center_crop(enc.encode(p.raw).astype(np.float32), val_crop) for p in val]
        validate = ValidationSet(inputs, targets, meta, device=device, steps=val_steps)
    trainer = Trainer(pool, out, config=cfg, meta=meta, device=device, validate=validate, tensorboard=tensorboard)
    if init_ckpt:
        from rawdiff_infer.checkpoint import CheckpointError

        try:
            origin = trainer.init_from(init_ckpt)
        except (CheckpointError, OSError) as e:
            click.echo(f"rawdiff-train: error: --init: {str(e).splitlines()[0]}", err=True)
            return 1
        meta.provenance["initialised_from"] = {"path": str(init_ckpt), **origin}
    if resume:
        latest = Path(out) / "latest"
        if not latest.exists():
            click.echo(f"rawdiff-train: error: --resume: {out} has no checkpoint yet", err=True)
            return 1
        trainer.load(Path(out) / latest.read_text().strip())
        click.echo(f"resumed from step {trainer.step}", err=True)
    rows = trainer.run(progress=not quiet, max_seconds=max_minutes * 60 if max_minutes else None)
    if trainer.rank == 0 and rows:
        last = rows[-1]
        click.echo(f"done: step {trainer.step}, loss {last['loss']:.4f}, {last['samples_per_s']:.0f} samples/s; "
                   f"checkpoint {Path(out) / (Path(out) / 'latest').read_text().strip() / 'model.safetensors'}")
    if world > 1:
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="rawdiff-train")


if __name__ == "__main__":  # torchrun -m rawdiff_train.cli ...
    main()
