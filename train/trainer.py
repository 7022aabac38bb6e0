"""The paper's training loop: eps-MSE on 64x64 patches, Adam with warm-up + cosine, grad clip, EMA.

Runs on one device or under ``torchrun`` (DistributedDataParallel). Every random draw (which images, crops,
augmentations, ISP parameters, timesteps, noise) comes from one seeded generator that all ranks advance
identically over the *global* batch; each rank takes its slice, and DDP averages the gradients, so N processes
compute the same update as one process with the same global batch (up to floating-point reduction order).
Resuming restores weights, EMA, optimizer, step and the generator state, so an interrupted run continues exactly.

A run that diverges stops: the loss is checked at every log point (where the loop synchronises anyway) and the
weights before every checkpoint, and :class:`TrainingDiverged` is raised instead of writing a non-finite
checkpoint; the last checkpoint written stays the last good one.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rawdiff_infer.checkpoint import ModelMeta, save_checkpoint
from rawdiff_infer.consistency import batch_closed_form
from rawdiff_infer.fsio import atomic_path, check_regular, open_append, open_regular, write_bytes
from rawdiff_infer.model import UNet, UNetConfig
from rawdiff_infer.schedule import Schedule

__all__ = ["TrainConfig", "BatchSource", "Trainer", "TrainingDiverged", "lr_at", "nonfinite_tensors", "train"]

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """Training pairs, already on the training device.

    ``batch(n, generator)`` returns (cond, target), both [n, 3, P, P] float32 in [-1, 1] (sRGB condition and
    gamma-encoded RAW target). All randomness must come from ``generator`` (a CPU torch.Generator; draw
    indices and parameters with it, then build the batch on the device).
    """

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; nothing non-finite was saved.

    Attributes:
        step: the optimizer step at which it was seen.
        loss: the mean loss of the last log window (NaN / inf), or None when the weights were found non-finite.
    """

    def __init__(self, message: str, *, step: int, loss: float | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss


def nonfinite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of the parameters and floating-point buffers of ``module`` holding a NaN or an infinity (one host
    synchronisation for the whole module)."""
    named = [(k, v) for k, v in (*module.named_parameters(), *module.named_buffers()) if v.is_floating_point()]
    if not named:
        return []
    ok = torch.stack([torch.isfinite(v.detach()).all() for _, v in named]).cpu()
    return [k for (k, _), good in zip(named, ok.tolist()) if not good]


def _finite(name: str, value: float, lo: float, hi: float = math.inf, *, lo_open: bool = False,
            hi_open: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite real number in the range (open ends as said)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo) or value > hi or (hi_open and value == hi):
        left, right = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
        raise ValueError(f"{name} must be in {left}{lo:g}, {hi:g}{right}, got {value:g}")


def _whole(name: str, value: int, lo: int, hi: int | None = None) -> None:
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo
            or (hi is not None and value > hi)):
        raise ValueError(f"{name} must be an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
                         + f", got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (defaults: the paper's recipe). Every field is checked on construction
    (ValueError names the field): counts are integers >= 1 (``warmup``, ``ema_start`` >= 0), learning rates are
    finite with ``0 < lr <= 1`` and ``0 <= lr_min <= lr``, ``grad_clip`` is a finite norm > 0, ``ema_decay`` is in
    [0, 1), ``seed`` in [0, 2^63)."""

    steps: int = 20_000
    batch_size: int = 256            # global batch (all ranks, all accumulation micro-steps)
    grad_accum: int = 1              # micro-batches per optimizer step (per rank)
    lr: float = 2e-4
    lr_min: float = 2e-6
    warmup: int = 1_000
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_start: int = 0               # steps before the EMA starts tracking (copying weights until then)
    seed: int = 0
    bf16: bool = True                # autocast on CUDA (ignored on CPU)
    compile: bool = False            # torch.compile the training forward (CUDA)
    channels_last: bool = True       # NHWC activations (faster on CUDA and on CPU)
    ckpt_every: int = 1_000
    val_every: int = 1_000
    log_every: int = 50
    #: the per-pixel loss on the prediction (eps or x0, the model's formulation): "l2", or "l2+l1" (their sum)
    loss: str = "l2"
    #: weight of pixels with a clipped input channel in the loss, relative to the others (1: uniform), in [1, 1000]
    clipped_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "ckpt_every", "val_every", "log_every"):
            _whole(name, getattr(self, name), 1)
        _whole("warmup", self.warmup, 0)
        _whole("ema_start", self.ema_start, 0)
        _whole("seed", self.seed, 0, 2**63 - 1)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        _finite("lr", self.lr, 0.0, 1.0, lo_open=True)  # Adam: above 1 only diverges (above ~1e37 it overflows)
        _finite("lr_min", self.lr_min, 0.0)
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min ({self.lr_min:g}) must not exceed lr ({self.lr:g})")
        _finite("grad_clip", self.grad_clip, 0.0, lo_open=True)
        _finite("ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        _finite("clipped_weight", self.clipped_weight, 1.0, 1000.0)


#: the per-pixel losses TrainConfig.loss may name
LOSSES = ("l2", "l2+l1")


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, clipped: torch.Tensor | None, cfg: TrainConfig
               ) -> torch.Tensor:
    """Mean per-pixel loss of ``pred`` against ``target`` ([B, 3, H, W], fp32): squared error, plus the absolute
    error for "l2+l1"; pixels with a clipped input channel (``clipped`` [B, 1, H, W] bool) weigh
    ``cfg.clipped_weight`` times the others. A 0-d tensor."""
    d = pred - target
    per = d.square()
    if cfg.loss == "l2+l1":
        per = per + d.abs()
    if clipped is not None and cfg.clipped_weight != 1.0:
        per = per * (1.0 + (cfg.clipped_weight - 1.0) * clipped.to(per.dtype))
    return per.mean()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up to lr, then cosine to lr_min."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * progress))


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Owns model, EMA, optimizer, generator and step; ``run`` trains to ``config.steps``.

    Args:
        source: a BatchSource on ``device``.
        out_dir: where checkpoints, the CSV log and TensorBoard events go.
        model_config: U-Net architecture.
        meta: schedule / encoding / camera / provenance saved with every checkpoint.
        validate: optional callable(ema_model, step) -> dict of metrics (e.g. {"val_psnr": ...}).
    """

    def __init__(self, source: BatchSource, out_dir: str | os.PathLike, *, config: TrainConfig | None = None,
                 model_config: UNetConfig | None = None, meta: ModelMeta | None = None,
                 device: str | torch.device = "cpu", validate: Callable[[UNet, int], dict] | None = None,
                 tensorboard: bool = False) -> None:
        self.cfg = config or TrainConfig()
        self.source = source
        self.out = Path(out_dir)
        self.device = torch.device(device)
        self.rank, self.world = _dist_info()
        if self.cfg.batch_size % (self.world * self.cfg.grad_accum):
            raise ValueError(f"batch_size {self.cfg.batch_size} must divide by world size x grad_accum "
                             f"({self.world} x {self.cfg.grad_accum})")
        self.meta = meta or ModelMeta()
        self.schedule = Schedule(self.meta.schedule)
        torch.manual_seed(self.cfg.seed)  # identical initial weights on every rank
        self.model = UNet(model_config or self.meta.model).to(self.device)
        cuda = self.device.type == "cuda"
        if self.cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = UNet(self.model.config).to(self.device).eval().requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, fused=cuda or None)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)  # data: images, crops, ISP draws
        self.noise_gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 1)  # t and eps, on device
        self.step = 0
        self.validate = validate
        self.net: torch.nn.Module = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if cuda else None)
        self._fwd = torch.compile(self.net) if (self.cfg.compile and cuda) else self.net
        self.tensorboard = tensorboard
        self._tb = None

    # ---- one optimizer step ----------------------------------------------------------------------------------
    def _micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Draw the global batch (same on every rank) and return this rank's micro-batches."""
        n = self.cfg.batch_size
        cond, target = self.source.batch(n, self.generator)
        t = torch.randint(0, self.schedule.num_timesteps, (n,), generator=self.noise_gen, device=self.device)
        noise = torch.randn(target.shape, generator=self.noise_gen, device=self.device)
        per_rank = n // self.world
        lo = self.rank * per_rank
        sl = slice(lo, lo + per_rank)
        cond, target = cond[sl], target[sl]
        t, noise = t[sl].to(self.device), noise[sl].to(self.device)
        m = per_rank // self.cfg.grad_accum
        return [(cond[i:i + m], target[i:i + m], t[i:i + m], noise[i:i + m]) for i in range(0, per_rank, m)]

    def accumulate_gradients(self) -> torch.Tensor:
        """Forward + backward over this rank's share of one global batch (all micro-batches); the gradients are
        left in ``.grad`` (averaged over ranks by DDP). Returns the mean loss as a 0-d tensor on the device."""
        self.model.train()
        cuda = self.device.type == "cuda"
        micro = self._micro_batches()
        total = torch.zeros((), device=self.device)
        for i, (cond, raw, t, noise) in enumerate(micro):
            x0, clipped = self._state(cond, raw)
            x_t = self.schedule.q_sample(x0, t, noise)
            if self.cfg.channels_last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
                cond = cond.contiguous(memory_format=torch.channels_last)
            sync = i == len(micro) - 1 or self.world == 1
            ctx = self.net.no_sync() if (self.world > 1 and not sync) else contextlib.nullcontext()
            with ctx, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda and self.cfg.bf16):
                out = self._fwd(x_t, cond, t.float()).float()
                target = noise if self.meta.formulation.prediction == "eps" else x0
                if self.cfg.loss == "l2" and clipped is None:
                    loss = F.mse_loss(out, target) / len(micro)
                else:
                    loss = pixel_loss(out, target, clipped, self.cfg) / len(micro)
            loss.backward()
            total += loss.detach()
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        return total

    def _state(self, cond: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the diffused clean state, the clipped mask or None): the encoded RAW itself, or for a residual model
        its residual over the closed form of ``cond`` (``consistency.batch_closed_form``, the q the runtime
        samples against). The mask is computed only where the loss weighs clipped pixels or the state needs it."""
        if self.meta.formulation.residual:
            assert self.meta.isp is not None  # ModelMeta refuses a residual formulation without an ISP
            q, clipped = batch_closed_form(self.meta.isp, cond, self.meta.encoding.gamma)
            return raw - q, clipped
        if self.cfg.clipped_weight != 1.0:
            return raw, (cond >= 1.0).any(dim=1, keepdim=True)  # a channel at white: the input's level 255
        return raw, None

    def train_step(self) -> torch.Tensor:
        """One optimizer step on the global batch (warm-up/cosine lr, grad-norm clip, Adam, EMA); returns the mean
        loss over the global batch as a 0-d tensor on the device (no host synchronisation here)."""
        lr = lr_at(self.step, self.cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        total = self.accumulate_gradients()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._update_ema()
        self.step += 1
        return total

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = 0.0 if self.step < self.cfg.ema_start else self.cfg.ema_decay
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)

    # ---- state ------------------------------------------------------------------------------------------------
    def save(self, name: str | None = None) -> Path:
        """Write ``ckpt-<step>/``: EMA weights (model.safetensors, the inference checkpoint), raw weights, optimizer
        state and generator state (train_state.safetensors + train_state.json). Rank 0 only; atomic per file."""
        from safetensors.torch import save_file

        d = self.out / (name or f"ckpt-{self.step:07d}")
        self.check_finite()  # on every rank (the weights are the same): all stop together
        if self.rank != 0:
            return d
        d.mkdir(parents=True, exist_ok=True)
        prov = {**self.meta.provenance, "train_steps": self.step, "train_config": asdict(self.cfg),
                "weights": "ema", "ema_decay": self.cfg.ema_decay}
        save_checkpoint(self.ema, d / "model.safetensors", meta=self.meta, overwrite=True, **prov)
        tensors: dict[str, torch.Tensor] = {f"model.{k}": v.detach().cpu().contiguous()
                                            for k, v in self.model.state_dict().items()}
        opt_state = self.opt.state_dict()
        scalars: dict[str, Any] = {"step": self.step, "param_groups": opt_state["param_groups"], "opt_scalars": {}}
        for pid, st in opt_state["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars["opt_scalars"][f"{pid}.{k}"] = float(v)
        tensors["generator_state"] = self.generator.get_state()
        tensors["noise_generator_state"] = self.noise_gen.get_state()
        with atomic_path(d / "train_state.safetensors", overwrite=True) as tmp:  # the run folder is the run's own
            save_file(tensors, str(tmp))
        write_bytes(d / "train_state.json", json.dumps(scalars, indent=1).encode(), overwrite=True)
        write_bytes(self.out / "latest", (d.name + "\n").encode(), overwrite=True)
        return d

    def check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` if the weights or the EMA weights hold a NaN or an infinity."""
        bad = nonfinite_tensors(self.model) + [f"ema.{k}" for k in nonfinite_tensors(self.ema)]
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise TrainingDiverged(f"training diverged: non-finite weights at step {self.step} "
                                   f"({', '.join(bad[:3])}{more}); no checkpoint was written for it",
                                   step=self.step)

    def init_from(self, ckpt: str | os.PathLike) -> dict[str, Any]:
        """Start from a model's weights (fine-tuning): model and EMA both take them; the optimizer, the lr schedule
        and the step count start fresh. The checkpoint's U-Net and noise schedule must match this run's.

        Returns the checkpoint's provenance (what it was trained on, for how many steps)."""
        from rawdiff_infer.checkpoint import CheckpointError, load_checkpoint

        net, meta = load_checkpoint(ckpt, device=self.device)
        if meta.model != self.model.config:
            raise CheckpointError(f"{ckpt}: its U-Net ({meta.model}) is not this run's ({self.model.config})")
        if meta.schedule != self.meta.schedule:
            raise CheckpointError(f"{ckpt}: trained with noise schedule {meta.schedule}, this run uses "
                                  f"{self.meta.schedule}")
        bad = nonfinite_tensors(net)
        if bad:
            raise CheckpointError(f"{ckpt}: holds non-finite weights ({', '.join(bad[:3])})")
        state = {k: v.float() for k, v in net.state_dict().items()}
        self.model.load_state_dict(state)
        self.ema.load_state_dict(state)
        return dict(meta.provenance or {})

    def load(self, ckpt_dir: str | os.PathLike) -> None:
        """Restore a state written by ``save`` (weights, EMA, optimizer, step, generator). No pickle involved."""
        from safetensors.torch import load_file

        from rawdiff_infer.checkpoint import load_checkpoint

        d = Path(ckpt_dir)
        if not (d / "train_state.safetensors").exists():
            raise FileNotFoundError(f"{d}: no train_state.safetensors (not a rawdiff-train checkpoint)")
        for name in ("model.safetensors", "train_state.safetensors", "train_state.json"):
            check_regular(d / name)  # a FIFO would block the read, and every signal with it
        ema, stored = load_checkpoint(d / "model.safetensors", device=self.device)
        check_resumable(stored, dataclasses.replace(self.meta, model=self.model.config), d)  # never mix two runs
        self.ema.load_state_dict(ema.state_dict())
        tensors = load_file(str(d / "train_state.safetensors"))
        with open_regular(d / "train_state.json") as f:
            scalars = json.loads(f.read().decode("utf-8"))
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v.to(self.device)
        for k, v in scalars["opt_scalars"].items():
            pid, name = k.split(".", 1)
            state.setdefault(int(pid), {})[name] = torch.tensor(v)
        self.opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})
        self.generator.set_state(tensors["generator_state"])
        self.noise_gen.set_state(tensors["noise_generator_state"])
        self.step = int(scalars["step"])

    # ---- loop ---------------------------------------------------------------------------------------------------
    def run(self, *, progress: bool = True, max_seconds: float | None = None,
            fit_schedule: bool = True) -> list[dict[str, float]]:
        """Train until ``config.steps``; checkpoints every ``ckpt_every`` and at the end. Returns the log rows.

        With ``max_seconds`` (wall time) the run also stops when the budget is spent. ``fit_schedule`` then
        shortens ``config.steps`` once, after timing the steps from the 20th of this run (compilation excluded)
        to the 100th (or until 30 % of the budget has passed), to the number of steps that fit the budget, so
        that the warm-up/cosine schedule still ends at ``lr_min`` instead of being cut off at a high rate.
        """
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, float]] = []
        log_path = self.out / "log.csv"
        new = not log_path.exists()
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not progress or self.rank != 0, unit="step")
        t0, n0, window = time.perf_counter(), self.step, []
        started = t0
        with _open_log(log_path) if self.rank == 0 else contextlib.nullcontext() as fh:
            writer = csv.writer(fh) if self.rank == 0 else None
            if writer and new:
                writer.writerow(["step", "loss", "lr", "samples_per_s", "val_psnr"])
            last = False
            first, s_calib, fitted = self.step, self.step, False
            t_calib: float | None = None
            while self.step < self.cfg.steps and not last:
                loss = self.train_step()
                window.append(loss)
                bar.update(1)
                if max_seconds is not None and fit_schedule and not fitted:
                    done = self.step - first
                    if t_calib is None and done == 20:
                        self._sync()
                        t_calib, s_calib = time.perf_counter(), self.step
                    elif t_calib is not None and (done == 100 or (self.step - s_calib >= 5 and
                                                                 time.perf_counter() - started > 0.3 * max_seconds)):
                        self._fit_schedule(max_seconds, started, t_calib, s_calib)
                        fitted = True
                        bar.total = self.cfg.steps
                last = self.step == self.cfg.steps
                if max_seconds is not None and not last:
                    over = time.perf_counter() - started > max_seconds
                    if self.world > 1:  # every rank stops at the same step
                        flag = torch.tensor(float(over), device=self.device)
                        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                        over = bool(flag)
                    last = over
                    if last:
                        log.warning("time budget of %.0f s reached at step %d", max_seconds, self.step)
                if self.step % self.cfg.log_every == 0 or last:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    dt = time.perf_counter() - t0
                    sps = (self.step - n0) * self.cfg.batch_size / max(dt, 1e-9)
                    row = {"step": self.step, "loss": float(torch.stack(window).mean()),
                           "lr": lr_at(self.step - 1, self.cfg),
                           "samples_per_s": sps, "val_psnr": float("nan")}
                    diverged = not math.isfinite(row["loss"])  # every rank sees the same (all-reduced) loss
                    if (self.validate and (self.step % self.cfg.val_every == 0 or last) and self.rank == 0
                            and not diverged):
                        row.update(self.validate(self.ema, self.step))
                    rows.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{sps:.0f}")
                    if writer:
                        writer.writerow([row["step"], f"{row['loss']:.6f}", f"{row['lr']:.3e}", f"{sps:.1f}",
                                         f"{row['val_psnr']:.3f}"])
                        fh.flush()
                    if diverged:
                        bar.close()
                        raise TrainingDiverged(
                            f"training diverged: the loss is {row['loss']} at step {self.step} (lr "
                            f"{row['lr']:.3g}); no checkpoint was written for it", step=self.step, loss=row["loss"])
                    self._tb_log(row)
                    t0, n0, window = time.perf_counter(), self.step, []
                if self.step % self.cfg.ckpt_every == 0 or last:
                    self.save()
        bar.close()
        return rows

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _fit_schedule(self, max_seconds: float, started: float, t_calib: float, s_calib: int) -> None:
        """Measure the step time since ``s_calib`` (after compilation) and shorten ``config.steps`` to what the
        remaining budget allows (never lengthen it). Every rank reaches the same result."""
        self._sync()
        now = time.perf_counter()
        per_step = (now - t_calib) / max(1, self.step - s_calib)
        remaining = max_seconds - (now - started)
        if self.world > 1:
            v = torch.tensor([per_step, -remaining], device=self.device, dtype=torch.float64)
            dist.all_reduce(v, op=dist.ReduceOp.MAX)  # slowest rank, least time left
            per_step, remaining = float(v[0]), -float(v[1])
        fit = self.step + int(0.92 * remaining / max(per_step, 1e-9))
        if fit < self.cfg.steps:
            log.warning("%.1f ms per step: %d steps fit the time budget (of %d planned); the lr schedule now ends "
                        "there", per_step * 1e3, fit, self.cfg.steps)
            self.cfg = dataclasses.replace(self.cfg, steps=max(fit, self.step + 1))

    def _tb_log(self, row: dict[str, float]) -> None:
        if not self.tensorboard or self.rank != 0:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("TensorBoard logging asked for but tensorboard is not installed")
                self.tensorboard = False
                return
            self._tb = SummaryWriter(str(self.out / "tb"))
        for k, v in row.items():
            if k != "step" and not math.isnan(v):
                self._tb.add_scalar(k, v, int(row["step"]))


