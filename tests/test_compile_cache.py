"""The persistent torch.compile cache: folder resolution, privacy checks, TorchBackend plumbing, and a second process
that finds the first one's compiled graph (slow: one real compilation)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rawdiff_infer import compile_cache
from rawdiff_infer.backends.base import BackendError
from rawdiff_infer.backends.torch import TorchBackend
from rawdiff_infer.checkpoint import ModelMeta
from rawdiff_infer.compile_cache import (ENV_VAR, CompileCacheError, compile_cache_counters,
                                         configure_compile_cache, default_compile_cache_dir,
                                         resolve_compile_cache_dir)
from rawdiff_infer.model import UNet

from conftest import TINY_CONFIG

_VARS = (ENV_VAR, "TRITON_CACHE_DIR", "XDG_CACHE_HOME")


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch: pytest.MonkeyPatch):
    """configure_compile_cache writes os.environ and a module global: put both back after each test."""
    saved = {k: os.environ.get(k) for k in _VARS}
    monkeypatch.setattr(compile_cache, "_applied", None)
    for k in (ENV_VAR, "TRITON_CACHE_DIR"):
        os.environ.pop(k, None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_default_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_compile_cache_dir() == tmp_path / "xdg" / "rawdiff" / "inductor"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/not/allowed")
    assert default_compile_cache_dir() == tmp_path / "home" / ".cache" / "rawdiff" / "inductor"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_compile_cache_dir() == tmp_path / "home" / ".cache" / "rawdiff" / "inductor"


def test_configure_creates_a_private_folder_and_points_torch_at_it(tmp_path: Path) -> None:
    d = tmp_path / "a" / "cache"
    got = configure_compile_cache(d)
    assert got == d and d.is_dir()
    assert stat.S_IMODE(d.stat().st_mode) & 0o077 == 0
    assert os.environ[ENV_VAR] == str(d)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(d)  # what Inductor itself will use


def test_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = tmp_path / "xdg" / "rawdiff" / "inductor"
    assert resolve_compile_cache_dir() == default
    os.environ[ENV_VAR] = str(tmp_path / "users")  # the user's own setting wins over the default
    assert resolve_compile_cache_dir() == tmp_path / "users"
    assert resolve_compile_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"  # an explicit folder wins
    configure_compile_cache(tmp_path / "explicit")
    assert resolve_compile_cache_dir() == default  # our own setting is not mistaken for the user's
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    os.environ[ENV_VAR] = default_cache_dir()  # torch writes its default into the environment itself
    assert resolve_compile_cache_dir() == default


def test_refuses_unsafe_or_unusable_folders(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(CompileCacheError, match="writable by others"):
        configure_compile_cache(shared)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CompileCacheError, match="not a directory"):
        configure_compile_cache(tmp_path / "file")
    with pytest.raises(CompileCacheError, match="cannot create it"):
        configure_compile_cache(tmp_path / "file" / "below")
    assert ENV_VAR not in os.environ  # nothing configured by a refused call


def test_triton_folder_follows_only_when_torch_derived_it(tmp_path: Path) -> None:
    configure_compile_cache(tmp_path / "one")
    os.environ["TRITON_CACHE_DIR"] = str(tmp_path / "one" / "triton" / "0")  # what torch derives at first use
    configure_compile_cache(tmp_path / "two")
    assert "TRITON_CACHE_DIR" not in os.environ
    os.environ["TRITON_CACHE_DIR"] = str(tmp_path / "mine")  # the user's: kept
    configure_compile_cache(tmp_path / "three")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")


def test_torch_backend_plumbing(tmp_path: Path) -> None:
    def backend(**kw) -> TorchBackend:
        return TorchBackend(UNet(TINY_CONFIG), ModelMeta(model=TINY_CONFIG), **kw)

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    assert backend().compile_cache_dir is None and ENV_VAR not in os.environ
    # False: torch's own setting (torch.compile writes its default into the environment itself)
    assert backend(compile=True, compile_cache=False).compile_cache_dir is None
    assert os.environ.get(ENV_VAR) in (None, os.path.abspath(default_cache_dir()))
    b = backend(compile=True, compile_cache=tmp_path / "cc")  # torch.compile is lazy: nothing compiles here
    assert b.compile_cache_dir == tmp_path / "cc" and os.environ[ENV_VAR] == str(tmp_path / "cc")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    assert backend(compile=True).compile_cache_dir == tmp_path / "xdg" / "rawdiff" / "inductor"
    (tmp_path / "f").write_text("x")
    with pytest.raises(BackendError, match="not a directory"):  # a folder asked for must be usable
        backend(compile=True, compile_cache=tmp_path / "f")


def test_unusable_default_folder_is_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A read-only or odd home must not stop ``--compile``: warning, torch's own setting."""
    (tmp_path / "f").write_text("x")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path / "f")  # the default folder would be below a file
    with caplog.at_level("WARNING"):
        b = TorchBackend(UNet(TINY_CONFIG), ModelMeta(model=TINY_CONFIG), compile=True)
    assert b.compile_cache_dir is None
    assert "cannot create it" in caplog.text and "torch's own cache setting" in caplog.text


def test_counters_have_every_key() -> None:
    c = compile_cache_counters()
    assert set(c) == {f"{k}_{w}" for k in ("fxgraph", "aotautograd") for w in ("hit", "miss", "bypass")}
    assert all(isinstance(v, int) and v >= 0 for v in c.values())


_CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_infer.checkpoint import ModelMeta
    from rawdiff_infer.compile_cache import compile_cache_counters
    from rawdiff_infer.model import UNet, UNetConfig

    cfg = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_stages=(1,), head_channels=8, groups=4,
                     patch_size=16)
    torch.manual_seed(0)
    b = TorchBackend(UNet(cfg), ModelMeta(model=cfg), compile=True, compile_cache=sys.argv[1])
    x = torch.randn(2, 3, 16, 16)
    t0 = time.perf_counter()
    b(x, x, torch.tensor([1.0, 500.0]))
    print(json.dumps({"seconds": time.perf_counter() - t0, **compile_cache_counters()}))
""")


def _child(cache: Path) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "TRITON_CACHE_DIR")}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(cache)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_finds_the_compiled_graph(tmp_path: Path) -> None:
    """First process: a miss, entries written into the folder; second process: a hit on both caches, no miss,
    and a far shorter first call."""
    cache = tmp_path / "cache"
    cold = _child(cache)
    assert cold["fxgraph_miss"] >= 1 and cold["fxgraph_hit"] == 0, cold
    assert any((cache / "fxgraph").rglob("*")) and any((cache / "aotautograd").rglob("*"))
    warm = _child(cache)
    assert warm["fxgraph_hit"] >= 1 and warm["fxgraph_miss"] == 0, warm
    assert warm["aotautograd_hit"] >= 1 and warm["aotautograd_miss"] == 0, warm
    assert warm["seconds"] < 0.5 * cold["seconds"], (cold, warm)
    print(f"first call: cold {cold['seconds']:.1f} s, warm {warm['seconds']:.1f} s")
