"""Random FLUX 3 LoRAs for the FLUX 3 Image Klein demo transformer (``engine.demo.flux3``), one file per format.

``write_flux3_demo_loras(folder)`` writes ``<folder>/flux3-<format>.safetensors`` for each of ``FORMATS`` (BF16, as
the published files are) and returns {format: path}; ``flux3_lora_state_dict(fmt)`` gives one as (tensors, metadata).
The key patterns are those in ``engine.lora.flux3_names``:

- ``diffusers``: ``transformer.<diffusers module>.lora_A/lora_B.weight`` on every linear layer of the step-distilled
  demo (the three streams, the joint blocks, the embedders, the per-mode modulations, ``norm_out``, ``proj_out``),
  rank 4 with ``lora_alpha`` 8 in diffusers' ``lora_adapter_metadata`` header entry (what ``save_lora_weights``
  writes), so the scale is 2;
- ``bfl``: ``diffusion_model.<BFL module>.lora_A/lora_B.weight`` on every BFL linear layer,
  ``final_layer.image.adaLN_modulation.1`` and the ``*_stream_modulations.<mode>.lin`` included, no alpha;
- ``kohya``: ``lora_unet_<BFL module, '.' -> '_'>.lora_down/lora_up.weight`` + ``.alpha`` (rank 4, alpha 2) on the
  blocks and ``emb_in.image`` / ``txt_in``;
- ``diffsynth``: ``<BFL module>.lora_A/lora_B.default.weight`` on the blocks' linears (q/k/v_proj, attn_out,
  mlp_in/out of every stream and joint block), no alpha.

Shapes come from the demo transformer's config (built on the meta device), so they follow it.
"""
from __future__ import annotations

import functools
import json
import pathlib

from .files import demo_stamp, write_safetensors_once

VERSION = 1
FORMATS = ("diffusers", "bfl", "kohya", "diffsynth")
RANK = 4
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "attn_out", "mlp_in", "mlp_out")   # BFL's, in every block
KOHYA_TOP = ("emb_in.image", "txt_in")


def _linears() -> dict:
    """{diffusers module name: (in, out)} of the demo FLUX 3 transformer's linear layers (step-distilled)."""
    return dict(_linear_shapes())


@functools.lru_cache(maxsize=1)
def _linear_shapes() -> tuple:
    import torch
    from diffusers import Flux3Transformer2DModel

    from .flux3 import transformer_config

    cfg = transformer_config(flow_map=True)
    with torch.device("meta"):
        model = Flux3Transformer2DModel(**{**cfg, "axes_dims_rope": tuple(cfg["axes_dims_rope"])})
    return tuple((n, (m.in_features, m.out_features)) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear))


def _bfl_linears(linears: dict) -> dict:
    """{BFL module name: (in, out)}: the tables of ``engine.lora.flux3_names`` read backwards."""
    from engine.lora import flux3_names as names

    out = {}
    blocks = {**{bfl: (diffusers, names.BFL_BLOCK) for bfl, diffusers in names.BFL_STREAMS.items()},
              "single_blocks": ("single_transformer_blocks", names.BFL_BLOCK)}
    for bfl, (diffusers, table) in blocks.items():
        count = len({n[len(diffusers) + 1:].split(".")[0] for n in linears if n.startswith(diffusers + ".")})
        for i in range(count):
            for name, (_kind, targets) in table.items():
                out[f"{bfl}.{i}.{name}"] = linears[f"{diffusers}.{i}.{targets[0]}"]
    for name, (_kind, targets) in names.BFL_TOP.items():
        if targets[0] in linears:
            out[name] = linears[targets[0]]
    return out


def _pair(gen, shape, rank):
    import torch
    fan_in, fan_out = shape
    down = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5
    up = torch.randn(fan_out, rank, generator=gen) * (0.5 / rank ** 0.5)
    return down, up


def _is_block(name: str) -> bool:
    return name.split(".")[-1] in BLOCK_LINEARS


def flux3_lora_state_dict(fmt: str, seed: int = 0, rank: int = RANK) -> tuple[dict, dict]:
    """(tensors in BF16, header metadata) of the demo LoRA in format ``fmt`` (one of ``FORMATS``)."""
    import torch

    if fmt not in FORMATS:
        raise ValueError(f"unknown demo LoRA format {fmt!r}; one of {', '.join(FORMATS)}")
    gen = torch.Generator().manual_seed(3000 + seed * 10 + FORMATS.index(fmt))
    linears = _linears()
    sd = {}
    if fmt == "diffusers":
        for name, shape in linears.items():
            sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = _pair(gen, shape, rank)
    elif fmt == "bfl":
        for name, shape in _bfl_linears(linears).items():
            a, b = _pair(gen, shape, rank)
            sd[f"diffusion_model.{name}.lora_A.weight"], sd[f"diffusion_model.{name}.lora_B.weight"] = a, b
    elif fmt == "kohya":
        for name, shape in _bfl_linears(linears).items():
            if not _is_block(name) and name not in KOHYA_TOP:
                continue
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = _pair(gen, shape, rank)
            sd[f"{key}.alpha"] = torch.tensor(rank / 2)
    else:   # diffsynth
        for name, shape in _bfl_linears(linears).items():
            if _is_block(name):
                sd[f"{name}.lora_A.default.weight"], sd[f"{name}.lora_B.default.weight"] = _pair(gen, shape, rank)
    meta = _metadata(fmt, rank, sorted(linears))
    return {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, meta


def _metadata(fmt: str, rank: int = RANK, targets=None) -> dict:
    """The header entries a format's files carry: diffusers' adapter metadata (its alpha)."""
    if fmt == "diffusers":
        targets = sorted(_linears()) if targets is None else targets
        return {"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": 2 * rank,
                                                     "transformer.target_modules": targets})}
    return {}


def write_flux3_demo_loras(folder, seed: int = 0) -> dict:
    """Write (once) the demo FLUX 3 LoRAs as ``<folder>/flux3-<format>.safetensors``; returns {format: path}."""
    out = {}
    for fmt in FORMATS:
        path = pathlib.Path(folder) / f"flux3-{fmt}.safetensors"
        stamp = {**demo_stamp(f"flux3-lora-{fmt}", VERSION, seed), **_metadata(fmt)}
        out[fmt] = write_safetensors_once(path, lambda fmt=fmt: flux3_lora_state_dict(fmt, seed)[0], stamp)
    return out
