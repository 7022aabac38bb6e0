"""PSNR of the bundled (or any) model on the held-out photos, on any device: the sampler table's CPU companion.

Renders each held-out photo through the model's synthetic camera (the seed the GPU session uses), reconstructs the
RAW with the chosen samplers and reports PSNR on the encoded RAW and the LibRaw round trip against the photo:

    python -m rawdiff_bench.heldout_eval --photos ../shared/data/photos --sampler dpm-sde --sampler dpm \\
        [--steps 20] [--crop 128] [--json out.json]

``--crop N`` takes an N x N crop at rows 192.., columns 320.. (the CPU-affordable variant; no round trip).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

VAL_NAMES = ("kodim03", "kodim07", "kodim13")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", required=True, help="folder holding kodim03/07/13.png")
    ap.add_argument("--ckpt", help="model (default: the bundled one)")
    ap.add_argument("--sampler", action="append", required=True, help="repeat for several")
    ap.add_argument("--steps", type=int, help="model evaluations (default: the sampler's)")
    ap.add_argument("--eta", type=float, default=0.0)
    ap.add_argument("--crop", type=int, help="evaluate an N x N crop of each photo instead of the whole photo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    from rawdiff_infer.backends import default_checkpoint
    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_infer.metrics import psnr
    from rawdiff_infer.pipeline import RawReconstructor, SamplerConfig
    from rawdiff_infer.rawspace import RawEncoding
    from rawdiff_infer.tiling import TileConfig
    from rawdiff_train.camera_isp import srgb_to_linear
    from rawdiff_train.data import PhotoPairSource

    from .roundtrip import roundtrip_psnr

    be = TorchBackend.from_checkpoint(args.ckpt or default_checkpoint(), device=args.device)
    files = [Path(args.photos) / f"{n}.png" for n in VAL_NAMES]
    src = PhotoPairSource(files, camera=be.meta.camera, seed=10_000)
    enc = RawEncoding()
    cases = []
    for i, name in enumerate(VAL_NAMES):
        pair = src[i]
        x = np.round(np.clip(pair.srgb, 0, 1) * 255).astype(np.uint8)
        y = enc.encode(pair.raw.astype(np.float32))
        if args.crop:
            x, y = x[192:192 + args.crop, 320:320 + args.crop], y[192:192 + args.crop, 320:320 + args.crop]
        base = psnr(enc.encode(srgb_to_linear(torch.from_numpy(x / 255.0).float()).numpy()), y)
        cases.append((name, x, y, base))
    rows = [{"sampler": "identity-like baseline", "image": n, "psnr": b} for n, _, _, b in cases]
    for method in args.sampler:
        rec = RawReconstructor(be, sampler=SamplerConfig(method=method, steps=args.steps, eta=args.eta),
                               tiles=TileConfig(stride=48, batch_size=32 if args.device == "cpu" else 512))
        for k, (name, x, y, _) in enumerate(cases):
            t = time.perf_counter()
            out = rec.reconstruct(x, seed=k)
            row = {"sampler": method, "steps": rec.sampler.num_steps, "eta": args.eta, "image": name,
                   "psnr": psnr(out.encoded, y), "seconds": time.perf_counter() - t}
            if not args.crop:
                row["roundtrip_psnr"] = roundtrip_psnr(out.linear, x, be.meta.camera)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for method in ["identity-like baseline", *args.sampler]:
        sel = [r for r in rows if r["sampler"] == method]
        print(f"{method}: mean PSNR {np.mean([r['psnr'] for r in sel]):.2f} dB over {len(sel)} images")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "crop": args.crop, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