def _open_log(path: Path) -> io.TextIOWrapper:
    """The CSV log, opened for appending through ``fsio.open_append`` (a FIFO there is refused, not waited on)."""
    return io.TextIOWrapper(open_append(path), encoding="utf-8", newline="")


def train(source: BatchSource, out_dir: str | os.PathLike, **kwargs: Any) -> Trainer:
    """Build a Trainer and run it (convenience)."""
    tr = Trainer(source, out_dir, **kwargs)
    tr.run()
    return tr


class ResumeMismatch(ValueError):
    """``--resume`` of a checkpoint whose description differs from this run's (one line naming the folder)."""


#: what a resumed run must share with the checkpoint it continues (the ISP is compared by the command, with a
#: tolerance), and the options of rawdiff-train that set it
_RESUMED_FIELDS = {"model": "--config", "schedule": "--schedule", "camera": "--camera", "encoding": "",
                   "formulation": "--prediction and --space"}


def check_resumable(stored: ModelMeta, meta: ModelMeta, where: str | os.PathLike) -> None:
    """Raise :class:`ResumeMismatch` when ``stored`` (the description of the checkpoint ``where``) differs from this
    run's ``meta`` in its U-Net, noise schedule, camera, RAW encoding or formulation: resuming would mix them."""
    from rawdiff_infer.messages import show_path

    for name, option in _RESUMED_FIELDS.items():
        old, new = getattr(stored, name, None), getattr(meta, name, None)
        if old == new:
            continue
        a = old.to_dict() if hasattr(old, "to_dict") else {"": old}
        b = new.to_dict() if hasattr(new, "to_dict") else {"": new}
        key = next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), "")
        field = f"{name}.{key}" if key else name
        hint = f"the same {option}" if option else "the same options"
        raise ResumeMismatch(f"{show_path(where)} was trained with {field} = {a.get(key)!r}, this run has "
                             f"{b.get(key)!r}; resume with {hint}, or train into a new --out")
