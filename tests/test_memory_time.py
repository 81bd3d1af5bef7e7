"""The planner's time model (engine.memory.cost) and the plans it picks, on the CPU.

- Full-size plans from the checkpoint manifests (no weights) with the reference rates injected: the predicted time
  never rises with the VRAM limit (FLUX.1-dev, FLUX.2 [klein] 4B); FLUX.1-dev within 16 GB of RAM at every limit from
  4 GB; at 24 GB nothing that fits is offloaded needlessly (forcing any offloaded component resident is slower or
  does not fit); at 12 GB the text encoders hold no room while the transformer streams.
- The time model itself: streaming with prefetch costs the larger of copy and compute, the residency's moves are
  counted, a faster link makes streaming plans faster and leaves resident ones alone.
- Partial streaming on the demo model: the first blocks resident, the rest through diffusers' module groups, the same
  image as the resident run.
- The probe: positive rates, measured once per process; the dry-run line a script reads.
"""
from __future__ import annotations

import io
import re
from contextlib import redirect_stdout
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine import memory as vram
from engine.memory import cost
from engine.memory import place as P
from tests.test_flux2_memory import manifest_paths as flux2_manifest_paths
from tests.test_vram import demo_pipe, force, image, manifest_paths

LIMITS = (4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 80, None)


pytestmark = pytest.mark.usefixtures("reference_rates")   # fixed rates: tests/conftest.py


@pytest.fixture(scope="module")
def dev(manifests_dir):
    return vram.sizes_from_manifests(manifest_paths(manifests_dir))


@pytest.fixture(scope="module")
def klein(manifests_dir):
    return vram.sizes_from_manifests(flux2_manifest_paths(manifests_dir, "FLUX.2-klein-4B"))


def _sweep(sizes, ram, **kw):
    return [vram.plan(sizes, "cuda", limit, ram, **kw) for limit in LIMITS]


@pytest.mark.parametrize("ram", [16, None])
def test_predicted_time_falls_as_the_limit_rises(dev, klein, ram):
    for name, sizes, kw in (("FLUX.1-dev", dev, {}), ("klein 4B", klein, {"pipeline": "flux2", "steps": 4})):
        plans = _sweep(sizes, ram, **kw)
        seconds = [p.predicted_seconds for p in plans]
        assert all(s > 0 for s in seconds), (name, seconds)
        assert all(b <= a + 1e-3 for a, b in zip(seconds, seconds[1:])), (name, ram, seconds)
        assert seconds[0] > 1.2 * seconds[-1], (name, seconds)      # 4 GB is slower than no limit, by moving bytes
        for limit, p in zip(LIMITS, plans):
            assert p.fits and (limit is None or p.predicted_peak_vram_gb <= limit), (name, limit, p.notes)
            assert p.as_dict()["predicted_seconds"] == round(p.predicted_seconds, 2)


def test_flux1_dev_within_16_gb_of_ram(dev):
    for limit in (4, 8, 12, 24):
        p = vram.plan(dev, "cuda", limit, 16)
        assert p.fits and p.predicted_peak_ram_gb <= 16 and p.predicted_peak_vram_gb <= limit, (limit, p.notes)
        assert sum(e.ram_bytes for e in p.entries.values()) < 14 * vram.GiB
    # without a RAM budget the 4 GB plan keeps more in pinned RAM (faster): the budget is what trims it
    free, tight = vram.plan(dev, "cuda", 4), vram.plan(dev, "cuda", 4, 16)
    assert free.predicted_peak_ram_gb > 16 and free.predicted_seconds < tight.predicted_seconds
    # what does not fit in RAM is read from the memory-mapped file (no private copy)
    assert any(e.strategy == "stream" and not e.pinned and e.ram_bytes == 0 for e in tight.entries.values())


def test_at_24_gb_nothing_that_fits_is_offloaded_needlessly(dev):
    p = vram.plan(dev, "cuda", 24, 16)
    assert p.entries["dit"].option not in ("O", "FO")             # the transformer is never moved per image
    assert p.seconds_parts["moves"] < 0.1
    offloaded = [r for r, e in p.entries.items() if e.strategy in ("offload", "fp8+offload")]
    for role in offloaded:     # kept resident instead (the seed's fields pin it), the plan is slower or does not fit
        pinned = vram.plan(dev, "cuda", 24, 16, fields={role: {"computation_dtype": "bfloat16"}})
        assert pinned.entries[role].strategy == "resident"
        assert not pinned.fits or pinned.predicted_seconds >= p.predicted_seconds - 1e-3, role
    # with room for everything, everything is resident in full precision
    roomy = vram.plan(dev, "cuda", 40, 16)
    assert {e.option for e in roomy.entries.values()} == {"R"} and roomy.seconds_parts["moves"] == 0


