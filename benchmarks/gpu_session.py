"""One prepared GPU session: train the default model, measure the paper's sampler table on it, benchmark the U-Net.

This is the script that produced benchmarks/RESULTS.md and the bundled weights. It is built for a short lease on
one GPU: every phase has a wall-clock budget (seconds since the script started), every result is written to
``--out`` as soon as it exists (results.json is rewritten after each measurement), and a failing phase is logged
and skipped rather than losing the others.

    python -m rawdiff_bench.gpu_session --photos PHOTOS_DIR [--photos MORE_DIR] --out OUT_DIR [--tiny] ...

Data: the photos of every ``--photos`` folder, through the fixed synthetic camera, ``--variants`` renderings each,
with scene augmentation (``--scene-aug``, on by default; ``rawdiff_train.scene_aug``). The held-out photos
(``rawdiff_train.heldout``: kodim03, kodim07, kodim13, grace_hopper) never train: they are the held-out set of
the PSNR curve during training (every ``--val-every`` steps, centre crops) and of the sampler table afterwards.
The curve and the loss log are written to ``--out`` as they grow (results.json ``phases.train.curve``,
``train_log.csv``). ``--init-weights`` continues from earlier weights (fresh optimizer and lr schedule).

A run longer than one call allows can be split: ``--no-fit-schedule`` stops at ``--train-until`` with the
schedule of ``--steps`` intact and leaves the trainer state in ``--run-dir``; a second call with
``--resume-run`` (same data options) continues it to ``--steps``, then evaluates.

``--tiny`` runs the whole thing with a tiny model, few steps and small images: the CPU rehearsal.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from rawdiff_infer.fsio import write_bytes
from rawdiff_infer.metrics import psnr
from rawdiff_train.cli import formulation_options

T0 = time.perf_counter()
log = logging.getLogger("gpu_session")


@dataclass(frozen=True)
class SessionArgs:
    """The command line of one session (see ``cli``; times are seconds since the script started)."""

    photos: tuple[str, ...]
    out: str
    tiny: bool = False
    steps: int = 6000
    batch: int = 256
    lr: float = 2e-4
    warmup: int | None = None
    init_weights: str | None = None
    variants: int = 12
    scene_aug: bool = True
    workers: int = 16
    log_every: int = 100
    val_every: int = 500
    val_crop: int = 256
    val_sampler: str = "dpm-sde"
    val_steps: int = 20
    train_until: float = 320.0
    eval_until: float = 420.0
    bench_until: float = 555.0
    fit_schedule: bool = True
    resume_run: bool = False
    run_dir: str = "/tmp/rawdiff-gpu-run"
    skip: tuple[str, ...] = ()
    weights: str | None = None
    prediction: str = "eps"
    space: str = "raw"
    loss: str = "l2"
    clipped_weight: float = 1.0
    clipped_fraction: float = 0.0


def select_photos(folders) -> tuple[list[Path], list[Path]]:
    """(training photos, held-out photos) of the folders: every photo of them (``list_photos``), the held-out
    ones (``rawdiff_train.heldout``) split off and put in the held-out order (kodim03, kodim07, kodim13 first,
    the indices at which the synthetic camera rendered them in every earlier session)."""
    from rawdiff_train.data import list_photos
    from rawdiff_train.heldout import sort_held_out, split_held_out

    train, held = split_held_out(list_photos(folders))
    return train, sort_held_out(held)


def prepared_sources(folders) -> list[dict[str, Any]]:
    """The source photos (file name, sha256, copies) of every folder written by ``rawdiff_train.prepare`` (its
    manifest.json), so that a model's provenance names the photos its scaled copies came from."""
    out: list[dict[str, Any]] = []
    for folder in folders:
        manifest = Path(folder) / "manifest.json"
        if manifest.is_file():
            out += [{"file": s["file"], "sha256": s["sha256"], "copies": s["copies"]}
                    for s in json.loads(manifest.read_text()).get("sources", [])]
    return out


def elapsed() -> float:
    return time.perf_counter() - T0


