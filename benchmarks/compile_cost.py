"""What ``torch.compile`` costs the first image, and what a persistent cache or an AOTInductor package saves.

Every measurement runs in a fresh Python process (so no in-memory cache flatters it), one after the other:

1. ``eager-first``: eager torch, time to the first eps (the baseline).
2. ``compile-cold``: ``TorchBackend(compile=True)`` with an empty compile-cache folder: time to the first eps.
3. ``compile-warm``: the same in a new process, with the folder the cold run filled.
4. ``aoti-build``: ``export_aoti`` builds the AOTInductor package for this device (with its own empty cache folder).
5. ``aoti-first``: ``AotiBackend`` loads the package, time to the first eps.
6. ``steady``: one process, eager, compiled (warm) and AOTI side by side, interleaved rounds: ms per batch.

"Time to first eps" is the backend's construction plus its first call, after torch is imported and the model is
loaded (those two are reported apart, as is the whole process's wall time measured by the parent).

    python -m rawdiff_bench.compile_cost run --device cpu --batch 16 --json compile-cost.json
    python -m rawdiff_bench.compile_cost run --device cuda --batch 512 --max-batch 1024 --json gpu.json   # fp16

Measured 2026-11-29 on this project's 2-core CPU (AMD EPYC, torch 2.13.0+cpu), shared with other jobs: load
average 9-10 throughout, i.e. about five runnable jobs per core, so every figure is inflated and noisy. Bundled
paper-size model, fp32, batch 16 of 64x64, AOTI package batch 1..64 (``run --model bundled --batch 16
--max-batch 64 --repeats 5``):

    phase           first eps (s)  of which beyond one plain call
    eager           6.1            0.2
    compile cold    139.5          134 (Dynamo + AOTAutograd + Inductor + C++ compiler)
    compile warm    21.8           16 (imports 4.3, Dynamo re-trace and cache load 11.6); FX graph and AOTAutograd hits
    AOTI build      87.8 (once)    package 46.3 MB
    AOTI load       12.5           7.5 (import torch._inductor ~3, unzip + dlopen ~3.4)

Steady state, interleaved, median ms per batch of 16 (min-max): eager 5644 (4095-6716), compiled 5880
(4800-6692), AOTI 6524 (5408-6885): not distinguishable on this loaded machine; eps agree to 8.6e-6.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

__all__ = ["cli"]

log = logging.getLogger("rawdiff_bench.compile_cost")

PHASES = ("eager-first", "compile-cold", "compile-warm", "aoti-build", "aoti-first", "steady")
_MARK = "RESULT "


# ---- inside a phase process ---------------------------------------------------------------------------------------

def _load_model(spec: str, config: str) -> tuple[Any, Any]:
    """(model fp32 eval, meta) for "bundled", "random" (of size ``config``) or a checkpoint path."""
    import torch

    from rawdiff_infer.checkpoint import ModelMeta, load_checkpoint
    from rawdiff_infer.model import UNet, UNetConfig

    if spec == "random":
        cfg = UNetConfig() if config == "paper" else UNetConfig.tiny()
        torch.manual_seed(0)
        return UNet(cfg).eval(), ModelMeta(model=cfg)
    if spec == "bundled":
        from rawdiff_infer.backends import default_checkpoint

        path = default_checkpoint()
        if path is None:
            raise click.ClickException("this build has no bundled model; use --model random or a checkpoint")
        return load_checkpoint(path)
    return load_checkpoint(spec)


def _inputs(batch: int, patch: int, device: str) -> tuple[Any, Any, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, patch, patch, generator=g)
    c = torch.rand(batch, 3, patch, patch, generator=g) * 2 - 1
    t = torch.linspace(10.0, 990.0, batch)
    return x.to(device), c.to(device), t.to(device)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _first_eps(make: Any, args: tuple[Any, ...], device: str) -> dict[str, float]:
    """Construct a backend with ``make()``, run it twice: construction, first call, second call (seconds)."""
    t0 = time.perf_counter()
    backend = make()
    t1 = time.perf_counter()
    backend(*args)
    _sync(device)
    t2 = time.perf_counter()
    backend(*args)
    _sync(device)
    t3 = time.perf_counter()
    return {"construct_s": t1 - t0, "first_call_s": t2 - t1, "first_eps_s": t2 - t0, "second_call_s": t3 - t2}


def _dir_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 1e6 if d.is_dir() else 0.0


def _run_phase(phase: str, o: dict[str, Any]) -> dict[str, Any]:
    t_import = time.perf_counter()
    import torch

    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_infer.compile_cache import compile_cache_counters, configure_compile_cache

    t_model = time.perf_counter()
    model, meta = _load_model(o["model"], o["config"])
    t_ready = time.perf_counter()
    dev, work = o["device"], Path(o["workdir"])
    cache, package = work / "compile-cache", work / "model.pt2"
    args = _inputs(o["batch"], o["patch"], dev)
    dtype = o["dtype"]
    res: dict[str, Any] = {"phase": phase, "import_torch_s": t_model - t_import, "load_model_s": t_ready - t_model,
                           "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()[0]}
    if phase == "eager-first":
        res.update(_first_eps(lambda: TorchBackend(model, meta, device=dev, dtype=dtype), args, dev))
    elif phase in ("compile-cold", "compile-warm"):
        res.update(_first_eps(lambda: TorchBackend(model, meta, device=dev, dtype=dtype, compile=True,
                                                   compile_cache=cache), args, dev))
        res.update(compile_cache_counters())
        res["cache_mb"] = _dir_mb(cache)
    elif phase == "aoti-build":
        from rawdiff_export.aoti_export import export_aoti

        configure_compile_cache(work / "aoti-build-cache")  # its own empty folder: a cold build
        t0 = time.perf_counter()
        export_aoti(model, meta, package, device=dev, precision=dtype, patch_size=o["patch"],
                    max_batch=o["max_batch"], overwrite=True)
        res["build_s"] = time.perf_counter() - t0
        res["package_mb"] = package.stat().st_size / 1e6
    elif phase == "aoti-first":
        from rawdiff_infer.backends.aoti import AotiBackend

        res.update(_first_eps(lambda: AotiBackend(package, device=dev), args, dev))
    elif phase == "steady":
        from rawdiff_infer.backends.aoti import AotiBackend

        backends = {"eager": TorchBackend(model, meta, device=dev, dtype=dtype),
                    "compiled": TorchBackend(model, meta, device=dev, dtype=dtype, compile=True,
                                             compile_cache=cache),
                    "aoti": AotiBackend(package, device=dev)}
        ref = None
        for name, b in backends.items():  # warm-up (the compiled one loads from the warm cache here)
            out = b(*args)
            b(*args)
            _sync(dev)
            if ref is None:
                ref = out.float()
            res[f"{name}_max_abs_diff_vs_eager"] = float((out.float() - ref).abs().max())
        times: dict[str, list[float]] = {name: [] for name in backends}
        for _ in range(o["repeats"]):  # interleaved, so that a neighbour's load hits all three alike
            for name, b in backends.items():
                t0 = time.perf_counter()
                b(*args)
                _sync(dev)
                times[name].append((time.perf_counter() - t0) * 1e3)
        for name, ts in times.items():
            res[f"{name}_ms"] = {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "n": len(ts)}
    else:
        raise click.ClickException(f"unknown phase {phase}")
    res["loadavg_end"] = os.getloadavg()[0]
    return res


# ---- the parent -----------------------------------------------------------------------------------------------------

def _spawn(phase: str, o: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "rawdiff_bench.compile_cost", "phase", phase, "--options", json.dumps(o)]
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    log.info("phase %s ...", phase)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        tail = " | ".join(r.stderr.strip().splitlines()[-3:])
        raise click.ClickException(f"phase {phase} failed (exit {r.returncode}): {tail}")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(_MARK)]
    if not lines:
        raise click.ClickException(f"phase {phase} printed no result")
    res = json.loads(lines[-1][len(_MARK):])
    res["process_wall_s"] = wall
    log.info("phase %s: %.1f s", phase, wall)
    return res


def _machine() -> dict[str, Any]:
    import platform

    import torch

    from rawdiff_infer.backends.aoti import current_target

    return {"cpu": current_target("cpu").cpu, "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _table(results: dict[str, dict[str, Any]]) -> str:
    rows = [("phase", "first eps / build (s)", "process wall (s)", "notes")]
    for phase, r in results.items():
        if phase == "steady":
            continue
        main = r.get("first_eps_s", r.get("build_s"))
        notes = []
        if "fxgraph_hit" in r:
            notes.append(f"fxgraph hit/miss {r['fxgraph_hit']}/{r['fxgraph_miss']}, aotautograd hit/miss "
                         f"{r['aotautograd_hit']}/{r['aotautograd_miss']}, cache {r['cache_mb']:.0f} MB")
        if "second_call_s" in r:
            notes.append(f"2nd call {r['second_call_s'] * 1e3:.0f} ms")
        if "package_mb" in r:
            notes.append(f"package {r['package_mb']:.1f} MB")
        notes.append(f"load {r['loadavg_start']:.1f}->{r['loadavg_end']:.1f}")
        rows.append((phase, f"{main:.1f}", f"{r['process_wall_s']:.1f}", "; ".join(notes)))
    if "steady" in results:
        s = results["steady"]
        for name in ("eager", "compiled", "aoti"):
            m = s[f"{name}_ms"]
            rows.append((f"steady {name}", f"{m['median']:.0f} ms/batch", f"min {m['min']:.0f} max {m['max']:.0f}",
                         f"max |diff| vs eager {s[f'{name}_max_abs_diff_vs_eager']:.1e}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """Compile cost of rawdiff's U-Net: torch.compile cold / warm cache, AOTInductor build and load, steady state."""


