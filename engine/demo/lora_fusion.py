"""A tiny random-weight DiffSynth-Studio LoRA Fusion file in the official key layout, for the offline demo and tests.

``write_lora_fusion_demo(models_dir)`` writes ``<models_dir>/FLUX-Studio/LoRAFusion-preview-FLUX.1-dev-random-demo/
model.safetensors`` (BF16, as the real file): one gate per linear layer of the FLUX.1 demo's transformer (its 2 double
and 2 single blocks, 26 gates, widths from ``flux1.TRANSFORMER``), keys ``model_dict.<layer, dots as ___>.<field>``.
The gates are random, so merging through them visibly differs from adding the LoRAs.
"""
from __future__ import annotations

import pathlib

from . import flux1
from .files import demo_stamp, write_safetensors_once
from .weights import RandomWeights

VERSION = 1
MODEL_ID = "FLUX-Studio/LoRAFusion-preview-FLUX.1-dev-random-demo"   # engine.registry.adapter_demo_id(...)
FILE = "model.safetensors"


def fusion_state_dict(seed: int = 0) -> dict:
    import torch

    from ..lora.fusion import default_dims
    t = flux1.TRANSFORMER
    dims = default_dims(t["depth"], t["depth_single_blocks"], t["hidden_size"], int(t["hidden_size"] * t["mlp_ratio"]))
    w = RandomWeights(seed, "lora-fusion", torch.bfloat16)
    for name, dim in dims.items():
        key = f"model_dict.{name}"
        for field in ("weight_base", "weight_lora", "weight_cross"):
            w.normal(f"{key}.{field}", (dim,), 0.5)
        w.normal(f"{key}.weight_out", (dim,), 0.2, mean=1.0)     # near the plain sum, not at it
        w.normal(f"{key}.bias", (dim,), 0.5)
        w.norm(f"{key}.norm_base.weight", dim, f"{key}.norm_base.bias")
        w.norm(f"{key}.norm_lora.weight", dim, f"{key}.norm_lora.bias")
    return w.sd


def write_lora_fusion_demo(models_dir, seed: int = 0) -> pathlib.Path:
    """Write (once) the demo gates; returns their folder (``<models_dir>/<MODEL_ID>``)."""
    folder = pathlib.Path(models_dir) / MODEL_ID
    readme = (f"# {MODEL_ID}\n\nRandom weights in the key layout of DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev's "
              f"{FILE}, one gate per linear layer of {flux1.DEMO_MODEL_ID}'s transformer. Written by FLUX Studio "
              f"(engine/demo/lora_fusion.py).\n")
    write_safetensors_once(folder / FILE, lambda: fusion_state_dict(seed), demo_stamp("lora-fusion", VERSION, seed),
                           readme=readme)
    return folder


__all__ = ["MODEL_ID", "FILE", "fusion_state_dict", "write_lora_fusion_demo"]
