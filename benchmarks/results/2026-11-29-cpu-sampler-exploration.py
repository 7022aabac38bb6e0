# The ad hoc exploration script of session 3, as it ran (kept as the record of how the rows of
# 2026-11-29-cpu-sampler-exploration.jsonl were made; the later rows ran the same `run` with the variants named
# there). Not part of the package: the confirmed candidates are rawdiff-eval specs.
"""Exploration of issue-13 candidates on held-out crops (shipped model, CPU). Not the final implementation."""
import sys, json, math, time, itertools, numpy as np, torch
from pathlib import Path
from rawdiff_infer.backends import default_checkpoint
from rawdiff_infer.backends.torch import TorchBackend
from rawdiff_infer.schedule import Schedule
from rawdiff_infer.rawspace import RawEncoding, srgb_to_model, model_to_unit
from rawdiff_infer.tiling import TiledDenoiser, TileConfig
from rawdiff_infer.samplers import Denoiser, sample_dpmpp, sample_ddpm, sample_ddim, gaussian_noise
from rawdiff_infer.metrics import psnr
from rawdiff_train.data import PhotoPairSource
torch.set_num_threads(2)
be = TorchBackend.from_checkpoint(default_checkpoint(), device="cpu")
sch = Schedule(be.meta.schedule); enc = RawEncoding()
files = sorted(Path("/tmp/heldout").iterdir())
src = PhotoPairSource(files, camera=be.meta.camera, seed=10_000)
CROP = int(sys.argv[2]) if len(sys.argv) > 2 else 128
cases = []
for i, f in enumerate(files):
    p = src[i]
    y = enc.encode(p.raw.astype(np.float32)); x = np.round(np.clip(p.srgb, 0, 1) * 255).astype(np.uint8)
    H, W = y.shape[:2]; r, c = (H - CROP) // 2, (W - CROP) // 2
    cases.append((f.stem, x[r:r+CROP, c:c+CROP], y[r:r+CROP, c:c+CROP]))
tiles = TileConfig(stride=48, batch_size=64)
conds = [srgb_to_model(x, "cpu")[0] for _, x, _ in cases]
T = sch.num_timesteps

def grid(n, t0=T - 1, kind="logSNR"):
    if kind == "logSNR":
        lam = np.linspace(sch.lambda_(t0), sch.lambda_(0), n); ts = sch.t_of_lambda(lam); ts[0] = t0; ts[-1] = 0; return ts
    if kind == "time":
        return np.linspace(t0, 0, n)
    if kind == "karras":
        smax, smin = math.exp(-sch.lambda_(t0)), math.exp(-sch.lambda_(0)); rho = 7
        s = (smax ** (1/rho) + np.linspace(0, 1, n) * (smin ** (1/rho) - smax ** (1/rho))) ** rho
        ts = sch.t_of_lambda(-np.log(s)); ts[0] = t0; ts[-1] = 0; return ts
    raise ValueError(kind)

def run(fn, seed):
    den = TiledDenoiser(be, conds, tiles)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn((1, *c.shape), generator=g) for c in conds]
    x = den.pack.pack(xs)
    noise = gaussian_noise(torch.Generator().manual_seed(seed + 1000))
    model = Denoiser(den, sch)
    with torch.inference_mode():
        x0 = fn(model, x, noise)
    outs = [model_to_unit(v).permute(1, 2, 0).numpy() for v in den.pack.unpack(x0)]
    ps = [psnr(o, y) for o, (_, _, y) in zip(outs, cases)]
    br = [float(o.mean() / y.mean()) for o, (_, _, y) in zip(outs, cases)]
    return ps, br, model.calls

def truncated(t_start, n_ode, guess="model", order=2, eta=0.0):
    def f(model, x, noise):
        a, s = (float(v) for v in sch.alpha_sigma(t_start))
        if guess == "model":
            g = model(x, float(T - 1))[0]
        else:
            g = torch.zeros_like(x)
        xs = a * g + s * x
        return sample_dpmpp(model, xs, grid(n_ode, t_start), order=order, eta=eta, noise=noise)
    return f

def sde_ode(n, t_switch, order=2):
    def f(model, x, noise):
        ts = grid(n); eta = [1.0 if t > t_switch else 0.0 for t in ts]
        return sample_dpmpp(model, x, ts, order=order, eta=eta, noise=noise)
    return f

def pseudo(n, order=2, eta=1.0):
    def f(model, x, noise):
        base = x.clone(); k = [0]
        L = base.shape[-1]
        def nz(v):
            k[0] += 1
            return torch.roll(base, shifts=(k[0] * 104729 * 3 + 7) % L, dims=-1)
        return sample_dpmpp(model, x, grid(n), order=order, eta=eta, noise=nz)
    return f

