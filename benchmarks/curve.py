"""The training curve of a GPU session: loss and held-out PSNR (all pixels and clipped ones) against the step.

    python -m rawdiff_bench.curve results.json curve.png [--closed-form-all DB --closed-form-clipped DB]

Reads a ``rawdiff_bench.gpu_session`` results.json (``phases.train.log``: the loss rows; ``phases.train.curve``:
the held-out points, ``val_psnr`` and ``val_psnr_clipped``) and draws two panels. The closed-form inverse's PSNR of
the same held-out crops, when given, is drawn as a horizontal line in the PSNR panel: the bar a model must clear.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click

__all__ = ["curve_points", "plot_curve", "main"]


def curve_points(results: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """{"loss", "psnr", "psnr_clipped"} -> [(step, value)], finite values only, from a session's results."""
    train = results.get("phases", {}).get("train", {})
    out: dict[str, list[tuple[int, float]]] = {"loss": [], "psnr": [], "psnr_clipped": []}
    for row in train.get("log") or []:
        if isinstance(row.get("loss"), (int, float)) and math.isfinite(row["loss"]):
            out["loss"].append((int(row["step"]), float(row["loss"])))
    for p in train.get("curve") or []:
        for key, name in (("val_psnr", "psnr"), ("val_psnr_clipped", "psnr_clipped")):
            v = p.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[name].append((int(p["step"]), float(v)))
    return out


def plot_curve(results: dict[str, Any], path: str | Path, *, closed_form: dict[str, float] | None = None,
               title: str = "", overwrite: bool = False) -> None:
    """Draw ``curve_points(results)`` to a PNG at ``path`` (no-clobber unless ``overwrite``). ``closed_form``:
    {"all": dB, "clipped": dB} reference lines. Raises ValueError when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rawdiff_bench.evaluate import _save

    pts = curve_points(results)
    if not pts["loss"] and not pts["psnr"]:
        raise ValueError("the results hold no training log and no held-out curve")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if pts["loss"]:
        ax1.plot(*zip(*pts["loss"]), lw=1, marker="." if len(pts["loss"]) < 50 else None)
        ax1.set_yscale("log")
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    for name, label in (("psnr", "held-out, all pixels"), ("psnr_clipped", "held-out, clipped pixels")):
        if pts[name]:
            ax2.plot(*zip(*pts[name]), marker="o", label=label)
    for key, style in (("all", "--"), ("clipped", ":")):
        if closed_form and closed_form.get(key) is not None:
            ax2.axhline(closed_form[key], color="k", ls=style, lw=1, label=f"closed form, {key}")
    ax2.set(xlabel="step", ylabel="PSNR on the encoded RAW (dB)", title="held-out crops")
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path, overwrite=overwrite)


@click.command("curve", help=__doc__.split("\n\n")[0])
@click.argument("results_json", type=click.Path(exists=True, dir_okay=False))
@click.argument("png", type=click.Path(dir_okay=False))
@click.option("--closed-form-all", type=float, help="Closed-form PSNR of the same crops, all pixels (dB).")
@click.option("--closed-form-clipped", type=float, help="... clipped pixels (dB).")
@click.option("--title", default="")
@click.option("--force", is_flag=True, help="Replace an existing PNG.")
def cli(results_json: str, png: str, closed_form_all: float | None, closed_form_clipped: float | None, title: str,
        force: bool) -> None:
    if Path(png).exists() and not force:
        click.echo(f"curve: error: {png} exists (--force replaces it)", err=True)
        sys.exit(2)
    try:
        results = json.loads(Path(results_json).read_text())
        plot_curve(results, png, closed_form={"all": closed_form_all, "clipped": closed_form_clipped},
                   title=title, overwrite=force)
    except (OSError, ValueError) as e:
        click.echo(f"curve: error: {e}", err=True)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="python -m rawdiff_bench.curve")


if __name__ == "__main__":
    main()