class Results:
    """results.json, rewritten after every update so a killed run still leaves everything measured so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {"phases": {}, "errors": []}

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()

    def phase(self, name: str, **kw) -> None:
        self.data["phases"].setdefault(name, {}).update(kw)
        self.flush()

    def error(self, where: str, e: BaseException) -> None:
        self.data["errors"].append({"where": where, "error": f"{type(e).__name__}: {e}",
                                    "trace": traceback.format_exc()[-3000:]})
        log.error("%s failed: %s", where, e)
        self.flush()

    def flush(self) -> None:
        write_bytes(self.path, json.dumps(self.data, indent=1, default=str).encode(), overwrite=True)


def make_pairs(files, *, camera, seed: int, variants: int, workers: int, augmentation=None, crop: int | None = None):
    """All (photo, variant) pairs, rendered on the CPU in parallel (Pillow JPEG and torch release the GIL); each
    pair is its photo's ``PhotoPairSource`` item at (seed, epoch = variant, index), so the set does not depend on
    the number of workers. ``crop``: keep only a centre crop of that size (the CPU rehearsal)."""
    import dataclasses as dc

    from rawdiff_train.data import PhotoPairSource
    from rawdiff_train.heldout import is_held_out
    from rawdiff_train.validation import center_crop

    if any(is_held_out(f) for f in files):  # the last line of defence: never train on a held-out photo
        raise ValueError("a held-out photo was given as training data")

    def one(job):
        epoch, i = job
        src = PhotoPairSource(files, camera=camera, seed=seed, augmentation=augmentation)
        src.set_epoch(epoch)
        p = src[i]
        return p if crop is None else dc.replace(p, srgb=center_crop(p.srgb, crop), raw=center_crop(p.raw, crop))

    jobs = [(e, i) for e in range(variants) for i in range(len(files))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as ex:
            pairs = list(ex.map(one, jobs))
    finally:
        torch.set_num_threads(threads)
    return pairs


class HeldOutCurve:
    """The held-out PSNR curve during training: a ``ValidationSet`` (centre crops of the held-out photos, the
    synthetic camera without scene augmentation, one sampler) whose every result is added to results.json at once,
    with the trainer's loss log copied to ``--out``/train_log.csv, so a killed run still leaves its curve."""

    def __init__(self, vset, names: list[str], res: Results, run_dir: Path, out: Path) -> None:
        self.vset, self.names, self.res, self.run_dir, self.out = vset, names, res, run_dir, out
        self.points: list[dict[str, Any]] = []

    def __call__(self, model, step: int) -> dict[str, float]:
        t = time.perf_counter()
        result = self.vset(model, step)
        each = dict(zip(self.names, self.vset.last_scores))
        kodak = [v for k, v in each.items() if k.lower().startswith("kodim")]
        self.points.append({"step": step, "val_psnr": result["val_psnr"], "val_psnr_kodim": float(np.mean(kodak))
                            if kodak else None, "val_psnr_clipped": result.get("val_psnr_clipped"),
                            "psnr_each": each, "regions_each": dict(zip(self.names, self.vset.last_regions)),
                            "seconds": time.perf_counter() - t, "at": elapsed()})
        self.res.phase("train", curve=self.points)
        log_csv = self.run_dir / "log.csv"
        if log_csv.is_file():
            write_bytes(self.out / "train_log.csv", log_csv.read_bytes(), overwrite=True)
        log.info("step %d: held-out PSNR %.2f dB (%.1f s)", step, result["val_psnr"], time.perf_counter() - t)
        return result


def _curve(args: SessionArgs, res: Results, device: str, cam, meta, val_files: list[Path]) -> HeldOutCurve | None:
    """The held-out curve's fixed inputs: each held-out photo rendered once (seed 10_000, as in phase_eval)."""
    if not val_files:
        return None
    from rawdiff_infer.rawspace import RawEncoding
    from rawdiff_train.data import PhotoPairSource
    from rawdiff_train.validation import ValidationSet, center_crop

    enc = RawEncoding()
    src = PhotoPairSource(val_files, camera=cam, seed=10_000)
    vals = [src[i] for i in range(len(src))]
    inputs = [center_crop(np.round(np.clip(v.srgb, 0, 1) * 255).astype(np.uint8), args.val_crop) for v in vals]
    targets = [center_crop(enc.encode(v.raw.astype(np.float32)), args.val_crop) for v in vals]
    vset = ValidationSet(inputs, targets, meta, device=device, method=args.val_sampler, steps=args.val_steps)
    res.phase("train", curve_setup={"crop": args.val_crop, "sampler": args.val_sampler, "steps": args.val_steps,
                                    "every": args.val_every, "images": [p.name for p in val_files]})
    return HeldOutCurve(vset, [p.name for p in val_files], res, Path(args.run_dir), Path(args.out))


