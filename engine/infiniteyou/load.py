"""InfiniteYou's files among the ones ``from_pretrained`` is given: told apart by their contents, loaded to their
two roles (``infinityou_image_projector``, ``infinityou_infusenet``).

``split_files(files) -> (claimed, rest)``: the projector is the ``.bin`` whose tensors (read with
``torch.load(weights_only=True)``) are a Perceiver projector (``model.is_id_projector``); InfuseNet is the FLUX
ControlNet of InfuseNet's shape (``model.is_infusenet``), its shards grouped. ``load_claimed`` loads them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..loading.files import add_group, read_state_dict, resolve_group
from .model import (INFUSENET_ROLE, PROJECTOR_ROLE, is_id_projector, is_infusenet, load_infusenet, load_projector,
                    read_bin, unwrap)

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def split_files(files) -> tuple:
    """({role: [file or FileGroup]}, the other files in their order)."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    projectors, infusenets, rest = [], [], []
    for item in files:
        p = Path(item)
        if p.is_file() and p.suffix == ".bin":
            try:
                if is_id_projector(unwrap(read_bin(p)).keys()):
                    projectors.append(p)
                    continue
            except Exception:  # noqa: BLE001 - not ours: the other loaders name what it is
                pass
        elif p.is_dir() or p.name.endswith(WEIGHT_SUFFIXES):
            try:
                g = resolve_group(item)
                if is_infusenet(read_state_dict(g, device="meta")):
                    add_group(infusenets, g)
                    continue
            except Exception:  # noqa: BLE001 - the other loaders report a bad file
                pass
        rest.append(item)
    own = {g.folder.resolve() for g in infusenets}
    rest = [i for i in rest if not (Path(i).suffix == ".json" and Path(i).resolve().parent in own)]
    claimed = {}
    if projectors:
        claimed[PROJECTOR_ROLE] = projectors
    if infusenets:
        claimed[INFUSENET_ROLE] = infusenets
    return claimed, rest


def load_claimed(claimed: dict, torch_dtype=torch.bfloat16, device="cpu") -> dict:
    from ..loading.errors import ModelFileError
    out = {}
    for role, items in claimed.items():
        if len(items) > 1:
            raise ModelFileError(f"Two InfiniteYou {'projectors' if role == PROJECTOR_ROLE else 'InfuseNets'} were "
                                 f"given ({', '.join(str(getattr(i, 'label', i)) for i in items)}): pass only one.")
        load = load_projector if role == PROJECTOR_ROLE else load_infusenet
        out[role] = load(items[0], torch_dtype, device)
    return out


def load_role(role: str, files, torch_dtype=torch.bfloat16, device="cpu") -> torch.nn.Module:
    """One InfiniteYou role from its files (the studio loads role by role)."""
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if role == PROJECTOR_ROLE:
        return load_projector(files[0], torch_dtype, device)
    if role == INFUSENET_ROLE:
        return load_infusenet([f for f in files if Path(f).name != "config.json"], torch_dtype, device)
    raise ValueError(f"{role!r} is not an InfiniteYou role.")
