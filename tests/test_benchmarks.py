"""benchmarks/gpu.py's CPU smoke run: every row present in the table and the JSON, ratios to diffusers computed, an
option the engine lacks recorded as "not available", the budget's skips recorded."""
from __future__ import annotations

import json
import pathlib
import sys
from types import SimpleNamespace

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
ROWS = ["diffusers eager", "engine eager", "engine compiled", "engine compiled + fp8",
        "engine compiled + fp8 + step cache", "engine, limit 4 GB", "variant swap"]


@pytest.fixture(scope="module")
def gpu():
    sys.path.insert(0, str(BENCH))
    import gpu as module
    return module


def _run(gpu, tmp_path, demo_dir, *extra):
    out = tmp_path / "bench"
    assert gpu.main(["--cpu", "--tiny", "--steps", "1", "--size", "64", "--limits", "4", "--no-plans",
                     "--repeats", "1", "--tokenizers", str(demo_dir), "--out", str(out), *extra]) == 0
    return json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text()


def test_cpu_smoke_run_writes_every_row(gpu, tmp_path, demo_dir):
    data, table = _run(gpu, tmp_path, demo_dir)
    rows = {r["config"]: r for r in data["results"]}
    assert list(rows) == ROWS
    assert all(r["status"] == "ok" for r in rows.values()), rows
    for name in ROWS[:-1]:
        r = rows[name]
        assert r["seconds_per_image"] > 0 and r["peak_ram_gb"] > 0
        assert r["vs_diffusers"] == pytest.approx(r["seconds_per_image"] / rows["diffusers eager"]["seconds_per_image"])
        assert f"| {name} | ok | {r['seconds_per_image']:.2f} |" in table
    # On a CPU the speed options say why they are off instead of pretending.
    assert any("CPU" in n for n in rows["engine compiled"]["notes"])
    assert rows["engine compiled + fp8 + step cache"]["step_cache"]["threshold"] == pytest.approx(0.08)
    swap = rows["variant swap"]
    assert swap["file_gb"] > 0 and swap["raw_read_seconds"] > 0 and swap["engine_swap_seconds"] >= \
        swap["engine_load_seconds"] > 0
    assert "raw safetensors read" in table and data["meta"]["steps"] == 1


def test_missing_options_and_the_budget_are_recorded(gpu, tmp_path, demo_dir, monkeypatch):
    from engine.pipeline import FluxImagePipeline
    # The engine before the speed options: a set_acceleration without them.
    monkeypatch.setattr(FluxImagePipeline, "set_acceleration", lambda self: [])
    # A limit row projected past the budget is skipped, and says so.
    monkeypatch.setattr(gpu, "projected", lambda bench, name, limit=None: 1e9 if limit else 0.0)
    data, table = _run(gpu, tmp_path, demo_dir, "--no-swap")
    rows = {r["config"]: r for r in data["results"]}
    assert list(rows) == ROWS[:-1]
    assert rows["engine compiled"]["status"] == gpu.NOT_AVAILABLE
    assert "set_acceleration has no compile" in rows["engine compiled"]["why"]
    assert "set_acceleration has no fp8_compute" in rows["engine compiled + fp8"]["why"]
    assert "| engine compiled | not available |" in table
    assert rows["engine eager"]["status"] == "ok" and rows["engine eager"]["vs_diffusers"] > 0
    assert rows["engine, limit 4 GB"]["status"] == "skipped" and "450 s budget" in rows["engine, limit 4 GB"]["why"]
    assert "| engine, limit 4 GB | skipped |" in table


def test_projection_grows_as_the_limit_falls(gpu):
    import torch
    ref = {"config": "engine eager", "status": "ok", "seconds_per_image": 7.0, "warmup_seconds": 3.0}
    bench = SimpleNamespace(results=[ref], device=torch.device("cuda"))
    assert gpu.projected(SimpleNamespace(results=[], device=bench.device), "engine eager") == 0.0   # nothing known
    times = [gpu.projected(bench, f"engine, limit {x} GB", x) for x in (24, 12, 8, 4)]
    assert times == sorted(times) and times[0] > 10.0
    assert gpu.projected(bench, "engine compiled") > gpu.projected(bench, "engine compiled + fp8 + step cache")
