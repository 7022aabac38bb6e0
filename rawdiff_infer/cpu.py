"""Which precision the U-Net runs in on a CPU, chosen from the CPU's instruction-set flags (never by trying).

bf16 pays on a CPU only with native bf16 arithmetic: ``avx512_bf16`` (dot products of bf16 pairs into fp32; AMD Zen
4 and later, Intel Cooper Lake and Sapphire Rapids) or AMX (``amx_bf16``; Intel Sapphire Rapids and later). There,
oneDNN's bf16 convolutions move half the bytes of fp32 and run twice the multiply-adds per instruction: on two Zen 4
cores (avx512_bf16, no AMX) the paper-size U-Net ran 33 patches/s in bf16 against 17 in fp32, channels_last, batch
16. Without those instructions bf16 is emulated (converted to fp32 and back around every operation) and measured
10-1000x slower than fp32, so such CPUs get fp32. ``default_cpu_dtype`` is pure: tests pass it simulated flag sets.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["BF16_FLAGS", "cpu_flags", "default_cpu_dtype", "resolve_dtype"]

#: the flags (Linux /proc/cpuinfo names) of native bf16 arithmetic, each with what it is, in words
BF16_FLAGS: dict[str, str] = {"amx_bf16": "AMX (amx_bf16)", "avx512_bf16": "avx512_bf16"}

_CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str | Path = _CPUINFO) -> frozenset[str]:
    """The CPU's instruction-set flags, lower case, e.g. ``{"avx2", "avx512_bf16", ...}``.

    Linux: the ``flags`` line (x86) or ``Features`` line (ARM) of the first processor in ``cpuinfo`` (what the kernel
    and a hypervisor let programs use). Elsewhere, or when that file is unreadable: the features that torch's
    cpuinfo library reports as present (``torch.cpu.get_capabilities``, same names for the bf16 flags; torch 2.13
    and later), else the empty set. ``torch.backends.cpu.get_cpu_capability()`` ("AVX512", "AVX2", ...) is not
    used: it names the widest vector kernels torch dispatches to, and AVX512 does not imply avx512_bf16.
    """
    if sys.platform.startswith("linux"):
        try:
            text = Path(cpuinfo).read_text(errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() in ("flags", "features"):
                return frozenset(value.lower().split())
    return _torch_flags()


def _torch_flags() -> frozenset[str]:
    """The features torch's cpuinfo reports present (empty when this torch cannot say)."""
    try:
        import torch

        caps = torch.cpu.get_capabilities()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - an older torch, or no torch: nothing known
        return frozenset()
    return frozenset(k.lower() for k, v in caps.items() if v is True)


def default_cpu_dtype(flags: frozenset[str] | set[str] | None = None) -> tuple[str, str]:
    """The U-Net's precision on this CPU: ("bf16" | "fp32", the reason in words, one line).

    Args:
        flags: the CPU's flags (``cpu_flags()`` when None); tests pass simulated sets.
    Returns:
        ("bf16", reason) when the flags include avx512_bf16 or amx_bf16, else ("fp32", reason).
    """
    flags = cpu_flags() if flags is None else frozenset(f.lower() for f in flags)
    native = [words for flag, words in BF16_FLAGS.items() if flag in flags]
    if native:
        return "bf16", (f"this CPU has {' and '.join(native)}: native bf16 arithmetic (measured with avx512_bf16 on "
                        "two Zen 4 cores: 33 patches/s against fp32's 17)")
    if not flags:
        return "fp32", "this CPU's flags are unknown (no /proc/cpuinfo, and torch cannot say): fp32, the safe choice"
    return "fp32", ("this CPU has neither avx512_bf16 nor AMX (amx_bf16): bf16 would be emulated there, 10-1000x "
                    "slower than fp32")


def resolve_dtype(dtype: str, device: str, flags: frozenset[str] | set[str] | None = None) -> tuple[str, str]:
    """A ``--dtype`` value made concrete for a resolved device: (fp32 | fp16 | bf16, the reason in words).

    Args:
        dtype: "auto", "fp32", "fp16" or "bf16".
        device: a resolved device: "cpu", "cuda", "cuda:N".
        flags: the CPU's flags for the CPU rule (``cpu_flags()`` when None).
    Returns:
        auto on CUDA: fp16; auto on the CPU: ``default_cpu_dtype(flags)``; anything else: itself.
    """
    if dtype != "auto":
        return dtype, "asked for with --dtype"
    if device.startswith("cuda"):
        return "fp16", "auto on CUDA: fp16 (tensor cores)"
    return default_cpu_dtype(flags)