def phase_train(args: SessionArgs, res: Results, device: str):
    from rawdiff_infer.camera import get_camera
    from rawdiff_infer.checkpoint import ModelMeta, save_checkpoint
    from rawdiff_infer.formulation import Formulation
    from rawdiff_infer.model import UNetConfig
    from rawdiff_infer.schedule import ScheduleConfig
    from rawdiff_train.camera_isp import SyntheticCamera, described_camera
    from rawdiff_train.pool import PairPool
    from rawdiff_train.scene_aug import SceneAugmentation
    from rawdiff_train.trainer import TrainConfig, Trainer, TrainingDiverged

    train_files, val_files = select_photos(args.photos)
    augmentation = SceneAugmentation() if args.scene_aug else None
    cam = described_camera(get_camera("nikon-d700"))
    t = time.perf_counter()
    pairs = make_pairs(train_files, camera=cam, seed=0, variants=args.variants, workers=args.workers,
                       augmentation=augmentation, crop=192 if args.tiny else None)
    pool = PairPool(pairs, device=device, patch=64, clipped_fraction=args.clipped_fraction)
    del pairs
    res.phase("train", data_seconds=time.perf_counter() - t, pool_images=len(pool), pool_mb=pool.nbytes / 1e6,
              train_files=[p.name for p in train_files], val_files=[p.name for p in val_files])
    cfg_model = UNetConfig.tiny() if args.tiny else UNetConfig()
    meta = ModelMeta(model=cfg_model, schedule=ScheduleConfig(), camera=cam, provenance={
        "data": "synthetic camera (nikon-d700) over " + ", ".join(str(p) for p in args.photos),
        "train_files": [p.name for p in train_files], "val_files": [p.name for p in val_files],
        "held_out_files": [p.name for p in val_files], "variants_per_photo": args.variants,
        "scene_augmentation": augmentation.to_dict() if augmentation is not None else None,
        "clipped_fraction": args.clipped_fraction, "prepared_from": prepared_sources(args.photos)},
        isp=SyntheticCamera(cam).isp_model(),  # make_pairs draws with the default randomization: one fixed ISP
        formulation=Formulation(prediction=args.prediction, space=args.space))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr,
                      warmup=args.warmup if args.warmup is not None else min(1000, args.steps // 5), ema_decay=0.999,
                      compile=device.startswith("cuda"), bf16=True, log_every=args.log_every,
                      ckpt_every=10**9, val_every=args.val_every, loss=args.loss,
                      clipped_weight=args.clipped_weight)
    curve = _curve(args, res, device, cam, meta, val_files)
    trainer = Trainer(pool, Path(args.run_dir), config=cfg, meta=meta, device=device, validate=curve)
    prior_steps = 0
    if args.init_weights:  # fine-tune: continue from earlier weights with a fresh optimizer and lr schedule
        origin = trainer.init_from(args.init_weights)
        prior_steps = int(origin.get("train_steps_total", origin.get("train_steps", 0)) or 0)
        meta.provenance["initialised_from"] = origin
        res.phase("train", initialised_from=origin, prior_steps=prior_steps)
    latest = Path(args.run_dir) / "latest"
    if args.resume_run:  # continue the state an earlier call left (same data options, same schedule)
        trainer.load(Path(args.run_dir) / latest.read_text().strip())
        res.phase("train", resumed_at_step=trainer.step)
    elif curve is not None:
        curve(trainer.ema, 0)  # where the curve starts (the --init-weights model, or noise)
    budget = args.train_until - elapsed()
    res.phase("train", budget_seconds=budget, config=asdict(cfg))
    t = time.perf_counter()
    fit = args.fit_schedule
    try:
        rows = trainer.run(progress=False, max_seconds=budget, fit_schedule=fit)
    except TrainingDiverged:
        raise  # no fallback, no weights: the error is recorded by the caller
    except Exception as e:  # compile trouble: fall back to eager and go on
        res.error("train (compiled)", e)
        trainer.cfg = TrainConfig(**{**asdict(trainer.cfg), "compile": False})
        trainer._fwd = trainer.net
        rows = trainer.run(progress=False, max_seconds=args.train_until - elapsed(), fit_schedule=fit)
    train_s = time.perf_counter() - t
    res.phase("train", steps=trainer.step, planned_steps=trainer.cfg.steps, seconds=train_s, log=rows,
              final_loss=rows[-1]["loss"] if rows else None,
              samples_per_s=rows[-1]["samples_per_s"] if rows else None)
    if (Path(args.run_dir) / "log.csv").is_file():
        write_bytes(Path(args.out) / "train_log.csv", (Path(args.run_dir) / "log.csv").read_bytes(), overwrite=True)
    trainer.check_finite()  # never write non-finite weights
    if trainer.step < trainer.cfg.steps:
        log.warning("stopped at step %d of %d (time budget); --resume-run continues from %s", trainer.step,
                    trainer.cfg.steps, args.run_dir)
    wdir = Path(args.out) / "weights"
    meta_final = ModelMeta(model=cfg_model, schedule=meta.schedule, camera=cam, provenance={
        **meta.provenance, "train_steps": trainer.step, "train_steps_total": prior_steps + trainer.step,
        "batch_size": cfg.batch_size, "final_loss": rows[-1]["loss"] if rows else None, "ema_decay": cfg.ema_decay,
        "trained_on": res.data.get("env", {}).get("gpu"), "date": time.strftime("%Y-%m-%d")}, isp=meta.isp,
        formulation=meta.formulation)
    save_checkpoint(trainer.ema.float(), wdir, meta=meta_final, dtype=torch.float16, shard_bytes=12 << 20)
    res.phase("train", weights=sorted(p.name for p in wdir.iterdir()))
    return trainer.ema, meta_final, val_files


