"""Memory: where each model component lives, chosen from its size and a VRAM budget, and carried out.

The planner (pure arithmetic, no torch at import; what this package's top level exports):

- ``sizes``        component sizes from checkpoint manifests, safetensors headers or loaded modules
- ``activations``  peak activation memory of one call of a component at a job's size
- ``planner``      the plan: a strategy per component (resident, offload, fp8, fp8+offload, stream, partly
                   streamed) and its peaks, the one with the least predicted time that fits VRAM and RAM
- ``cost``         the time model: predicted seconds per image from the bytes moved, the compute and the fp8 casts,
                   with the machine's rates measured at first use (a one-second copy and matmul probe)

The placing modules (torch), imported by name:

- ``layers``       which layers of a loaded module fp8 storage casts and which blocks streaming moves
- ``place``        applying a plan (diffusers' layer-wise casting and group offloading hooks) and the residency of
                   offloaded components

What is the same for every use of a component role (its label, order, costs, placement options, importance, stage
partners, stage words) is its row in the Role table, ``engine.roles``; what is code (dims read from shapes, which
keys are castable, block patterns, activation estimates) is keyed by role here, one table per concern, with defaults
for roles it does not name.

Example::

    from engine import memory
    sizes = memory.sizes_from_files({"dit": ["flux1-dev.safetensors"], "vae": ["ae.safetensors"]})
    plan = memory.plan(sizes, "cuda", vram_limit_gb=12)
    print(plan.as_dict()["components"])
"""
from . import cost
from .activations import activation_bytes
from .cost import Constants, Work
from .planner import (COSTS, CUDA_RESERVE_GB, OPTIONS, STRATEGY_RANK, Entry, Plan, options_from_fields, plan,
                      tighter)
from .sizes import (FP8, GiB, ComponentSize, dtype_name, gb, is_fp8, sizes_from_files, sizes_from_manifests,
                    sizes_from_module, sizes_from_tensors)

__all__ = ["cost", "Constants", "Work", "ComponentSize", "Entry", "Plan", "plan", "sizes_from_tensors",
           "sizes_from_manifests", "sizes_from_files", "sizes_from_module", "activation_bytes", "options_from_fields",
           "tighter", "GiB", "FP8", "OPTIONS", "COSTS", "STRATEGY_RANK", "CUDA_RESERVE_GB", "dtype_name", "gb",
           "is_fp8"]
