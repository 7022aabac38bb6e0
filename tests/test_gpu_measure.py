"""The prepared GPU run of issue 22 (``rawdiff_bench.gpu_measure``), rehearsed on the CPU.

The rehearsal runs the real command line in a subprocess (tiny U-Net with the bundled model's ISP, small crops of
the prepared photos, every phase), then results.json is checked: every phase is there with finite numbers or an
explicit reason for what it left out, and the correctness comparisons were actually computed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rawdiff_bench import gpu_measure as gm

pytestmark = pytest.mark.slow  # about a minute on a 2-core CPU


def _finite_positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def inputs(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("measure-inputs")
    manifest = gm.prepare_inputs([shared_data / "train-photos"], out)
    assert set(manifest) == set(gm.ROLES)
    total = sum(v["bytes"] for v in manifest.values())
    assert total < 6 * 2**20, total  # "a few MiB": it travels with the working tree to the device
    for role, (name, w, h, _) in gm.ROLES.items():
        from PIL import Image

        assert Image.open(out / name).size == (w, h)
        assert manifest[role]["clipped_pixel_share"] > 0  # real photos with clipped highlights
    return out


@pytest.fixture(scope="module")
def rehearsal(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, float, str]:
    out = tmp_path_factory.mktemp("measure-out")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rawdiff_bench.gpu_measure", "run", "--inputs", str(inputs),
                           "--out", str(out), "--rehearse", "--device", "cpu"], capture_output=True, text=True,
                          timeout=600)
    seconds = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out, seconds, proc.stdout


def test_every_phase_ran_without_errors(rehearsal) -> None:
    data, out, seconds, stdout = rehearsal
    assert data["errors"] == [], data["errors"]
    for name in gm.PHASE_NAMES:
        ph = data["phases"][name]
        assert _finite_positive(ph["seconds"]) and "skipped_phase" not in ph
        for s in ph.get("skipped", []):  # anything left out says why
            assert s["what"] and s["reason"], s
    assert data["env"]["mode"].startswith("rehearsal") and data["setup"]["model"] == ["random", "tiny"]
    assert data["total_seconds"] < 240, data["total_seconds"]  # well under a minute when the CPU is not shared
    log = (out / "log.txt").read_text()
    assert "phase compile done" in log and "phase defaults done" in log
    assert "== gpu_measure:" in stdout and "pinned_vs_plain: ok" in stdout


def test_photos_at_the_defaults_with_and_without_consistency_and_skipping(rehearsal) -> None:
    data = rehearsal[0]
    d = data["phases"]["defaults"]
    assert d["settings"]["consistent"] and d["settings"]["tiles"]["stride"] == 48
    rows = {(r["label"], r["consistency"], r["skip_determined"]): r for r in d["photos"]}
    for label in ("2048x2048", "4000x3000"):
        combos = [(label, "auto", True), (label, "auto", False), (label, "off", False)]
        assert all(c in rows for c in combos), sorted(rows)
        for c in combos:
            r = rows[c]
            for k in ("seconds", "seconds_min", "unet_bound_s", "ratio_to_bound", "tflops_effective"):
                assert _finite_positive(r[k]), (c, k, r[k])
            assert 0 < r["evaluated_share"] <= 1 and r["clipped_pixel_share"] > 0
        # skipping never sends more patches through the model; without consistency every patch goes
        assert rows[(label, "auto", True)]["evaluated_patches"] <= rows[(label, "auto", False)]["evaluated_patches"]
        assert rows[(label, "off", False)]["evaluated_share"] == 1.0
    assert any(rows[(lb, "auto", True)]["evaluated_share"] < 1 for lb in ("2048x2048", "4000x3000"))
    assert d["not_measured"][0]["same_as"] == "consistency off"


def test_folder_sequential_against_pipelined_with_busy_shares(rehearsal) -> None:
    d = rehearsal[0]["phases"]["defaults"]
    assert [r["mode"] for r in d["folder"]] == ["sequential", "pipelined"]
    for r in d["folder"]:
        assert r["frames"] == 4 and (r["width"], r["height"]) == (128, 80)
        assert _finite_positive(r["images_per_s"]) and 0 < r["model_busy_share"] <= 1.05
    assert any(r["packs"] < r["frames"] for r in d["folder"] if r["mode"] == "pipelined")  # small frames packed
    for mode in ("sequential", "pipelined"):
        b = d["folder_busy"][mode]
        assert b["events"]["ops"] > 100 and 0 < b["ops_busy_share"] <= 1.0 and _finite_positive(b["wall_s"])
        assert "union" in b["method"]


def test_unet_rows_and_winners(rehearsal) -> None:
    u = rehearsal[0]["phases"]["unet"]
    assert u["rows"] and _finite_positive(u["gflop_per_patch"])
    for r in u["rows"]:
        assert _finite_positive(r["ms_median"]) and _finite_positive(r["tflops"]) and r["rel_ok"], r
        assert math.isfinite(r["rel_err"]) and r["rel_err"] < gm.REL_TOL[r["dtype"]]
    variants = {r["variant"] for r in u["rows"]}
    assert {"torch/cl", "torch/eager"} <= variants
    assert {r["cudnn_benchmark"] for r in u["rows"]} == {False, True}
    reasons = {s["what"].split(" batch")[0].split(" ", 1)[1]: s["reason"] for s in u["skipped"]}
    assert "CUDA graphs need a GPU" in reasons["graph"] and "--with-compile" in reasons["compile"]
    fastest = u["winners"]["fastest"]
    for key, best in fastest.items():
        same = [r for r in u["rows"] if f"{r['dtype']} batch {r['batch']}" == key]
        assert best["tflops"] == max(r["tflops"] for r in same)
    assert u["profile"]["ms_per_call"] > 0 and abs(sum(u["profile"]["categories"].values()) - 1) < 1e-6


def test_correctness_checks_were_computed(rehearsal) -> None:
    data, out = rehearsal[0], rehearsal[1]
    c = data["phases"]["correctness"]
    p = c["pinned_vs_plain"]
    assert p["ok"] and p["upload_equal"] and p["download_equal"]
    assert p["runner_max_pack_1"]["images"] == 3 and p["runner_max_pack_1"]["packs"] == 3
    assert p["runner_max_pack_8"]["packs"] < 3  # packing happened, and gave each image's own result
    assert p["runner_max_pack_1"]["max_abs_diff"] < 1e-6 and p["runner_max_pack_8"]["max_abs_diff"] < 1e-3
    assert len(c["unet_variants_vs_fp32"]) == len(data["phases"]["unet"]["rows"])
    g = c["gpu_tests"]
    expected = gm._gpu_test_files(Path(gm.__file__).resolve().parents[1] / "tests")
    assert g["returncode"] == 0 and g["files"] == [f.name for f in expected] and g["total"] >= len(expected)
    assert (out / "gpu_tests.xml").is_file() and (out / "gpu_tests.log").is_file()
    if not torch.cuda.is_available():
        assert g["skipped"] == g["total"] and g["failed"] == 0
        for k in ("cuda_graph_vs_eager", "step_graph_vs_eager", "cuda_graph_vs_eager_other_device"):
            assert "CUDA" in c[k]["skipped"]
    assert "AOTInductor" in c["aoti_vs_eager"]["skipped"]


def test_compile_cost_phase(rehearsal) -> None:
    cc = rehearsal[0]["phases"]["compile"]
    first = cc["eager-first"]  # a real fresh process through compile_cost
    assert _finite_positive(first["first_eps_s"]) and first["process_wall_s"] >= first["first_eps_s"]
    assert cc["options"]["model"] == "random" and cc["options"]["device"] == "cpu"
    assert {s["what"] for s in cc["skipped"]} == {"compile-cold", "compile-warm", "aoti-build", "aoti-first",
                                                   "steady"}


def test_interval_union_and_frames() -> None:
    assert gm._interval_union_s([(30, 40), (0, 10), (5, 20), (10, 12)]) == pytest.approx(30e-9)
    assert gm._interval_union_s([]) == 0
    rng = np.random.default_rng(0)
    pan = rng.integers(0, 200, (120, 300, 3), dtype=np.uint8)
    pan[10:20, 250:260] = 255
    inp = gm.Inputs({}, pan, 5, (80, 128))
    frames = [inp.frame(i) for i in range(5)]
    assert all(f.shape == (80, 128, 3) for f in frames)
    assert np.array_equal(frames[0], pan[:80, :128]) and np.array_equal(frames[-1], pan[-80:, -128:])
    crop = gm.bright_crop(pan, 64, 48)
    assert crop.shape == (48, 64, 3) and gm.clipped_share(crop) > 0
    assert gm.bright_crop(pan, 999, 999).shape == pan.shape  # clamped to the image


def test_budget_records_what_did_not_fit(tmp_path: Path) -> None:
    from rawdiff_bench.gpu_session import Results

    res = Results(tmp_path / "results.json")
    ctx = gm.Context(res=res, out=tmp_path, device="cpu", rehearse=True, with_compile=False, model=None, meta=None,
                     model_spec=("random", "tiny"), inputs=None, gflop=1.0, default_batch=16, default_dtype="fp32",
                     until={"unet": gm.elapsed() + 50}, tests_dir=None)  # type: ignore[arg-type]
    assert ctx.fits("unet", "small", 1.0)
    assert not ctx.fits("unet", "large", 1e6)
    skipped = json.loads((tmp_path / "results.json").read_text())["phases"]["unet"]["skipped"]
    assert [s["what"] for s in skipped] == ["large"] and skipped[0]["reason"].startswith("budget")
    with ctx.item("unet", "broken"):
        raise ValueError("boom")
    assert json.loads((tmp_path / "results.json").read_text())["errors"][0]["where"] == "unet: broken"
