"""The runtime runs exported files without the export package (DESIGN.md: rawdiff_infer imports no export code)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "rawdiff_infer"
BACKENDS = sorted(p.stem for p in (RUNTIME / "backends").glob("*.py") if p.stem != "__init__")

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys

    class NoExport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "rawdiff_export" or name.startswith("rawdiff_export."):
                raise ModuleNotFoundError(f"blocked for this test: {name}", name=name)
            return None

    sys.meta_path.insert(0, NoExport())
    try:
        import rawdiff_export  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("the blocker does not work")
    import importlib
    import rawdiff_infer, rawdiff_infer.backends, rawdiff_infer.cli, rawdiff_infer.pipeline
    for name in sys.argv[1:]:
        importlib.import_module("rawdiff_infer.backends." + name)
    from pathlib import Path
    from rawdiff_infer.backends.trt_build import EngineBuildError, rebuild_engine
    from rawdiff_infer.backends.trt_sidecar import SIDECAR_FORMAT, EngineSidecar
    from rawdiff_infer.checkpoint import ModelMeta
    from rawdiff_infer.model import UNetConfig
    side = EngineSidecar.parse({"format": SIDECAR_FORMAT, "tensorrt": {"flavour": "tensorrt", "version": "10"},
                                "target": {}, "onnx": {"path": "/nonexistent/m.onnx"},
                                "profile": {"min_batch": 1, "opt_batch": 1, "max_batch": 1, "patch_size": 64},
                                "rawdiff": ModelMeta(model=UNetConfig.tiny()).to_dict()})
    try:  # the rebuild path starts without touching the export package
        rebuild_engine(Path("m.plan"), side, "why", trt=None, device=0)
    except EngineBuildError as e:
        assert "nonexistent" in str(e)
    assert not any(m == "rawdiff_export" or m.startswith("rawdiff_export.") for m in sys.modules)
    print("imported", len(sys.argv) - 1, "backend modules")
""")


def test_every_backend_module_imports_without_the_export_package() -> None:
    assert {"tensorrt", "trt_build", "trt_engine", "trt_runtime", "trt_sidecar", "onnx_info", "onnxruntime",
            "torch", "base"} <= set(BACKENDS)
    r = subprocess.run([sys.executable, "-c", BLOCKER, *BACKENDS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"imported {len(BACKENDS)} backend modules" in r.stdout


def test_no_runtime_module_mentions_the_export_package() -> None:
    offenders = [str(p.relative_to(RUNTIME)) for p in RUNTIME.rglob("*.py") if "rawdiff_export" in p.read_text()]
    assert offenders == []
