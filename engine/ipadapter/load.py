"""Loading the IP-Adapter's two files: ``ip-adapter.bin`` -> ``FluxIPAdapter`` (role ``ipadapter``) and SigLIP's
``model.safetensors`` (a whole SiglipModel, or its folder) -> ``SiglipVisionModel`` (role ``ipadapter_image_encoder``).

``load_components(files)`` is what ``FluxImagePipeline.from_pretrained`` routes here (``claims`` says which of its
files are these two: an ``ip_adapter`` pickle, or a whole SigLIP model); the studio loads role by role with
``load_role``. Modules come back on ``device`` in ``torch_dtype``, eval, without gradients, tagged like the other
loaders' (``flux_studio_files``, ``_format``, ``_role``, ``_description``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..loading.errors import ModelFileError
from ..loading.files import read_state_dict, resolve_group
from ..loading.load import assemble
from ..redux import model as siglip_model
from . import model as ipa

BIN_SUFFIXES = (".bin", ".pt", ".pth")
SIGLIP_HINT = ('download google/siglip-so400m-patch14-384 (model.safetensors and config.json) into '
               'models/google/siglip-so400m-patch14-384/, or add ModelConfig(model_id="google/siglip-so400m-patch14-384"'
               ', origin_file_pattern="model.safetensors")')


def _tag(model, files, role, fmt, desc):
    model.flux_studio_files = [str(f) for f in files]
    model.flux_studio_format = fmt
    model.flux_studio_role = role
    model.flux_studio_description = desc
    return model


def _top_keys(path) -> set:
    """The outer keys of a pickle read with weights_only (empty when it is not a readable dict)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not ours to judge: the generic loader names the file
        return set()
    return set(obj) if isinstance(obj, dict) else set()


def claims(item) -> str | None:
    """The role a file of ``from_pretrained`` is for this loader (``ipadapter`` / ``ipadapter_image_encoder``), or
    None (the other loaders take it). Reads a pickle with weights_only and a safetensors header only."""
    p = Path(item)
    if p.is_file() and p.name.endswith(BIN_SUFFIXES):
        return ipa.ADAPTER_ROLE if "ip_adapter" in _top_keys(p) else None
    if p.is_dir() or p.name.endswith(".safetensors"):
        try:
            keys = read_state_dict(resolve_group(p), device="meta").keys()
        except Exception:  # noqa: BLE001 - the generic loader names what is wrong with it
            return None
        return ipa.ENCODER_ROLE if siglip_model.is_full_siglip(keys) else None
    return None


def load_adapter(path, torch_dtype=torch.bfloat16, device="cpu") -> torch.nn.Module:
    """``ip-adapter.bin`` -> ``FluxIPAdapter`` (its keys mapped one to one, shapes checked)."""
    files = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    files = [f for f in files if f.name.endswith(BIN_SUFFIXES)] or files
    if len(files) != 1:
        raise ModelFileError(f"The IP-Adapter is one file (ip-adapter.bin); got {len(files)}: "
                             f"{', '.join(map(str, files))}.")
    path = files[0]
    device = torch.device(device)
    sd = ipa.read_bin(path)
    try:
        cfg = ipa.infer_config(sd)
        model = assemble(lambda: ipa.build(cfg), sd, torch_dtype, device)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}", path) from e
    return _tag(model, [path], ipa.ADAPTER_ROLE, "custom", ipa.describe(cfg))


def adapter_from_tensors(sd: dict, torch_dtype=torch.bfloat16, device="cpu") -> torch.nn.Module:
    """The same from tensors already read (flattened keys), e.g. a manifest's shapes on the meta device."""
    cfg = ipa.infer_config(sd)
    return assemble(lambda: ipa.build(cfg), sd, torch_dtype, torch.device(device))


def load_encoder(files, torch_dtype=torch.bfloat16, device="cpu") -> torch.nn.Module:
    """SigLIP's vision tower out of a whole SiglipModel file (or folder), ``config.json`` beside it when present."""
    items = [Path(p) for p in (files if isinstance(files, (list, tuple)) else [files])]
    items = [p for p in items if p.name != "config.json"] or items
    missing = [str(p) for p in items if not p.exists()]
    if missing:
        raise ModelFileError(f"The SigLIP image encoder of the IP-Adapter is missing: {', '.join(missing)} does not "
                             f"exist. To fix it, {SIGLIP_HINT}.", missing[0])
    group = resolve_group(items[0]) if len(items) == 1 else None
    if group is None:
        raise ModelFileError(f"The SigLIP image encoder is one model.safetensors (or its folder); got {len(items)} "
                             f"paths.")
    device = torch.device(device)
    sd = read_state_dict(group, device="meta" if device.type == "meta" else None)
    try:
        vision = ipa.siglip_vision(sd)
        cfg = siglip_model.infer_siglip_config(vision, group.config())
        if not cfg.get("vision_use_head"):
            raise ModelFileError("the SigLIP vision tower has no pooling head (vision_model.head.*), whose output "
                                 "the IP-Adapter reads.")
        model = assemble(lambda: siglip_model.build_siglip(cfg), siglip_model.convert_siglip(vision), torch_dtype,
                         device)
    except ModelFileError as e:
        raise ModelFileError(f"{group.label}: {e}", group.label) from e
    return _tag(model, group.files, ipa.ENCODER_ROLE, "transformers",
                "SigLIP's vision tower (the IP-Adapter's image encoder)")


def load_role(role: str, files, torch_dtype=torch.bfloat16, device="cpu") -> torch.nn.Module:
    if role == ipa.ADAPTER_ROLE:
        return load_adapter(files, torch_dtype, device)
    if role == ipa.ENCODER_ROLE:
        return load_encoder(files, torch_dtype, device)
    raise ValueError(f"{role!r} is not an IP-Adapter role.")


def load_components(items, torch_dtype=torch.bfloat16, device="cpu") -> dict:
    """{role: module} of files ``claims`` gave a role (one of each at most)."""
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    out = {}
    for item in items:
        role = claims(item)
        if role is None:
            raise ModelFileError(f"{item} is neither an IP-Adapter (ip-adapter.bin) nor a SigLIP model.", item)
        if role in out:
            raise ModelFileError(f"Two files both hold the {role}: pass only one.", item)
        out[role] = load_role(role, [item], torch_dtype, device)
    return out


__all__ = ["adapter_from_tensors", "claims", "load_adapter", "load_components", "load_encoder", "load_role"]