def test_at_12_gb_the_text_encoders_leave_the_room_to_the_transformer(dev):
    p = vram.plan(dev, "cuda", 12, 16)
    dit = p.entries["dit"]
    assert dit.strategy == "stream" and dit.resident_blocks > dit.total_blocks // 2
    for role in ("text_encoder_1", "text_encoder_2"):
        assert p.entries[role].stay_bytes == 0, role          # nothing of theirs stays while the transformer runs
    assert "blocks stay on the GPU" in " ".join(p.notes)
    # the text encoders run once per prompt: a run of images with one prompt is faster
    again = vram.plan(dev, "cuda", 12, 16, prompts_per_image=0.0)
    assert again.predicted_seconds < p.predicted_seconds


def test_the_time_model():
    c = cost.Constants(pinned_bps=10e9, pageable_bps=5e9, disk_bps=1e9, flops=1e12, cast_bps=1e9,
                       block_overhead_s=0.0, overlap_loss=0.0)
    size = vram.ComponentSize("dit", params=1000, blocks=(400, 400), block_fp8=(400, 400), fp8_params=800,
                              dims={"hidden": 8})
    work = cost.Work(width=64, height=64, steps=10, text_tokens=0)
    compute = cost.flops("dit", size, work) / c.flops
    entry = vram.Entry("dit", "dit", "S", "stream", "bfloat16", "bfloat16", "cuda:0", "cpu", pinned=True,
                       prefetch=True, streamed_bytes=2 * 10 ** 12, streamed_blocks=2)
    moved = 2 * 10 ** 12 / c.pinned_bps
    assert cost.component_seconds(entry, size, work, c) == pytest.approx(10 * max(compute, moved))
    no_prefetch = replace(entry, prefetch=False)
    assert cost.component_seconds(no_prefetch, size, work, c) == pytest.approx(10 * (compute + moved))
    mapped = replace(entry, pinned=False)      # a mapped file: the page cache's rate, or the disk's when it misses
    assert cost.component_seconds(mapped, size, work, c, cache_fits=False) == pytest.approx(
        10 * 2 * 10 ** 12 / c.disk_bps)
    fp8 = replace(entry, strategy="fp8", storage_dtype=vram.FP8)
    assert cost.component_seconds(fp8, size, work, c) == pytest.approx(10 * (compute + 800 / c.cast_bps))


def test_the_residency_moves_are_counted(dev):
    # the seed's fields pin the transformer and T5 offloaded: at 24 GB they evict each other at every image
    fields = {r: {"offload_dtype": "bfloat16", "offload_device": "cpu", "onload_device": "cuda"}
              for r in ("dit", "text_encoder_2")}
    p = vram.plan(dev, "cuda", 24, fields=fields)
    moved = p.entries["dit"].vram_bytes + p.entries["text_encoder_2"].vram_bytes
    assert p.seconds_parts["moves"] == pytest.approx(2 * moved / cost.REFERENCE.pageable_bps, rel=1e-6)
    # with room for both, they move in once and stay
    assert vram.plan(dev, "cuda", 80, fields=fields).seconds_parts["moves"] == 0


def test_a_faster_link_speeds_up_streaming_only(dev):
    slow, fast = cost.REFERENCE, replace(cost.REFERENCE, pinned_bps=4 * cost.REFERENCE.pinned_bps)
    small = [vram.plan(dev, "cuda", 4, 16, constants=c).predicted_seconds for c in (slow, fast)]
    assert small[1] < small[0]
    roomy = [vram.plan(dev, "cuda", None, constants=c).predicted_seconds for c in (slow, fast)]
    assert roomy[0] == roomy[1]


# ------------------------------------------------------------------------------------------------ placement
def _partly_streamed(pipe, k, storage=None):
    for role in ("dit", "text_encoder_2"):
        place = P.ComponentPlacement(torch.device("cpu"), pipe.torch_dtype, torch.device("cpu"),
                                     storage or pipe.torch_dtype, strategy="stream", role=role,
                                     resident_blocks=1 if role != "dit" else k)
        pipe.placements[role] = place
        setattr(pipe, role, P.apply(getattr(pipe, role), place, role))
    pipe.prompt_cache.clear()


