"""Reading a FLUX.2 LoRA: the FLUX.1 reader (``formats.parse_lora``: key roles, prefixes, alphas, fused splits,
block-diagonal up matrices) over FLUX.2's name tables (``flux2_names``), and FLUX.2's format names.

```python
from engine.lora.flux2_formats import parse_flux2_lora
lf = parse_flux2_lora(tensors, metadata, "x.safetensors")   # LoraFile, targets on Flux2Transformer2DModel names
lf.format   # "diffusers/PEFT", "DiffSynth", "kohya", "ai-toolkit", "ComfyUI", "OneTrainer"
```

The formats and their key patterns are in ``engine.lora.flux2_names``' docstring. DiffSynth-Studio's FLUX.2 trainer
output -- the file our own FLUX.2 LoRA trainer writes too -- is exactly::

    transformer_blocks.{i}.attn.{to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out}
                                                                                    .lora_{A,B}.default.weight
    transformer_blocks.{i}.{ff,ff_context}.{linear_in,linear_out}.lora_{A,B}.default.weight
    single_transformer_blocks.{i}.attn.{to_qkv_mlp_proj,to_out}.lora_{A,B}.default.weight

(A [rank, in], B [out, rank]; no alpha: DiffSynth sets lora_alpha = rank, so the change is B @ A times the weight).
"""
from __future__ import annotations

from . import flux2_names as names
from .family import FLUX2
from .formats import LoraFile, parse_lora


def flux2_format(keys, metadata: dict, found: str) -> str:
    """FLUX.2's name for a file's format, from what ``parse_lora`` found over FLUX.2's tables and the keys."""
    keys = list(keys)
    if found == "BFL":   # BFL module names: PEFT matrices (ai-toolkit) or lora_down/up + alpha (ComfyUI's saves)
        return "ComfyUI" if any(k.endswith(".lora_down.weight") for k in keys) else "ai-toolkit"
    if found == "diffusers/PEFT":
        prefixed = any(k.startswith(("transformer.", "base_model.model.")) for k in keys)
        if not prefixed and any(".lora_A.default." in k for k in keys):
            return "DiffSynth"
    return found


def parse_flux2_lora(tensors: dict, metadata: dict | None = None, label: str = "<state dict>") -> LoraFile:
    """Map a LoRA state dict onto diffusers' ``Flux2Transformer2DModel`` module names."""
    out = parse_lora(tensors, metadata, label, namings=names.NAMINGS, underscored=names.UNDERSCORED,
                     mapped_for=FLUX2)
    out.format = flux2_format(tensors, out.metadata, out.format)
    return out
