"""The trained weights as files: a LoRA in this engine's / the seed's key style or in the community's, full weights.

LoRA key styles (all ``A`` = down [rank, in], ``B`` = up [out, rank], scale 1 since alpha = rank as in the seed):

- ``native`` (the seed without ``--align_to_opensource_format``): PEFT keys over the trained module names,
  ``transformer_blocks.0.attn.to_q.lora_A.weight`` (the seed's ``--remove_prefix_in_ckpt "pipe.dit."`` removed);
  this engine's ``pipe.load_lora`` reads it (diffusers/PEFT format).
- ``kohya`` (``--align_to_opensource_format``, as the seed): sd-scripts' names over BFL's modules,
  ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``lora_up`` + ``alpha``, read by ComfyUI,
  diffusers, Forge and kohya. diffusers' separate q/k/v (and single-block q/k/v/mlp) LoRAs are fused into BFL's
  ``qkv`` / ``linear1`` with the down matrices stacked and a block-diagonal up matrix (alpha = the fused rank, so the
  scale stays 1): the product is exactly the separate LoRAs', and readers that see the block-diagonal structure
  (this engine, diffusers) split it back into the same pairs. diffusers' kohya reader assumes FLUX.1's full width
  (3072) for ``linear1``, so a kohya file for a narrower test model loads there only without its ``linear1`` keys.
- ``diffusers`` (``--opensource_format diffusers``): diffusers' own ``transformer.``-prefixed PEFT keys, what its
  ``save_lora_weights`` writes; read by diffusers at any width and by ComfyUI.

Every file's safetensors header carries the run's facts (base model files, rank, alpha, steps, epochs, dataset
size, targets, learning rate, seed) as ``flux_studio_training`` JSON, plus kohya's ``ss_*`` fields.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Optional

import torch
from safetensors.torch import save_file

from ..lora.formats import BFL_DOUBLE, BFL_SINGLE, BFL_TOP

FORMATS = ("native", "kohya", "diffusers")


def peft_pairs(dit, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (A, B, scale)} of the PEFT LoRA layers injected into ``dit``."""
    from peft.tuners.lora import LoraLayer
    out = {}
    for name, module in dit.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            A = module.lora_A[adapter].weight.detach()
            B = module.lora_B[adapter].weight.detach()
            out[name] = (A, B, float(module.scaling[adapter]))
    return out


def atomic_save(tensors: dict, path: pathlib.Path, metadata: dict) -> pathlib.Path:
    # Written beside the target under a temporary name, then renamed: a crash never leaves a half file there.
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def header(info: dict, rank: Optional[int], fmt: str) -> dict:
    meta = {"format": "pt", "flux_studio_lora_format": fmt,
            "flux_studio_training": json.dumps(info, ensure_ascii=False, default=str)}
    if rank:
        meta.update(ss_network_module="networks.lora_flux", ss_network_dim=str(rank), ss_network_alpha=str(rank),
                    ss_base_model_version="flux1", ss_steps=str(info.get("steps", "")),
                    ss_num_train_images=str(info.get("dataset_size", "")))
    return meta


def native_state_dict(pairs: dict, dtype: torch.dtype, prefix: str = "") -> dict:
    out = {}
    for path, (A, B, scale) in pairs.items():
        out[f"{prefix}{path}.lora_A.weight"] = A.to(dtype)
        out[f"{prefix}{path}.lora_B.weight"] = (B * scale).to(dtype)
    return out


def _fuse_parts(parts: list, pairs: dict, out_sizes: list) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    have = [p for p in parts if p in pairs]
    if not have:
        return None
    A0 = pairs[have[0]][0]
    rank, in_features = A0.shape
    downs, ups = [], []
    for p, rows in zip(parts, out_sizes):
        if p in pairs:
            A, B, scale = pairs[p]
            if A.shape[0] != rank:
                raise ValueError(f"{p}: rank {A.shape[0]} differs from {have[0]}'s {rank}; cannot fuse")
            downs.append(A.float())
            ups.append((B * scale).float())
        else:
            downs.append(torch.zeros(rank, in_features))
            ups.append(torch.zeros(rows, rank))
    return torch.cat(downs, 0), torch.block_diag(*ups)


