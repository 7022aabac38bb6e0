"""Is ONNX Runtime worth a CPU path? fp32 and static INT8 (calibrated on training patches) against torch, one run.

The question of the CPU issue: rawdiff-infer on a CPU uses torch (fp32, or bf16 where the CPU has native bf16).
ONNX Runtime's CPU execution provider, fp32 and a static INT8 quantisation of the same graph (QDQ, per-channel
weights, activations calibrated on real training patches at several noise levels), are measured here side by side
with torch in one process: ms per call of ``--batch`` 64x64 patches (median of ``--repeats``), patches/s, and the
INT8 model's error against fp32 on held-out patches (PSNR of eps, where 40 dB and more is harmless). A path is worth
adding only if it is faster than the fastest torch variant; the result goes into benchmarks/RESULTS.md.

    python -m rawdiff_bench.cpu_int8 --onnx bundled.onnx --calibration ../shared/data/photos --heldout heldout/ \
        --json int8.json
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

__all__ = ["main", "patches_from"]


def patches_from(folder: str | Path, count: int, seed: int, patch: int = 64) -> list[dict[str, np.ndarray]]:
    """``count`` model inputs from the photos of ``folder``: the synthetic camera's (sRGB, RAW) pairs, a random 64x64
    patch of each, noised to a random timestep (x_t = alpha x0 + sigma eps): the inputs the U-Net sees."""
    from rawdiff_infer.rawspace import RawEncoding
    from rawdiff_infer.schedule import Schedule
    from rawdiff_train.data import PHOTO_EXTENSIONS, PhotoPairSource, list_files

    files = list_files(folder, PHOTO_EXTENSIONS)
    src = PhotoPairSource(files, seed=seed)
    rng = np.random.default_rng(seed)
    sched, enc = Schedule(), RawEncoding()
    out = []
    for k in range(count):
        pair = src[k % len(src)]
        h, w = pair.srgb.shape[:2]
        y, x = rng.integers(0, h - patch + 1), rng.integers(0, w - patch + 1)
        cond = pair.srgb[y:y + patch, x:x + patch].transpose(2, 0, 1) * 2 - 1
        x0 = enc.encode(pair.raw[y:y + patch, x:x + patch]).transpose(2, 0, 1) * 2 - 1
        t = float(rng.uniform(0, 999))
        a, s = (float(v) for v in sched.alpha_sigma(t))
        xt = a * x0 + s * rng.standard_normal(x0.shape)
        out.append({"x_t": xt[None].astype(np.float32), "cond": cond[None].astype(np.float32),
                    "t": np.array([t], dtype=np.float32)})
    return out


def _batch(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([i[k] for i in items]) for k in items[0]}


def _time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@click.command("rawdiff-cpu-int8", cls=OneLineCommand, help=__doc__)
@click.option("--onnx", "onnx_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The fp32 ONNX of the model (rawdiff-export).")
@click.option("--ckpt", default=None, help="The same model's checkpoint for the torch rows (default: bundled).")
@click.option("--calibration", required=True, type=click.Path(exists=True, file_okay=False),
              help="Training photos for the INT8 calibration.")
@click.option("--heldout", required=True, type=click.Path(exists=True, file_okay=False),
              help="Held-out photos for the INT8 error.")
@click.option("--batch", type=click.IntRange(1, 256), default=16, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 100), default=5, show_default=True)
@click.option("--calibration-patches", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the rows here (not replaced).")
def cli(onnx_path: str, ckpt: str | None, calibration: str, heldout: str, batch: int, repeats: int,
        calibration_patches: int, json_path: str | None) -> None:
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from rawdiff_infer.backends import default_checkpoint
    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_infer.cpu import default_cpu_dtype
    from rawdiff_infer.fsio import write_bytes

    if json_path and Path(json_path).exists():
        raise click.UsageError(f"{json_path}: exists; not replaced")
    calib = patches_from(calibration, calibration_patches, seed=1)
    test = _batch(patches_from(heldout, batch, seed=2))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    int8_path = Path(onnx_path).with_suffix(".int8.onnx")
    quantize_static(onnx_path, str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sessions = {name: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
                for name, p in (("onnxruntime fp32", onnx_path), ("onnxruntime int8", int8_path))}
    ref = sessions["onnxruntime fp32"].run(None, test)[0]
    rows = []
    for name, sess in sessions.items():
        out = sess.run(None, test)[0]
        mse = float(np.mean((out - ref) ** 2))
        ms = _time(lambda sess=sess: sess.run(None, test), repeats)
        rows.append({"path": name, "ms": ms, "patches_per_s": batch / ms * 1e3,
                     "eps_psnr_vs_fp32_db": 10 * np.log10(4.0 / max(mse, 1e-20))})
    tensors = {k: torch.from_numpy(v) for k, v in test.items()}
    for dt in ("fp32", "bf16"):
        if dt == "bf16" and default_cpu_dtype()[0] != "bf16":
            continue
        be = TorchBackend.from_checkpoint(ckpt or default_checkpoint(), dtype=dt)
        with torch.inference_mode():
            out = be(tensors["x_t"], tensors["cond"], tensors["t"]).float().numpy()
            ms = _time(lambda be=be: be(tensors["x_t"], tensors["cond"], tensors["t"]), repeats)
        mse = float(np.mean((out - ref) ** 2))
        rows.append({"path": f"torch {dt} channels_last", "ms": ms, "patches_per_s": batch / ms * 1e3,
                     "eps_psnr_vs_fp32_db": 10 * np.log10(4.0 / max(mse, 1e-20))})
    click.echo(f"| path | ms per call of {batch} | patches/s | eps PSNR against onnxruntime fp32 |")
    click.echo("|---|---|---|---|")
    for r in rows:
        click.echo(f"| {r['path']} | {r['ms']:.1f} | {r['patches_per_s']:.1f} | {r['eps_psnr_vs_fp32_db']:.1f} dB |")
    if json_path:
        write_bytes(json_path, json.dumps({"batch": batch, "rows": rows}, indent=1).encode())


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="rawdiff-cpu-int8")


if __name__ == "__main__":
    main()