def phase_eval(args: SessionArgs, res: Results, device: str, ema, meta, val_files):
    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_infer.model import UNet
    from rawdiff_infer.pipeline import RawReconstructor, SamplerConfig
    from rawdiff_infer.rawspace import RawEncoding
    from rawdiff_infer.tiling import PatchGrid, TileConfig
    from rawdiff_train.camera_isp import srgb_to_linear
    from rawdiff_train.data import PhotoPairSource

    enc = RawEncoding()
    src = PhotoPairSource(val_files, camera=meta.camera, seed=10_000)
    vals = [src[i] for i in range(len(src))]
    inputs = [np.round(np.clip(v.srgb, 0, 1) * 255).astype(np.uint8) for v in vals]
    if args.tiny:
        inputs = [x[:96, :128] for x in inputs]
    targets = [enc.encode(v.raw.astype(np.float32))[: x.shape[0], : x.shape[1]] for v, x in zip(vals, inputs)]
    # identity-like baseline: sRGB decoded by the inverse sRGB curve only (no colour matrix), then the RAW encoding
    base = []
    for x, y in zip(inputs, targets):
        lin = srgb_to_linear(torch.from_numpy(x.astype(np.float32) / 255.0)).numpy()
        base.append(psnr(enc.encode(lin), y))
    names = [p.name for p in val_files]
    kodak = [i for i, n in enumerate(names) if n.lower().startswith("kodim")]  # the images of earlier sessions
    res.phase("eval", images=names, identity_psnr=float(np.mean(base)), identity_psnr_each=base,
              identity_psnr_kodim=float(np.mean([base[i] for i in kodak])) if kodak else None,
              image_sizes=[list(x.shape[:2]) for x in inputs])
    h, w = inputs[0].shape[:2]
    max_patches = max(PatchGrid(x.shape[0], x.shape[1], TileConfig(stride=48)).num_patches for x in inputs)
    model = UNet(ema.config)
    model.load_state_dict(ema.state_dict())
    cuda = device.startswith("cuda")
    backend = TorchBackend(model, meta, device=device, dtype="fp16" if cuda else "fp32", compile=cuda,
                           cuda_graph=cuda, max_batch_size=max_patches if cuda else None)
    # the defaults (dpm-sde and dpm: 3rd order) first, then 0.1's default (dpm-sde 2M at 20) to compare with
    settings = [("dpm-sde", 20, None), ("dpm-sde", 10, None), ("dpm-sde", 20, 2), ("dpm", 20, None),
                ("dpm-single", 20, 3),
                ("ddpm", 1000, None), ("dpm-sde", 50, None), ("ddim", 50, None), ("ddim", 200, None)]
    # one reconstructor per fusion mode; swapping its sampler keeps the recorded step graph (same image size)
    recs = {}
    merges = ("step", "end") if meta.formulation.is_default else ("step",)  # end: eps over the RAW only
    for merge in merges:
        tiles = TileConfig(stride=48 if merge == "step" else 64, merge=merge, batch_size=max_patches)
        recs[merge] = RawReconstructor(backend, sampler=SamplerConfig(method="dpm", steps=2), tiles=tiles,
                                       step_graph=cuda and merge == "step")
        t = time.perf_counter()
        out = recs[merge].reconstruct(inputs[0], seed=0)  # warm-up: compile, capture; not timed
        res.phase("eval", **{f"warmup_seconds_{merge}": time.perf_counter() - t,
                             f"step_graph_{merge}": bool(out.extra.get("step_graph"))})
    table, recon = [], {}
    per_eval = None
    for method, steps, order in settings:
        for merge in merges:
            est = None if per_eval is None else per_eval * steps * len(inputs)
            if est is not None and elapsed() + est > args.eval_until:
                log.warning("skip %s-%d %s: needs ~%.0f s, budget left %.0f s", method, steps, merge, est,
                            args.eval_until - elapsed())
                table.append({"sampler": method, "steps": steps, "merge": merge, "skipped": True,
                              "estimated_s": est})
                res.phase("eval", table=table)
                continue
            rec = recs[merge]
            rec.sampler = SamplerConfig(method=method, steps=steps, order=order)
            scores, times = [], []
            for k, (x, y) in enumerate(zip(inputs, targets)):
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = rec.reconstruct(x, seed=k)
                times.append(time.perf_counter() - t)
                scores.append(psnr(out.encoded, y))
                if (method, steps, merge) == ("dpm-sde", 20, "step"):
                    recon[f"pred_{val_files[k].stem}"] = out.encoded.astype(np.float16)
            per_eval = max(per_eval or 0.0, float(np.mean(times)) / steps)
            table.append({"sampler": method, "steps": steps, "order": order, "merge": merge,
                          "psnr": float(np.mean(scores)), "psnr_each": dict(zip(names, scores)),
                          "psnr_kodim": float(np.mean([scores[i] for i in kodak])) if kodak else None,
                          "seconds_per_image": float(np.mean(times)),
                          "patches": PatchGrid(h, w, rec.tiles).num_patches,
                          "step_graph": bool(out.extra.get("step_graph"))})
            res.phase("eval", table=table)
            log.info("%s-%d %s: %.2f dB, %.3f s/image", method, steps, merge, np.mean(scores), np.mean(times))
            if recon and not (Path(args.out) / "recon.npz").exists():
                np.savez_compressed(Path(args.out) / "recon.npz", **recon)
    for rec in recs.values():
        rec.close()
    backend.close()


