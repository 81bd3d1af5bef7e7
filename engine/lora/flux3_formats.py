"""Reading a FLUX 3 LoRA: the FLUX.1 reader (``formats.parse_lora``: key roles, prefixes, alphas, fused splits,
block-diagonal up matrices) over FLUX 3's name tables (``flux3_names``), and FLUX 3's format names.

```python
from engine.lora.flux3_formats import parse_flux3_lora
lf = parse_flux3_lora(tensors, metadata, "x.safetensors")   # LoraFile, targets on Flux3Transformer2DModel names
lf.format   # "diffusers/PEFT", "BFL", "ComfyUI", "kohya", "OneTrainer", "DiffSynth", "ai-toolkit"
```

The formats and their key patterns are in ``engine.lora.flux3_names``' docstring. DiffSynth-Studio's FLUX 3 code is
not in the offline mirror; its DiT's parameter names are the BFL file's (it loads ``model.safetensors`` without a
converter), so its trainer's PEFT keys are taken to be those names with ``.lora_A|lora_B.default.weight`` and no
prefix, as its FLUX.1 and FLUX.2 trainers write them over their DiTs' names.
"""
from __future__ import annotations

from . import flux3_names as names
from .family import FLUX3
from .formats import LoraFile, _is_ai_toolkit, parse_lora

_BFL_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "transformer.", "base_model.model.")


def flux3_format(keys, metadata: dict, found: str) -> str:
    """FLUX 3's name for a file's format, from what ``parse_lora`` found over FLUX 3's tables and the keys."""
    keys = list(keys)
    if found != "BFL":
        return found
    if any(k.endswith(".lora_down.weight") for k in keys):        # ComfyUI's saves: lora_down/lora_up + alpha
        return "ComfyUI"
    if any(".lora_A.default." in k for k in keys) and not any(k.startswith(_BFL_PREFIXES) for k in keys):
        return "DiffSynth"
    return "ai-toolkit" if _is_ai_toolkit(metadata) else "BFL"


def parse_flux3_lora(tensors: dict, metadata: dict | None = None, label: str = "<state dict>") -> LoraFile:
    """Map a LoRA state dict onto diffusers' ``Flux3Transformer2DModel`` module names."""
    out = parse_lora(tensors, metadata, label, namings=names.NAMINGS, underscored=names.UNDERSCORED,
                     mapped_for=FLUX3)
    out.format = flux3_format(tensors, out.metadata, out.format)
    return out
