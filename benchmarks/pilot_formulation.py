"""The formulation pilot: which formulation spends a network on what the ISP lost, decided on the CPU.

    python -m rawdiff_bench.pilot_formulation --photos .data/train-photos --heldout ../shared/data/train-photos \\
        --heldout ../shared/data/photos --out benchmarks/results/pilot --steps 1500

Every candidate (``CANDIDATES``: a formulation, a loss, a clipped-pixel weight and a clipped-patch share) trains
the tiny U-Net (``UNetConfig.tiny``) from the same initial weights on the same patches in the same order (one
pair pool, one seed) for the same number of steps, so the candidates differ only in what they learn. Each is then
measured as ``rawdiff-infer`` runs it (default sampler, 10 evaluations, ISP consistency on, the band of each
input) on crops of the held-out photos rendered by the synthetic camera (``evaluate.photo_cases``: a fixed JPEG
draw per photo), per region against the closed-form inverse of the same ISP (``evaluate.closed_form_rows``): all
pixels, determined pixels, clipped pixels, and determined pixels of the JPEG inputs. The held-out photos are
found in the ``--heldout`` folders by ``rawdiff_train.heldout`` (never the training folders' photos).

Writes ``pilot.json`` (every row, the training logs) and ``pilot.md`` (the table) to ``--out``.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import click
import torch

from rawdiff_infer.fsio import write_bytes

log = logging.getLogger("pilot")

__all__ = ["Candidate", "CANDIDATES", "main", "run_pilot"]


@dataclass(frozen=True)
class Candidate:
    """One formulation under test (``rawdiff_infer.formulation`` and ``rawdiff_train.trainer.TrainConfig``)."""

    name: str
    prediction: str = "eps"
    space: str = "raw"
    loss: str = "l2"
    clipped_weight: float = 1.0
    clipped_fraction: float = 0.0


#: the candidates of the pilot, the shipped formulation first
CANDIDATES: tuple[Candidate, ...] = (
    Candidate("eps/raw (shipped)"),
    Candidate("eps/residual", space="residual"),
    Candidate("x0/residual, l2+l1", prediction="x0", space="residual", loss="l2+l1"),
    Candidate("x0/residual, l2+l1, clipped x4 + 50% clipped patches", prediction="x0", space="residual",
              loss="l2+l1", clipped_weight=4.0, clipped_fraction=0.5),
    Candidate("x0/raw, l2+l1", prediction="x0", loss="l2+l1"),
)


def _pool(photos: Sequence[str], variants: int, max_side: int, clipped_fraction: float):  # noqa: ANN202
    """The pair pool of the training photos (held-out ones refused), copies up to ``max_side`` pixels."""
    from PIL import Image

    from rawdiff_bench.gpu_session import make_pairs, select_photos
    from rawdiff_infer.camera import get_camera
    from rawdiff_train.camera_isp import described_camera
    from rawdiff_train.pool import PairPool
    from rawdiff_train.scene_aug import SceneAugmentation

    train, _ = select_photos(photos)
    small = []
    for f in train:
        with Image.open(f) as im:
            if max(im.size) <= max_side:
                small.append(f)
    cam = described_camera(get_camera("nikon-d700"))
    pairs = make_pairs(small, camera=cam, seed=0, variants=variants, workers=2, augmentation=SceneAugmentation())
    return PairPool(pairs, patch=64, clipped_fraction=clipped_fraction), cam, [f.name for f in small]


def _train(c: Candidate, pool, cam, steps: int, batch: int, lr: float, out: Path):  # noqa: ANN001, ANN202
    from rawdiff_infer.checkpoint import ModelMeta
    from rawdiff_infer.formulation import Formulation
    from rawdiff_infer.model import UNetConfig
    from rawdiff_train.camera_isp import SyntheticCamera
    from rawdiff_train.trainer import TrainConfig, Trainer

    meta = ModelMeta(model=UNetConfig.tiny(), camera=cam, isp=SyntheticCamera(cam).isp_model(),
                     formulation=Formulation(prediction=c.prediction, space=c.space))
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=lr, lr_min=lr / 100, warmup=max(1, steps // 20),
                      ema_decay=0.995, seed=0, loss=c.loss, clipped_weight=c.clipped_weight, ckpt_every=10**9,
                      val_every=10**9, log_every=max(1, steps // 20))
    pool.clipped_fraction = c.clipped_fraction
    trainer = Trainer(pool, out, config=cfg, meta=meta, device="cpu")
    t = time.perf_counter()
    rows = trainer.run(progress=False)
    return trainer.ema, meta, {"seconds": time.perf_counter() - t, "log": rows}


def _slug(name: str) -> str:
    """A candidate's run folder name: letters, digits and '-' (every candidate its own folder)."""
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def _jpeg_determined(rows, cases) -> float | None:  # noqa: ANN001
    """Mean determined-pixel PSNR over the JPEG inputs (None if there is none)."""
    jpeg = {c.name for c in cases if c.jpeg_quality is not None}
    vals = [r.psnr_determined for r in rows if r.image in jpeg and r.psnr_determined is not None]
    return statistics.fmean(vals) if vals else None


