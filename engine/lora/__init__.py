"""FLUX LoRAs in the formats people have, applied as runtime adapters on diffusers' ``FluxTransformer2DModel``
(FLUX.1), ``Flux2Transformer2DModel`` (FLUX.2: ``flux2_names``, ``flux2_formats``) and ``Flux3Transformer2DModel``
(FLUX 3: ``flux3_names``, ``flux3_formats``).

```python
from engine.lora import read_lora, LoraError, attach_lora, detach_loras, active_loras, set_lora_weight
info = read_lora(path)               # LoraFile: .format ("kohya", "diffusers/PEFT", "BFL", "XLabs", "OneTrainer",
                                     # "ai-toolkit", "DiffSynth"), .path, .rank,
                                     # .targets {diffusers layer: (A [r, in], B [out, r], scale = alpha / rank or 1)}
report = attach_lora(dit, path_or_lorafile, weight=1.0, name=None)
                                     # {"name", "format", "bound", "total", "skipped", "pairs", "pairs_bound", ...}
set_lora_weight(dit, name, 0.6)      # no reload
detach_loras(dit, names=None)        # one, several or all; the base weights were never touched
active_loras(dit)                    # [{name, path, format, weight, bound, total, rank, bytes}]
```

- ``formats``: key naming of each format, detection, the mapping onto diffusers layer names (fused q|k|v and
  q|k|v|mlp splits with widths from the tensors, the final modulation's half swap)
- ``read``: reading the file (safetensors checked and memory-mapped, ``.bin`` pickles, folders), clear errors
- ``attach``: the runtime adapters (one forward hook per targeted layer, several LoRAs with their weights)
- ``family``: which family a LoRA file is for (names and widths, header only, no torch); attaching one of the other
  family is refused naming both
- ``fusion``: DiffSynth-Studio's LoRA Fusion gates (``enable_lora_fusion(dit, fusion)``): several LoRAs on a layer
  merged by a learned gate instead of added (the seed's ``pipe.enable_lora_merger()``)
- ``flux2_names`` / ``flux2_formats``: FLUX.2's formats (diffusers/PEFT, DiffSynth, kohya, ai-toolkit, ComfyUI) onto
  ``Flux2Transformer2DModel``
- ``flux3_names`` / ``flux3_formats``: FLUX 3's formats (diffusers/PEFT, BFL, ComfyUI, kohya, OneTrainer, DiffSynth)
  onto ``Flux3Transformer2DModel`` (its per-mode image / reference / text streams and joint blocks)

A LoRA that binds to nothing, or to under half of its targets, raises ``LoraError`` naming the format found and
examples of the keys that did not bind; a file that is not a LoRA (a checkpoint, a VAE) is named as such.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import LoraError

if TYPE_CHECKING:
    from .formats import LoraFile

# Imported on first use (as ``engine`` itself does), so ``engine.lora.names`` -- what the web app shares -- loads
# without torch.
_EXPORTS = {"active_loras": ".attach", "active_names": ".attach", "attach_lora": ".attach", "bind": ".attach",
            "detach_loras": ".attach", "set_lora_weight": ".attach", "LoraFile": ".formats", "parse_lora": ".formats",
            "enable_lora_fusion": ".fusion", "disable_lora_fusion": ".fusion", "LoraFusion": ".fusion"}

FORMATS = ("kohya", "diffusers/PEFT", "BFL", "XLabs", "OneTrainer", "ai-toolkit", "DiffSynth", "ComfyUI")


def read_lora(path, device=None, family: str = "FLUX.1") -> LoraFile:
    """Read a LoRA file (``.safetensors``, ``.bin``/``.pt``, or a folder holding one) or a state dict, and map it
    onto the layer names of ``family``'s transformer ("FLUX.1": ``FluxTransformer2DModel``, "FLUX.2":
    ``Flux2Transformer2DModel``, "FLUX 3": ``Flux3Transformer2DModel``). ``device="meta"`` reads only the header
    (plus scalar alphas)."""
    from collections.abc import Mapping

    if family == "FLUX.2":
        from .flux2_formats import parse_flux2_lora as parse
    elif family == "FLUX 3":
        from .flux3_formats import parse_flux3_lora as parse
    else:
        from .formats import parse_lora as parse

    if isinstance(path, Mapping):
        return parse(dict(path), {}, "<state dict>")
    from .read import read_tensors

    file, tensors, metadata = read_tensors(path, device=device)
    return parse(tensors, metadata, str(file))


__all__ = ["read_lora", "LoraError", "LoraFile", "attach_lora", "detach_loras", "active_loras", "active_names",
           "set_lora_weight", "bind", "parse_lora", "FORMATS", "enable_lora_fusion", "disable_lora_fusion",
           "LoraFusion"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'engine.lora' has no attribute {name!r}")
