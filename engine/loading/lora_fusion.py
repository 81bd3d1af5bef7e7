"""Loading DiffSynth-Studio's LoRA Fusion file (``DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev:model.safetensors``).

The published keys are DiffSynth's own (no converter): ``model_dict.<FluxDiT layer, dots as ___>.<field>`` with the
fields ``weight_base``, ``weight_lora``, ``weight_cross``, ``weight_out``, ``bias``, ``norm_base.{weight,bias}`` and
``norm_lora.{weight,bias}``, one gate per DiT Linear (304). The gates' widths are read from the file, so a smaller
random file in the same layout loads through the same code; the file must match the model one to one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelFileError
from .files import read_header, read_state_dict
from .load import assemble

PREFIX = "model_dict."


def _file(files) -> Path | None:
    if isinstance(files, (list, tuple)):
        if len(files) != 1:
            return None
        files = files[0]
    p = Path(files)
    return p if p.suffix == ".safetensors" and p.is_file() else None


def is_lora_fusion(files) -> bool:
    """Whether ``files`` is one safetensors file in the LoRA Fusion layout (header only)."""
    p = _file(files)
    if p is None:
        return False
    try:
        keys = [k for k in read_header(p) if k != "__metadata__"]
    except ModelFileError:
        return False
    return bool(keys) and all(k.startswith(PREFIX) and "___" in k for k in keys) and \
        any(k.endswith(".weight_cross") for k in keys)


def fusion_dims(keys_shapes: dict) -> dict:
    """{gate name: width} from {key: shape}."""
    dims = {}
    for key, shape in keys_shapes.items():
        if key.startswith(PREFIX) and key.endswith(".weight_base"):
            dims[key[len(PREFIX):-len(".weight_base")]] = int(shape[0])
    return dims


def load_lora_fusion(files, torch_dtype=torch.bfloat16, device="cpu"):
    """The ``engine.lora.fusion.LoraFusion`` of the file, checked key for key and shape for shape."""
    from ..lora.fusion import LoraFusion
    p = _file(files)
    if p is None or not is_lora_fusion(p):
        raise ModelFileError(f"{files} is not a LoRA Fusion file (one safetensors file of model_dict.<layer>.* gate "
                             f"tensors, as DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev's model.safetensors).",
                             str(files))
    tensors = read_state_dict(p)
    dims = fusion_dims({k: tuple(v.shape) for k, v in tensors.items()})
    try:
        model = assemble(lambda: LoraFusion(dims), tensors, torch_dtype, torch.device(device))
    except ModelFileError as e:
        raise ModelFileError(f"{p} (LoRA Fusion): {e}", str(p)) from e
    model.flux_studio_files = [str(p)]
    model.flux_studio_role = "lora_patcher"
    return model