def restart(n_main, t_min, t_max, K, n_re, order=2):
    def f(model, x, noise):
        ts = grid(n_main)
        # solve to t_min: grid part above t_min, then ending exactly at t_min
        hi = [t for t in ts if t > t_min] + [t_min]
        x = _ode_to(model, x, np.array(hi), order)
        for _ in range(K):
            a0, s0 = (float(v) for v in sch.alpha_sigma(t_min)); a1, s1 = (float(v) for v in sch.alpha_sigma(t_max))
            x = (a1 / a0) * x + math.sqrt(max(s1 ** 2 - (a1 / a0) ** 2 * s0 ** 2, 0)) * noise(x)
            lam = np.linspace(sch.lambda_(t_max), sch.lambda_(t_min), n_re + 1); seg = sch.t_of_lambda(lam); seg[0] = t_max; seg[-1] = t_min
            x = _ode_to(model, x, seg, order)
        lo = [t_min] + [t for t in ts if t < t_min]
        return sample_dpmpp(model, x, np.array(lo), order=order)
    return f

def _ode_to(model, x, ts, order):
    """ODE from ts[0] to ts[-1] (state at ts[-1], no final x0 jump): evaluations at ts[:-1]."""
    lam = sch.lambda_(ts); al, sg = sch.alpha_sigma(ts); prev = None
    for i in range(len(ts) - 1):
        x0, _ = model(x, float(ts[i])); h = lam[i+1] - lam[i]
        x = (sg[i+1] / sg[i]) * x + al[i+1] * (-math.expm1(-h)) * x0
        if prev is not None and order >= 2:
            c = 0.5 * al[i+1] * (-math.expm1(-h)) * h / (lam[i] - lam[i-1]); x = x + c * (x0 - prev)
        prev = x0
    return x

CANDS = {
 "dpm20": lambda m, x, nz: sample_dpmpp(m, x, grid(20), order=2),
 "dpm10": lambda m, x, nz: sample_dpmpp(m, x, grid(10), order=2),
 "dpm20-time": lambda m, x, nz: sample_dpmpp(m, x, grid(20, kind="time"), order=2),
 "dpm20-karras": lambda m, x, nz: sample_dpmpp(m, x, grid(20, kind="karras"), order=2),
 "dpm20-3m": lambda m, x, nz: sample_dpmpp(m, x, grid(20), order=3),
 "sde20": lambda m, x, nz: sample_dpmpp(m, x, grid(20), order=2, eta=1.0, noise=nz),
 "sde10": lambda m, x, nz: sample_dpmpp(m, x, grid(10), order=2, eta=1.0, noise=nz),
 "sde10-3m": lambda m, x, nz: sample_dpmpp(m, x, grid(10), order=3, eta=1.0, noise=nz),
 "sde10-time": lambda m, x, nz: sample_dpmpp(m, x, grid(10, kind="time"), order=2, eta=1.0, noise=nz),
 "sde10-karras": lambda m, x, nz: sample_dpmpp(m, x, grid(10, kind="karras"), order=2, eta=1.0, noise=nz),
 "sde10-o1": lambda m, x, nz: sample_dpmpp(m, x, grid(10), order=1, eta=1.0, noise=nz),
 "sdeode10-600": sde_ode(10, 600), "sdeode10-400": sde_ode(10, 400), "sdeode10-200": sde_ode(10, 200),
 "sdeode20-400": sde_ode(20, 400),
 "pseudo20": pseudo(20), "pseudo10": pseudo(10),
 "trunc-model-700-9": truncated(700, 9), "trunc-model-500-9": truncated(500, 9), "trunc-zero-700-10": truncated(700, 10, "zero"),
 "restart10": restart(6, 500, 800, 1, 2), "restart20": restart(10, 500, 800, 2, 4),
 "ddpm100": lambda m, x, nz: sample_ddpm(m, x, np.round(np.linspace(999, 0, 100)), noise=nz),
}
names = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] != "all" else list(CANDS)
seeds = [0, 1]
for name in names:
    t = time.perf_counter(); res = [run(CANDS[name], s) for s in seeds]
    ps = np.array([r[0] for r in res]); br = np.array([r[1] for r in res])
    row = {"name": name, "evals": res[0][2], "psnr": float(ps.mean()), "psnr_seed_means": ps.mean(1).tolist(),
           "per_image": ps.mean(0).round(2).tolist(), "bright_min": float(br.min()), "bright_max": float(br.max()),
           "s": time.perf_counter() - t}
    print(json.dumps(row), flush=True)