def _matmul_tflops(device: str) -> float:
    """fp16 8192^3 matmul throughput: the card's practical tensor-core ceiling, measured in the same run."""
    x = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    for _ in range(3):
        x @ x
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(10):
        x @ x
    ev[1].record()
    ev[1].synchronize()
    return 10 * 2 * 8192**3 / (ev[0].elapsed_time(ev[1]) / 1e3) / 1e12


def phase_bench(args: SessionArgs, res: Results, device: str, model_state, config):
    """U-Net throughput of the fast path, the whole-step CUDA graph against per-batch replay on a 2048x2048 image
    (side by side), DDPM-1000 on the fast path, a kernel profile, and one compiler experiment (freezing)."""
    from rawdiff_bench.bench import bench_image, bench_unet, flops_per_patch, profile_unet
    from rawdiff_bench.runner import torch_variant
    from rawdiff_infer.checkpoint import ModelMeta
    from rawdiff_infer.model import UNet

    cuda = device.startswith("cuda")
    model = UNet(config)
    model.load_state_dict(model_state)
    meta = ModelMeta(model=config)
    gflop = flops_per_patch(config, 64) / 1e9
    res.phase("bench", gflop_per_patch=gflop)
    if cuda:
        res.phase("bench", matmul_fp16_tflops=_matmul_tflops(device))
    unet_rows, image_rows = [], []
    batch = 1024 if cuda else 8
    side = 2048 if cuda and not args.tiny else 128
    img = (np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)

    def unet_row(variant: str, be, dtype: str) -> None:
        r = bench_unet(be, batch=batch, variant=variant, warmup=3, repeats=10 if cuda else 2, gflop=gflop)
        r.dtype = dtype
        unet_rows.append(asdict(r))
        res.phase("bench", unet=unet_rows)
        log.info("%s %s b%d: %.2f ms, %.1f TFLOP/s", variant, dtype, batch, r.ms_median, r.tflops)

    def image_row(be, variant: str, sampler: str, steps: int, step_graph: bool, warmup: int, repeats: int) -> None:
        ir = bench_image(be, img, sampler=sampler, steps=steps, merge="step", stride=64, batch_size=batch,
                         variant=variant, warmup=warmup, repeats=repeats, write=False, gflop=gflop,
                         step_graph=step_graph)
        image_rows.append(asdict(ir))
        res.phase("bench", images=image_rows)
        log.info("image %dx%d %s-%d step_graph=%s: %.3f s", side, side, sampler, steps, step_graph, ir.denoise_s)

    variant = "graph" if cuda else "cl"
    be = torch_variant(model, meta, variant, "fp16" if cuda else "fp32", device, batch)
    try:
        unet_row(f"torch/{variant}", be, "fp16" if cuda else "fp32")
        steps = 20 if not args.tiny else 2
        image_row(be, f"torch/{variant}", "dpm", steps, False, 1, 3)  # per-batch replay (last session's path)
        if cuda:
            image_row(be, f"torch/{variant}", "dpm", steps, True, 1, 3)  # the whole step as one graph
            per_step = image_rows[-1]["denoise_s"] / steps
            if elapsed() + per_step * 1000 * 1.1 + 60 < args.bench_until:
                image_row(be, f"torch/{variant}", "ddpm", 1000, True, 0, 1)
            else:
                image_rows.append({"sampler": "ddpm", "steps": 1000, "skipped": True,
                                   "estimated_s": per_step * 1000})
                res.phase("bench", images=image_rows)
    except Exception as e:
        res.error("bench fast path", e)
    finally:
        be.close()
        del be
    if cuda:
        torch.cuda.empty_cache()
    if elapsed() < args.bench_until - 20:
        try:  # kernel profile of the compiled U-Net (no graph: the profiler then sees every kernel)
            be = torch_variant(model, meta, "compile" if cuda else "cl", "fp16" if cuda else "fp32", device, batch)
            prof = profile_unet(be, batch=batch if cuda else 2, calls=3 if cuda else 1)
            res.phase("bench", profile=prof)
            lines = [f"U-Net, batch {prof['batch']}, {prof['ms_per_call']:.2f} ms of device time per call",
                     "", "category shares: " + ", ".join(f"{k} {v:.1%}" for k, v in prof["categories"].items()),
                     "", f"{'ms/call':>8} {'share':>6} {'calls':>5}  kernel"]
            lines += [f"{r['ms']:8.3f} {r['share']:6.1%} {r['calls']:5d}  {r['name'][:150]}" for r in prof["kernels"]]
            (Path(args.out) / "profile.txt").write_text("\n".join(lines) + "\n")
            be.close()
            del be
        except Exception as e:
            res.error("profile", e)
    if cuda and elapsed() < args.bench_until - 40:
        try:  # experiment: inductor freezing (weights as constants: folding, conv layout choices)
            import torch._inductor.config as ind

            ind.freezing = True
            be = torch_variant(model, meta, "graph", "fp16", device, batch)
            unet_row("torch/graph+freezing", be, "fp16")
            be.close()
        except Exception as e:
            res.error("bench freezing", e)
        finally:
            ind.freezing = False