@cli.command()
@click.option("--model", default="bundled", show_default=True,
              help="bundled (the model shipped with rawdiff), random (seeded weights of --config size) or a "
                   "checkpoint path.")
@click.option("--config", type=click.Choice(["paper", "tiny"]), default="paper", show_default=True,
              help="Size of the random model.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), help="Default: fp32 on CPU, fp16 on CUDA.")
@click.option("--batch", type=click.IntRange(2), default=16, show_default=True, help="Patches per call.")
@click.option("--patch", type=click.IntRange(8), default=64, show_default=True)
@click.option("--max-batch", type=click.IntRange(2), default=64, show_default=True,
              help="Largest batch of the AOTInductor package (its batch axis is dynamic, 1..this).")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True,
              help="Timed rounds in the steady phase.")
@click.option("--phase", "phases", multiple=True, type=click.Choice(PHASES),
              help="Run only these phases (default: all, in order; compile-warm and steady need compile-cold's "
                   "folder, aoti-first and steady the built package).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Where the cache folder and package go (default: a "
              "new folder under the system temporary directory, removed at the end).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here.")
def run(model: str, config: str, device: str, dtype: str | None, batch: int, patch: int, max_batch: int,
        repeats: int, phases: tuple[str, ...], workdir: str | None, json_path: str | None) -> None:
    """Run the phases, each in a fresh process, and print a table (and JSON)."""
    import tempfile

    from rawdiff_infer.fsio import write_bytes

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if batch > max_batch:
        raise click.BadParameter(f"--batch {batch} exceeds --max-batch {max_batch}")
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="rawdiff-compile-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    o = {"model": model, "config": config, "device": device, "batch": batch, "patch": patch, "max_batch": max_batch,
         "repeats": repeats, "workdir": str(work), "dtype": dtype or ("fp16" if device.startswith("cuda") else "fp32")}
    todo = [p for p in PHASES if not phases or p in phases]
    if "compile-cold" in todo:
        shutil.rmtree(work / "compile-cache", ignore_errors=True)
    if "aoti-build" in todo:
        shutil.rmtree(work / "aoti-build-cache", ignore_errors=True)
    results = {p: _spawn(p, o) for p in todo}
    report = {"machine": _machine(), "options": o, "results": results}
    click.echo(_table(results))
    if json_path:
        write_bytes(json_path, (json.dumps(report, indent=1) + "\n").encode(), overwrite=True)
        log.info("wrote %s", json_path)
    if not workdir:
        shutil.rmtree(work, ignore_errors=True)


@cli.command(hidden=True)
@click.argument("phase", type=click.Choice(PHASES))
@click.option("--options", required=True, help="JSON options from the parent.")
def phase(phase: str, options: str) -> None:
    """One phase, in this (fresh) process: prints one RESULT line of JSON."""
    logging.basicConfig(level=logging.WARNING)
    click.echo(_MARK + json.dumps(_run_phase(phase, json.loads(options))))


if __name__ == "__main__":
    cli()
