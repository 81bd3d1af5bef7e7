"""Loading DiffSynth-Studio's LoRA Encoder file (``model.safetensors``, role ``lora_encoder``).

``claims(item)`` tells it among ``from_pretrained``'s files by its header (``special_embeds``, ``final_linear``,
``embedder.model_dict.*``); ``load_encoder`` builds the module from the shapes and assigns the official keys one to
one (``engine.loading.load.assemble`` refuses a missing, extra or misshapen tensor).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..loading.errors import ModelFileError
from ..loading.files import read_state_dict, resolve_group
from ..loading.load import assemble
from . import model as lem


def claims(item) -> str | None:
    p = Path(item)
    if not (p.is_dir() or p.name.endswith(".safetensors")):
        return None
    try:
        keys = read_state_dict(resolve_group(p), device="meta").keys()
    except Exception:  # noqa: BLE001 - the generic loader names what is wrong with it
        return None
    return lem.ROLE if lem.is_lora_encoder(keys) else None


def encoder_from_tensors(sd: dict, torch_dtype=torch.bfloat16, device="cpu") -> torch.nn.Module:
    """The encoder from tensors already read (official keys), e.g. a manifest's shapes on the meta device."""
    cfg = lem.infer_config(sd)
    return assemble(lambda: lem.build(cfg), dict(sd), torch_dtype, torch.device(device))


def load_encoder(files, torch_dtype=torch.bfloat16, device="cpu") -> torch.nn.Module:
    items = [Path(p) for p in (files if isinstance(files, (list, tuple)) else [files])]
    if len(items) != 1:
        raise ModelFileError(f"The LoRA Encoder is one file (model.safetensors); got {len(items)}: "
                             f"{', '.join(map(str, items))}.")
    group = resolve_group(items[0])
    device = torch.device(device)
    sd = read_state_dict(group, device="meta" if device.type == "meta" else None)
    try:
        cfg = lem.infer_config(sd)
        model = assemble(lambda: lem.build(cfg), sd, torch_dtype, device)
    except ModelFileError as e:
        raise ModelFileError(f"{group.label} (LoRA Encoder): {e}", group.label) from e
    model.flux_studio_files = [str(f) for f in group.files]
    model.flux_studio_format = "DiffSynth"
    model.flux_studio_role = lem.ROLE
    model.flux_studio_description = lem.describe(cfg)
    return model


def load_role(role: str, files, torch_dtype=torch.bfloat16, device="cpu") -> torch.nn.Module:
    if role != lem.ROLE:
        raise ValueError(f"{role!r} is not the LoRA Encoder's role.")
    return load_encoder(files, torch_dtype, device)


def load_components(items, torch_dtype=torch.bfloat16, device="cpu") -> dict:
    """{"lora_encoder": module} of the files ``claims`` took (one at most)."""
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    if len(items) > 1:
        raise ModelFileError(f"Two LoRA Encoder files were given ({', '.join(map(str, items))}): pass only one.")
    return {lem.ROLE: load_encoder(items[0], torch_dtype, device)} if items else {}


__all__ = ["claims", "encoder_from_tensors", "load_components", "load_encoder", "load_role"]
