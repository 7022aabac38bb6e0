"""Where the deterministic samplers lose: the model's x0 prediction as a function of the noise level.

    python -m rawdiff_bench.diagnose --photos HELDOUT_DIR --json diag.json --plot diag.png

On patches of held-out photos (rendered by the model's synthetic camera, so the RAW is known), for a grid of noise
levels t from T-1 to 0 (uniform in log-SNR): x_t = alpha_t x0 + sigma_t eps with the *true* x0, then the model's
x0 prediction x0_hat = (x_t - sigma_t eps_hat) / alpha_t, clamped. Reported per level:

- ``psnr``: PSNR of x0_hat against x0 (encoded RAW, [0, 1]), mean over patches;
- ``ratio_mean`` / ``ratio_logstd`` / ``ratio_min`` / ``ratio_max``: brightness ratio mean(x0_hat) / mean(x0) per
  patch (1 is right) and its spread;
- ``follow``: how much of a brightness change already present in x_t the prediction keeps: x0 is brightened by
  25 % (in [0, 1]) inside x_t only, and follow = (change of mean(x0_hat)) / (change of mean(x0)), median over
  patches. 0: the model sets the brightness from the sRGB condition alone; 1: it takes whatever brightness x_t
  carries, so an error made earlier on the trajectory is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import torch

from rawdiff_infer.console import OneLineCommand

__all__ = ["diagnose"]


def _patches(cases, per_image: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    xs, cs = [], []
    for c in cases:
        h, w = c.target.shape[:2]
        for _ in range(per_image):
            r, q = rng.integers(0, h - 64), rng.integers(0, w - 64)
            xs.append(c.target[r:r + 64, q:q + 64])
            cs.append(c.srgb[r:r + 64, q:q + 64] / 255.0)
    to = lambda a: torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).float() * 2 - 1  # noqa: E731
    return to(xs), to(cs)


def diagnose(backend, cases, *, levels: int = 14, per_image: int = 12, seed: int = 0, batch: int = 24) -> list[dict]:
    """One row per noise level (see the module docstring)."""
    from rawdiff_infer.schedule import Schedule

    sch = Schedule(backend.meta.schedule)
    x0, cond = _patches(cases, per_image, seed)
    n = x0.shape[0]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    u0 = (x0 + 1) / 2
    bright = (u0 * 1.25).clamp(0, 1) * 2 - 1
    ts = sch.timesteps(levels, "logSNR")

    def predict(x0_in: torch.Tensor, t: float) -> torch.Tensor:
        a, s = (float(v) for v in sch.alpha_sigma(t))
        xt = a * x0_in + s * eps
        out = [backend(xt[k:k + batch], cond[k:k + batch], torch.full((min(batch, n - k),), t)) for k in
               range(0, n, batch)]
        return (((xt - s * torch.cat(out)) / a).clamp(-1, 1) + 1) / 2

    rows = []
    with torch.inference_mode():
        for t in ts:
            uh, ub = predict(x0, float(t)), predict(bright, float(t))
            mse = ((uh - u0) ** 2).flatten(1).mean(1)
            ratio = uh.flatten(1).mean(1) / u0.flatten(1).mean(1).clamp_min(1e-3)
            dref = ((bright + 1) / 2 - u0).flatten(1).mean(1).clamp_min(1e-3)
            follow = (ub.flatten(1).mean(1) - uh.flatten(1).mean(1)) / dref
            lam = float(sch.lambda_(t))
            rows.append({"t": float(t), "snr_db": 20 * lam / np.log(10), "sigma_over_alpha": float(np.exp(-lam)),
                         "psnr": float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean()),
                         "ratio_mean": float(ratio.mean()), "ratio_logstd": float(ratio.log().std()),
                         "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
                         "follow": float(follow.median())})
    return rows


def plot(rows: list[dict], path: str | Path, *, overwrite: bool = False) -> None:
    """PSNR and follow (left), brightness ratio (right) against the noise level; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snr = [r["snr_db"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.plot(snr, [r["psnr"] for r in rows], "o-", color="C0")
    a1.set_xlabel("noise level: SNR of x_t (dB)")
    a1.set_ylabel("PSNR of the x0 prediction (dB)", color="C0")
    b1 = a1.twinx()
    b1.plot(snr, [r["follow"] for r in rows], "s--", color="C3")
    b1.set_ylabel("follow: share of x_t's brightness kept", color="C3")
    b1.set_ylim(0, 1.05)
    a1.set_title("x0 prediction from the true x_t")
    a1.grid(alpha=0.3)
    a2.plot(snr, [r["ratio_mean"] for r in rows], "o-", label="mean")
    a2.fill_between(snr, [r["ratio_min"] for r in rows], [r["ratio_max"] for r in rows], alpha=0.25,
                    label="min-max over patches")
    a2.axhline(1.0, color="grey", linestyle="--")
    a2.set_xlabel("noise level: SNR of x_t (dB)")
    a2.set_ylabel("brightness of the x0 prediction / truth")
    a2.set_title("brightness bias")
    a2.legend()
    a2.grid(alpha=0.3)
    fig.tight_layout()
    from rawdiff_infer.fsio import atomic_write

    with atomic_write(path, overwrite=overwrite) as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


@click.command("diagnose", cls=OneLineCommand, help=__doc__)
@click.option("--photos", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--ckpt", help="Model (default: the bundled one).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace existing --json / --plot files.")
def main(photos: str, ckpt: str | None, json_path: str | None, plot_path: str | None, force: bool) -> None:
    from rawdiff_infer.backends import default_checkpoint
    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_infer.fsio import write_bytes

    from .evaluate import check_report_paths, photo_cases

    check_report_paths(json_path, plot_path, force=force)
    be = TorchBackend.from_checkpoint(ckpt or default_checkpoint())
    rows = diagnose(be, photo_cases(photos, be.meta.camera))
    for r in rows:
        click.echo(f"t {r['t']:6.1f}  SNR {r['snr_db']:6.1f} dB  PSNR {r['psnr']:5.2f}  brightness {r['ratio_mean']:.3f} "
                   f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]  follow {r['follow']:.2f}")
    if json_path:
        write_bytes(json_path, json.dumps(rows, indent=1).encode(), overwrite=force)
    if plot_path:
        plot(rows, plot_path, overwrite=force)


if __name__ == "__main__":
    main()