def run_session(args: SessionArgs) -> int:
    """All phases in order, each within its budget (seconds from this call on); returns 0 (errors are recorded in
    results.json)."""
    global T0
    T0 = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        stream=sys.stdout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = Results(out / "results.json")
    from rawdiff_bench.bench import environment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    res.set("env", environment())
    res.set("args", asdict(args))
    ema = meta = None
    val_files = select_photos(args.photos)[1]
    if args.weights:
        from rawdiff_infer.checkpoint import load_checkpoint

        ema, meta = load_checkpoint(args.weights, device=device)
    elif "train" not in args.skip:
        try:
            ema, meta, val_files = phase_train(args, res, device)
        except Exception as e:
            res.error("train", e)
    log.info("train phase done at %.0f s", elapsed())
    if ema is not None and "eval" not in args.skip:
        try:
            phase_eval(args, res, device, ema, meta, val_files)
        except Exception as e:
            res.error("eval", e)
    log.info("eval phase done at %.0f s", elapsed())
    if "bench" not in args.skip:
        try:
            from rawdiff_infer.model import UNet, UNetConfig

            config = ema.config if ema is not None else UNetConfig()
            state = ema.state_dict() if ema is not None else UNet(config).state_dict()
            phase_bench(args, res, device, state, config)
        except Exception as e:
            res.error("bench", e)
    res.set("total_seconds", elapsed())
    log.info("all done at %.0f s", elapsed())
    return 0


