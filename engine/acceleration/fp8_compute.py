"""fp8 matmuls through torchao's float8: ``quantize_`` with ``Float8DynamicActivationFloat8WeightConfig`` (per-row
scales) on the linear layers of the transformer's blocks.

Weights become fp8 (e4m3) with one scale per output row, activations are quantized per row at each call, and the
matmul runs on the GPU's fp8 tensor cores (``torch._scaled_mm``): compute capability 8.9 and up (Ada, Hopper,
Blackwell). Elsewhere it cannot help (torchao refuses it; on a CPU there are no fp8 matmul units): it stays off, with
a note saying why. It cannot be undone in place (the weights' low bits are gone): switching it off re-reads the
transformer.

Which layers: the ``nn.Linear`` layers inside the repeated blocks whose widths are multiples of 16 (the kernel's
tile), not those already stored in fp8 by the memory plan (diffusers' layer-wise casting: they are cast to the
compute dtype at each call, which a float8 tensor cannot be); the embedders and the output projection stay in the
compute dtype, as torchao's and diffusers' FLUX recipes leave them, and so do layers of a quantized checkpoint
(GGUF / NF4 / fp8 files: ``nn.Linear`` subclasses with packed weights). LoRA adapters are forward hooks on the
layers' outputs and keep working.
"""
from __future__ import annotations

import importlib.util

import torch

from .compile import repeated_blocks

MIN_CAPABILITY = (8, 9)


def support(device) -> tuple:
    """(True, "") where fp8 matmuls can run, else (False, why)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, (f"fp8 compute is off: it needs an NVIDIA GPU of compute capability "
                       f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer, and this job computes on the "
                       f"{device.type.upper()}, which has no fp8 matmul units.")
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        return False, (f"fp8 compute is off: this GPU ({torch.cuda.get_device_name(device)}) is compute capability "
                       f"{capability[0]}.{capability[1]}; fp8 matmuls need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                       f"or newer (Ada, Hopper, Blackwell).")
    if importlib.util.find_spec("torchao") is None:
        return False, "fp8 compute is off: torchao is not installed (pip install torchao==0.18.0)."
    return True, ""


def _fp8_stored(layer) -> bool:
    registry = getattr(layer, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("layerwise_casting") is not None


def target_layers(dit) -> list:
    """[(qualified name, nn.Linear)] that fp8 compute converts (see the module's docstring)."""
    blocks = {id(b) for b in repeated_blocks(dit)}
    out = []
    for name, module in dit.named_modules():
        if id(module) not in blocks:
            continue
        for sub_name, layer in module.named_modules():
            if (type(layer) is torch.nn.Linear and layer.in_features % 16 == 0
                    and layer.out_features % 16 == 0 and not _fp8_stored(layer)):
                out.append((f"{name}.{sub_name}", layer))
    return out


def is_applied(dit) -> bool:
    return bool(getattr(dit, "_flux_fp8_compute", False))


def apply_fp8_compute(dit, device, streamed: bool = False) -> list:
    """Convert the target layers to torchao's float8 where the device has fp8 matmuls; returns notes."""
    if is_applied(dit):
        return []
    ok, why = support(device)
    if not ok:
        return [why]
    if streamed:
        return ["fp8 compute is skipped: the transformer is streamed block by block under this VRAM limit. Raise "
                "the limit (or use fp8 storage, which the plan chooses itself)."]
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    names = {name for name, _ in target_layers(dit)}
    quantize_(dit, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, fqn: fqn in names)
    dit._flux_fp8_compute = True
    return [f"fp8 compute: {len(names)} linear layers of the transformer's blocks run fp8 matmuls (torchao)."]