def test_partial_streaming_gives_the_resident_image(demo_dir):
    pipe = demo_pipe(demo_dir)
    resident = image(pipe)
    force(pipe, "resident")
    pipe.residency.forget()
    blocks = P.stream_blocks("dit", pipe.dit)
    k = len(blocks) // 2
    _partly_streamed(pipe, k)
    hooks = [getattr(b, "_diffusers_hook", None) for b in blocks]
    assert all(h is None or h.get_hook("group_offloading") is None for h in hooks[:k])     # resident blocks
    assert all(h.get_hook("group_offloading") is not None for h in hooks[k:])              # streamed blocks
    assert P.is_streamed(pipe.dit)
    assert np.array_equal(image(pipe), resident)
    force(pipe, "resident")                     # hooks off again, the same image
    assert all(getattr(b, "_diffusers_hook", None) is None or b._diffusers_hook.get_hook("group_offloading") is None
               for b in blocks)
    assert np.array_equal(image(pipe), resident)
    # fp8 storage partly streamed (layer-wise casting inside the streamed blocks) is fp8 resident's image
    force(pipe, "fp8", torch.float8_e4m3fn)
    fp8 = image(pipe)
    force(pipe, "resident")
    _partly_streamed(pipe, k, torch.float8_e4m3fn)
    assert P.is_fp8(pipe.dit) and P.is_streamed(pipe.dit)
    assert np.array_equal(image(pipe), fp8)


def test_a_streamed_stage_makes_room():
    r = P.Residency()
    r.configure(budget_bytes=100, fixed_bytes=10)
    off = P.ComponentPlacement(torch.device("cpu"), torch.float32, torch.device("cpu"), torch.float32,
                               strategy="offload", vram_bytes=50)
    r.onload("t5", torch.nn.Linear(2, 2), off)
    small = P.ComponentPlacement(torch.device("cpu"), torch.float32, torch.device("cpu"), torch.float32,
                                 strategy="stream", vram_bytes=60, stay_bytes=30, activation_bytes=5)
    r.onload("dit", torch.nn.Linear(2, 2), small)       # 10 + 50 + (60 - 30) + 5 <= 100: T5 stays
    assert r.onloaded() == ["t5"]
    big = replace(small, vram_bytes=80, stay_bytes=20)   # 10 + 50 + 60 + 5 > 100: T5 goes back first
    r.onload("dit", torch.nn.Linear(2, 2), big)
    assert r.onloaded() == [] and ("t5", "out") in r.moves and ("dit", "in") not in r.moves


# ------------------------------------------------------------------------------------------------- the probe
def test_the_probe_measures_once(monkeypatch):
    monkeypatch.setattr(cost, "_CACHE", {})
    monkeypatch.setattr(cost, "_INJECTED", {})
    first = cost.constants("cpu")
    assert first.source == "probe" and first.device == "cpu"
    assert min(first.pinned_bps, first.pageable_bps, first.flops, first.cast_bps, first.disk_bps) > 0
    assert cost.constants("cpu") is first                     # cached for the process
    cost.set_constants(cost.CPU_REFERENCE, "cpu")
    assert cost.constants("cpu").source == "injected"


def test_the_dry_run_line(manifests_dir, monkeypatch):
    from benchmarks import vram_flux2
    monkeypatch.setattr(vram_flux2, "MANIFESTS", manifests_dir)
    monkeypatch.setattr(vram_flux2, "manifest_paths", lambda name, root=manifests_dir: flux2_manifest_paths(root, name))
    out = io.StringIO()
    with redirect_stdout(out):
        vram_flux2.main(["--models", "FLUX.2-klein-4B", "--limits", "8", "none", "--ram-limit", "16"])
    lines = re.findall(r"^== plan for (\S+(?: GB| limit)): predicted peak VRAM (\d+\.\d) GB, RAM (\d+\.\d) GB, "
                       r"(\d+\.\d) s/image$", out.getvalue(), re.M)
    assert [x[0] for x in lines] == ["8 GB", "no limit"], out.getvalue()
    assert float(lines[0][1]) <= 8 and float(lines[0][2]) <= 16 and float(lines[0][3]) >= float(lines[1][3])