def _learning_rate() -> click.ParamType:
    """A finite learning rate in (0, 1]."""
    from rawdiff_train.cli import FiniteFloat

    return FiniteFloat(0.0, 1.0, lo_open=True)


def _seconds() -> click.ParamType:
    """A finite number of seconds >= 0 ('nan' and 'inf' refused)."""
    from rawdiff_train.cli import FiniteFloat

    return FiniteFloat(0.0)


@click.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--photos", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="Photo folder; repeat to combine (e.g. shared/data/photos and train/photos).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Results folder (results.json, weights).")
@click.option("--tiny", is_flag=True, help="CPU rehearsal: tiny model, few steps, small images.")
@click.option("--steps", type=click.IntRange(1), default=6000, show_default=True,
              help="Planned steps (the cosine is fitted to the time unless --no-fit-schedule).")
@click.option("--batch", type=click.IntRange(1), default=256, show_default=True)
@click.option("--lr", type=_learning_rate(), default=2e-4, show_default=True, help="Peak learning rate, in (0, 1].")
@click.option("--warmup", type=click.IntRange(0), help="Warm-up steps (default: min(1000, steps / 5)).")
@click.option("--init-weights", type=click.Path(exists=True),
              help="Fine-tune from these weights (sharded dir or .safetensors).")
@click.option("--variants", type=click.IntRange(1), default=12, show_default=True, help="Renderings per photo.")
@click.option("--scene-aug/--no-scene-aug", default=True, show_default=True, help="Scene augmentation.")
@click.option("--workers", type=click.IntRange(1), default=16, show_default=True, help="Rendering threads.")
@click.option("--log-every", type=click.IntRange(1), default=100, show_default=True, help="Loss log (steps).")
@click.option("--val-every", type=click.IntRange(1), default=500, show_default=True,
              help="Held-out PSNR curve (steps).")
@click.option("--val-crop", type=click.IntRange(64), default=256, show_default=True, help="Curve crop (px).")
@click.option("--val-sampler", type=click.Choice(["dpm-sde", "dpm", "ddim", "ddpm"]), default="dpm-sde",
              show_default=True)
@click.option("--val-steps", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--train-until", type=_seconds(), default=320.0, show_default=True, help="Seconds since start.")
@click.option("--eval-until", type=_seconds(), default=420.0, show_default=True)
@click.option("--bench-until", type=_seconds(), default=555.0, show_default=True)
@click.option("--fit-schedule/--no-fit-schedule", default=True, show_default=True,
              help="Shorten the cosine to the time budget; off: stop at the budget, --resume-run continues.")
@click.option("--resume-run", is_flag=True, help="Continue the trainer state in --run-dir.")
@click.option("--run-dir", default="/tmp/rawdiff-gpu-run", show_default=True, type=click.Path(file_okay=False),
              help="Trainer state (large; not under --out).")
@click.option("--skip", multiple=True, type=click.Choice(["train", "eval", "bench"]))
@click.option("--weights", type=click.Path(exists=True), help="Use these weights instead of training.")
@formulation_options
@click.option("--clipped-fraction", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Share of every batch cut around a clipped pixel (PairPool).")
def cli(**opts: Any) -> None:
    if opts["resume_run"] and not (Path(opts["run_dir"]) / "latest").is_file():
        raise click.UsageError(f"--resume-run: {opts['run_dir']} holds no trainer state")
    sys.exit(run_session(SessionArgs(**opts)))


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m rawdiff_bench.gpu_session ...``."""
    cli.main(args=argv, prog_name="python -m rawdiff_bench.gpu_session")


if __name__ == "__main__":
    main()