def _row(name: str, rows, cases, extra: dict) -> dict[str, Any]:  # noqa: ANN001
    from rawdiff_bench.evaluate import summarise

    s = summarise(rows)[0]
    return {"candidate": name, "all": s["psnr"], "determined": s["psnr_determined"], "clipped": s["psnr_clipped"],
            "jpeg_determined": _jpeg_determined(rows, cases), "images_clipped": s["images_clipped"],
            "images": s["images"], **extra}


def _table(rows: Sequence[dict[str, Any]], cf: dict[str, Any]) -> str:
    def d(v: float | None, ref: float | None) -> str:
        return "-" if v is None else f"{v:.2f} ({v - ref:+.2f})" if ref is not None else f"{v:.2f}"

    keys = ("all", "determined", "clipped", "jpeg_determined")
    lines = ["| candidate | all dB (vs closed form) | determined | clipped | JPEG inputs, determined | train s | "
             "final loss |", "|---|---|---|---|---|---|---|"]
    lines.append(f"| {cf['candidate']} | " + " | ".join(d(cf[k], None) for k in keys) + " | - | - |")
    for r in rows:
        lines.append(f"| {r['candidate']} | " + " | ".join(d(r[k], cf[k]) for k in keys)
                     + f" | {r['train_seconds']:.0f} | {r['final_loss']:.4f} |")
    return "\n".join(lines)


def run_pilot(photos: Sequence[str], heldout: Sequence[str], out: Path, *, steps: int, batch: int, lr: float,
              variants: int, max_side: int, crop: int, per_side: int,
              candidates: Sequence[Candidate] = CANDIDATES) -> dict[str, Any]:
    """Train and measure every candidate (module docstring); returns what ``pilot.json`` holds."""
    from rawdiff_bench.evaluate import CLOSED_FORM, closed_form_rows, evaluate, photo_cases
    from rawdiff_bench.gpu_session import select_photos
    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_infer.tiling import TileConfig

    pool, cam, train_names = _pool(photos, variants, max_side, 0.0)
    _, held = select_photos(heldout)
    held_dir = out / "heldout"
    held_dir.mkdir(parents=True, exist_ok=True)
    for f in held:  # photo_cases reads a folder: link the held-out photos found into one
        link = held_dir / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    cases = photo_cases(held_dir, cam, crop=crop, per_side=per_side)
    result: dict[str, Any] = {"train_files": train_names, "heldout_files": [f.name for f in held],
                              "cases": len(cases), "steps": steps, "batch": batch, "lr": lr, "rows": []}
    isp = None
    for c in candidates:
        log.info("training %s", c.name)
        ema, meta, info = _train(c, pool, cam, steps, batch, lr, out / "runs" / _slug(c.name))
        isp = meta.isp
        backend = TorchBackend(ema, meta, device="cpu", dtype="fp32")
        rows = evaluate(backend, cases, ["dpm-sde:10"], [0], tiles=TileConfig(patch_size=64, batch_size=64))
        row = _row(c.name, rows, cases, {"train_seconds": info["seconds"], "final_loss": info["log"][-1]["loss"],
                                         "config": asdict(c)})
        result["rows"].append(row)
        log.info("%s: %s", c.name, {k: row[k] for k in ("all", "determined", "clipped", "jpeg_determined")})
        write_bytes(out / "pilot.json", json.dumps(result, indent=1, default=str).encode(), overwrite=True)
    result["closed_form"] = _row(CLOSED_FORM, closed_form_rows(cases, isp), cases, {})
    result["table"] = _table(result["rows"], result["closed_form"])
    write_bytes(out / "pilot.json", json.dumps(result, indent=1, default=str).encode(), overwrite=True)
    write_bytes(out / "pilot.md", (result["table"] + "\n").encode(), overwrite=True)
    return result


@click.command("pilot_formulation", help=__doc__.split("\n\n")[0])
@click.option("--photos", multiple=True, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--heldout", multiple=True, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--steps", type=click.IntRange(1), default=1500, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(0.0, 1.0, min_open=True), default=1e-3, show_default=True)
@click.option("--variants", type=click.IntRange(1), default=2, show_default=True)
@click.option("--max-side", type=click.IntRange(64), default=640, show_default=True,
              help="Train on the copies whose long side is at most this (pixels).")
@click.option("--crop", type=click.IntRange(64), default=160, show_default=True)
@click.option("--per-side", type=click.IntRange(1), default=2, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--only", multiple=True, help="Run only the candidates whose name starts with this.")
def cli(photos, heldout, out, steps, batch, lr, variants, max_side, crop, per_side, threads, only) -> None:  # noqa
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    torch.set_num_threads(threads)
    chosen = [c for c in CANDIDATES if not only or any(c.name.startswith(o) for o in only)]
    res = run_pilot(photos, heldout, Path(out), steps=steps, batch=batch, lr=lr, variants=variants,
                    max_side=max_side, crop=crop, per_side=per_side, candidates=chosen)
    click.echo(res["table"])


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="python -m rawdiff_bench.pilot_formulation")


if __name__ == "__main__":
    sys.exit(main())
