"""Where each component lives between and during its use.

This is the simple placement the foundation needs: each model either stays resident on the computation
device, or rests on its offload device (CPU) and is moved in for its stage. The seed's per-file fields are
honoured where given (fp8 storage via diffusers' layer-wise casting when ``offload_dtype``/``onload_dtype`` is
a float8 type). The VRAM planner (budget, streaming by block, fp8 decisions) builds on this.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

FP8_TYPES = tuple(t for t in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if t)


@dataclass
class ComponentPlacement:
    compute_device: torch.device
    compute_dtype: torch.dtype
    rest_device: torch.device      # where it sits when not in use
    storage_dtype: torch.dtype     # dtype of the stored weights (fp8 means cast per layer at compute time)

    @property
    def offloaded(self) -> bool:
        return self.rest_device != self.compute_device


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def plan(modules: dict, configs: dict, device, torch_dtype, vram_limit_gb=None) -> dict:
    device = torch.device(device)
    sizes = {name: module_bytes(m) for name, m in modules.items()}
    all_fit = vram_limit_gb is None or sum(sizes.values()) <= vram_limit_gb * 1024 ** 3
    out = {}
    for name in modules:
        cfg = configs.get(name) or {}
        compute_device = torch.device(cfg.get("computation_device") or device)
        compute_dtype = cfg.get("computation_dtype") or torch_dtype
        if cfg.get("offload_device") is not None:
            # The seed's fields: the model rests where onload_device says (offload_device when it is not
            # loaded at all); "cpu" here means "moved in for its stage".
            rest = torch.device(cfg.get("onload_device") or cfg["offload_device"])
        else:
            rest = compute_device if all_fit else torch.device("cpu")
        storage = cfg.get("onload_dtype") or cfg.get("offload_dtype") or compute_dtype
        out[name] = ComponentPlacement(compute_device, compute_dtype, rest, storage)
    return out


def _cast(module: torch.nn.Module, dtype: torch.dtype):
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)


# Layers kept in the compute dtype under fp8 storage: norms and the in/out projections (diffusers' defaults),
# and T5's feed-forward output `wo`, because transformers' T5 casts its input to `wo.weight.dtype`.
FP8_SKIP = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$", r"\.wo$")


def apply(module: torch.nn.Module, placement: ComponentPlacement) -> torch.nn.Module:
    _cast(module, placement.compute_dtype)
    if placement.storage_dtype in FP8_TYPES:
        from diffusers.hooks import apply_layerwise_casting
        apply_layerwise_casting(module, storage_dtype=placement.storage_dtype, compute_dtype=placement.compute_dtype,
                                skip_modules_pattern=FP8_SKIP)
    return module.to(placement.rest_device)


def release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