def kohya_state_dict(pairs: dict, dit, dtype: torch.dtype) -> dict:
    """sd-scripts' FLUX keys (``lora_unet_`` + BFL module path with '_') from diffusers-named pairs."""
    layers = dict(dit.named_modules())
    out, used = {}, set()

    def rows(path):
        m = layers.get(path)
        return getattr(m, "out_features", None) or getattr(getattr(m, "base_layer", None), "out_features")

    def emit(key, kind, targets):
        if not any(t in pairs for t in targets):
            return
        if kind == "plain":
            A, B, scale = pairs[targets[0]]
            A, B = A.float(), (B * scale).float()
        elif kind == "swap":   # diffusers orders the final modulation (scale, shift), BFL (shift, scale)
            A, B, scale = pairs[targets[0]]
            B = (B * scale).float()
            h = B.shape[0] // 2
            A, B = A.float(), torch.cat([B[h:], B[:h]], 0)
        else:
            A, B = _fuse_parts(list(targets), pairs, [rows(t) for t in targets])
        used.update(t for t in targets if t in pairs)
        name = "lora_unet_" + key.replace(".", "_")
        out[f"{name}.lora_down.weight"] = A.to(dtype)
        out[f"{name}.lora_up.weight"] = B.to(dtype)
        out[f"{name}.alpha"] = torch.tensor(float(A.shape[0]), dtype=dtype)

    for i in range(len(dit.transformer_blocks)):
        for key, (kind, ts) in BFL_DOUBLE.items():
            emit(f"double_blocks.{i}.{key}", kind, tuple(f"transformer_blocks.{i}.{t}" for t in ts))
    for i in range(len(dit.single_transformer_blocks)):
        for key, (kind, ts) in BFL_SINGLE.items():
            emit(f"single_blocks.{i}.{key}", kind, tuple(f"single_transformer_blocks.{i}.{t}" for t in ts))
    for key, (kind, ts) in BFL_TOP.items():
        emit(key, kind, ts)
    left = sorted(set(pairs) - used)
    if left:
        raise ValueError(f"These trained layers have no kohya (BFL) name: {', '.join(left[:5])}; save without "
                         f"--align_to_opensource_format or with --opensource_format diffusers.")
    return out


def save_lora(dit, path, fmt: str = "native", dtype: torch.dtype = torch.bfloat16, info: Optional[dict] = None,
              prefix: str = "") -> pathlib.Path:
    """Write the PEFT LoRA injected into ``dit`` to ``path`` in ``fmt`` (see the module docstring)."""
    pairs = peft_pairs(dit)
    if not pairs:
        raise ValueError("The transformer carries no trained LoRA layers.")
    if fmt == "native":
        tensors = native_state_dict(pairs, dtype, prefix)
    elif fmt == "diffusers":
        tensors = native_state_dict(pairs, dtype, "transformer.")
    elif fmt == "kohya":
        tensors = kohya_state_dict(pairs, dit, dtype)
    else:
        raise ValueError(f"unknown LoRA format {fmt!r}; one of {FORMATS}")
    rank = next(iter(pairs.values()))[0].shape[0]
    return atomic_save(tensors, path, header(dict(info or {}, rank=rank, alpha=rank, lora_format=fmt), rank, fmt))


def save_full(module, path, names, dtype: Optional[torch.dtype] = None, info: Optional[dict] = None,
              prefix: str = "") -> pathlib.Path:
    """Write the parameters ``names`` of ``module`` (its own key names, ``prefix`` prepended)."""
    params = dict(module.named_parameters())
    tensors = {f"{prefix}{n}": (params[n].detach().to(dtype) if dtype else params[n].detach()) for n in names}
    return atomic_save(tensors, path, header(dict(info or {}), None, "full"))
