"""A persistent, private folder for ``torch.compile``'s caches, so that a second run does not compile again.

What torch (checked on 2.13) keeps between processes, all under one folder, ``TORCHINDUCTOR_CACHE_DIR``
(default ``/tmp/torchinductor_<user>``), all on by default:

- ``aotautograd/``: the AOTAutograd cache (``torch._functorch.config.enable_autograd_cache``): the traced and
  functionalised graph, keyed by the graph, input shapes / dtypes / devices, config and torch version.
- ``fxgraph/``: Inductor's FX graph cache (``torch._inductor.config.fx_graph_cache``): the compiled graph (its
  generated wrapper), under the same kind of key plus the device (GPU model, Triton version).
- the kernels those entries use: C++ kernels compiled to shared libraries (CPU; two-letter folders), Triton kernels
  (CUDA; ``triton/<device>/`` unless ``TRITON_CACHE_DIR`` says otherwise, and also bundled into the FX graph
  entries), and autotuning results (``max-autotune`` modes).

What it does not keep: Dynamo's tracing of the Python code (redone in every process: a few seconds for the U-Net)
and in-memory state such as CUDA graphs. torch's "mega-cache" (``torch.compiler.save_cache_artifacts()`` /
``load_cache_artifacts()``) serialises the same entries into one blob, to carry them to another machine of the same
kind (same torch, Triton and GPU); a second run on the same machine does not need it.

Why rawdiff moves the folder: ``/tmp`` is emptied at reboot on many systems and is private to each container, so
the second run there often compiles again; and a predictable name in a world-writable directory can be created
first by another user. The entries are pickles and shared libraries that torch loads and runs, so the folder must be
as trusted as the code: :func:`configure_compile_cache` creates it with mode 0o700 and refuses one that another user
owns or that others can write.

The setting is process-wide (torch reads the environment variable), and it only matters before the first
compilation of a graph; changing it later also clears torch's in-memory cache lookups, as torch's own
``temporary_cache_dir`` does.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import tempfile
from pathlib import Path

from .messages import show_path

__all__ = ["CompileCacheError", "ENV_VAR", "compile_cache_counters", "configure_compile_cache",
           "default_compile_cache_dir", "resolve_compile_cache_dir"]

log = logging.getLogger(__name__)

#: the environment variable through which torch finds its cache folder
ENV_VAR = "TORCHINDUCTOR_CACHE_DIR"
_TRITON_VAR = "TRITON_CACHE_DIR"

#: the folder this module last pointed torch at (to tell a user's own setting from ours)
_applied: str | None = None


class CompileCacheError(RuntimeError):
    """The compile-cache folder cannot be used (message: one line naming it and why)."""


def default_compile_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/rawdiff/inductor``, or ``~/.cache/rawdiff/inductor`` when ``XDG_CACHE_HOME`` is unset or not
    absolute (the XDG base-directory rule)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "rawdiff" / "inductor"


def _torch_default_dir() -> str:
    """torch's own default (``/tmp/torchinductor_<user>``), which torch writes into the environment itself."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # an older torch: the same rule
        import getpass

        return os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    return os.path.abspath(default_cache_dir())


def resolve_compile_cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The folder to use: ``path`` if given; else ``TORCHINDUCTOR_CACHE_DIR`` when the user set it (not when torch
    or this module did); else :func:`default_compile_cache_dir`. Returned absolute, not created."""
    if path is not None:
        return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    env = os.environ.get(ENV_VAR)
    if env and env != _applied and os.path.abspath(env) != _torch_default_dir():
        return Path(os.path.abspath(env))
    return default_compile_cache_dir()


def _ensure_private_dir(d: Path) -> None:
    """Create ``d`` (0o700) if needed; refuse a non-directory, another user's folder or one others can write."""
    if d.exists() and not d.is_dir():
        raise CompileCacheError(f"compile cache {show_path(d)}: exists and is not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.stat(d)
    except OSError as e:
        raise CompileCacheError(f"compile cache {show_path(d)}: cannot create it ({e.strerror or e})") from None
    getuid = getattr(os, "getuid", None)
    if getuid is not None and st.st_uid != getuid():
        raise CompileCacheError(f"compile cache {show_path(d)}: owned by another user (uid {st.st_uid}); its "
                                "entries are code that torch would load, so use a folder of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CompileCacheError(f"compile cache {show_path(d)}: writable by others (mode "
                                f"{stat.S_IMODE(st.st_mode):o}); its entries are code that torch would load: "
                                f"chmod go-w it or choose another folder")


def configure_compile_cache(path: str | os.PathLike[str] | None = None) -> Path:
    """Point torch.compile's persistent caches (AOTAutograd, FX graph, C++ / Triton kernels, autotuning) at a
    private folder, for this process.

    Args:
        path: the folder (created, mode 0o700); None: ``TORCHINDUCTOR_CACHE_DIR`` if the user set it, else
            ``$XDG_CACHE_HOME/rawdiff/inductor`` (``~/.cache/rawdiff/inductor``).
    Returns the absolute folder now in use.
    Raises CompileCacheError (one line): it cannot be created, is not a directory, belongs to another user or is
        writable by others.

    Sets ``TORCHINDUCTOR_CACHE_DIR``. A ``TRITON_CACHE_DIR`` that torch derived from the previous folder is dropped
    so that Triton's cache follows (torch derives ``<folder>/triton/<device>`` at the first Triton compilation); one
    that points elsewhere is the user's and stays. Torch's switches (``TORCHINDUCTOR_FX_GRAPH_CACHE``,
    ``TORCHINDUCTOR_AUTOGRAD_CACHE``, ``TORCHINDUCTOR_FORCE_DISABLE_CACHES``) are left as the user set them.
    """
    global _applied
    target = resolve_compile_cache_dir(path)
    _ensure_private_dir(target)
    new = str(target)
    previous = os.environ.get(ENV_VAR)
    triton = os.environ.get(_TRITON_VAR)
    if triton and previous and os.path.abspath(triton).startswith(os.path.abspath(previous) + os.sep):
        del os.environ[_TRITON_VAR]
    os.environ[ENV_VAR] = new
    _applied = new
    if previous is not None and os.path.abspath(previous) != new and "torch._inductor.utils" in sys.modules:
        from torch._inductor.utils import clear_caches

        clear_caches()  # in-memory lookups keyed on the old folder
    log.info("torch.compile cache: %s", new)
    return target


def compile_cache_counters() -> dict[str, int]:
    """This process's compile-cache hits and misses so far (zeros before any compilation):
    ``fxgraph_hit``, ``fxgraph_miss``, ``fxgraph_bypass`` (Inductor's FX graph cache) and ``aotautograd_hit``,
    ``aotautograd_miss``, ``aotautograd_bypass`` (the AOTAutograd cache)."""
    from torch._dynamo.utils import counters

    ind, aot = counters["inductor"], counters["aot_autograd"]
    out = {f"fxgraph_{k}": int(ind.get(f"fxgraph_cache_{k}", 0)) for k in ("hit", "miss", "bypass")}
    out.update({f"aotautograd_{k}": int(aot.get(f"autograd_cache_{k}", 0)) for k in ("hit", "miss", "bypass")})
    return out
