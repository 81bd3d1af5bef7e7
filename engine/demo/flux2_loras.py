"""Random FLUX.2 LoRAs for the [klein] demo transformer (``engine.demo.flux2``), one file per published format.

``write_flux2_demo_loras(folder)`` writes ``<folder>/flux2-<format>.safetensors`` for each of ``FORMATS`` (BF16, as
the published files are) and returns {format: path}; ``flux2_lora_state_dict(fmt)`` gives one as (tensors, metadata).
The key patterns are those in ``engine.lora.flux2_names``:

- ``diffusers``: ``transformer.<diffusers module>.lora_A/lora_B.weight`` on every linear layer, rank 4 with
  ``lora_alpha`` 8 in diffusers' ``lora_adapter_metadata`` header entry (what ``save_lora_weights`` writes), so the
  scale is 2;
- ``diffsynth``: ``<diffusers module>.lora_A/lora_B.default.weight`` on DiffSynth-Studio's FLUX.2 training targets
  (to_q/k/v, to_out.0, add_*_proj, to_add_out, ff(_context).linear_in/out, to_qkv_mlp_proj, single attn.to_out), no
  alpha;
- ``kohya``: ``lora_unet_<BFL module, '.' -> '_'>.lora_down/lora_up.weight`` + ``.alpha`` (rank 4, alpha 2) on the
  blocks and img_in/txt_in; the first double block's image qkv is block-diagonal (three rank-2 LoRAs concatenated,
  as converters write a split qkv back);
- ``ai-toolkit``: ``diffusion_model.<BFL module>.lora_A/lora_B.weight`` on every BFL linear layer, the shared
  modulations and ``final_layer.adaLN_modulation.1`` included, no alpha.

Shapes come from the demo transformer's config (built on the meta device), so they follow it.
"""
from __future__ import annotations

import json
import pathlib

from .files import demo_stamp, write_safetensors_once

VERSION = 1
FORMATS = ("diffusers", "diffsynth", "kohya", "ai-toolkit")
RANK = 4
DIFFSYNTH_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                     "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out")
KOHYA_BFL = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mlp.0",
             "txt_mlp.2", "linear1", "linear2", "img_in", "txt_in")


def _linears() -> dict:
    """{diffusers module name: (in, out)} of the demo FLUX.2 transformer's linear layers."""
    import torch
    from diffusers import Flux2Transformer2DModel

    from .flux2 import transformer_config

    cfg = transformer_config()
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**{**cfg, "axes_dims_rope": tuple(cfg["axes_dims_rope"])})
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _bfl_linears(linears: dict) -> dict:
    """{BFL module name: (in, out)}: the tables of ``engine.lora.flux2_names`` read backwards (fused qkv summed)."""
    from engine.lora import flux2_names as names

    out = {}
    blocks = {"double_blocks": ("transformer_blocks", names.BFL_DOUBLE),
              "single_blocks": ("single_transformer_blocks", names.BFL_SINGLE)}
    for bfl, (diffusers, table) in blocks.items():
        count = len({n.split(".")[1] for n in linears if n.startswith(diffusers + ".")})
        for i in range(count):
            for name, (_kind, targets) in table.items():
                shapes = [linears[f"{diffusers}.{i}.{t}"] for t in targets]
                out[f"{bfl}.{i}.{name}"] = (shapes[0][0], sum(s[1] for s in shapes))
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


def flux2_lora_state_dict(fmt: str, seed: int = 0, rank: int = RANK) -> tuple[dict, dict]:
    """(tensors in BF16, header metadata) of the demo LoRA in format ``fmt`` (one of ``FORMATS``)."""
    import torch

    if fmt not in FORMATS:
        raise ValueError(f"unknown demo LoRA format {fmt!r}; one of {', '.join(FORMATS)}")
    gen = torch.Generator().manual_seed(1000 + seed * 10 + FORMATS.index(fmt))
    linears = _linears()
    sd = {}
    if fmt == "diffusers":
        for name, shape in linears.items():
            sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = _pair(gen, shape, rank)
    elif fmt == "diffsynth":
        for name, shape in linears.items():
            if name.split(".", 2)[-1] in DIFFSYNTH_TARGETS and name.split(".")[0].endswith("transformer_blocks"):
                a, b = _pair(gen, shape, rank)
                sd[f"{name}.lora_A.default.weight"], sd[f"{name}.lora_B.default.weight"] = a, b
    elif fmt == "kohya":
        for name, shape in _bfl_linears(linears).items():
            if name.rsplit(".", 1)[-1] not in KOHYA_BFL and name.split(".", 2)[-1] not in KOHYA_BFL:
                continue
            key = "lora_unet_" + name.replace(".", "_")
            if name == "double_blocks.0.img_attn.qkv":      # three rank-2 LoRAs concatenated: block-diagonal up
                parts = [_pair(gen, (shape[0], shape[1] // 3), 2) for _ in range(3)]
                down = torch.cat([p[0] for p in parts])
                up = torch.block_diag(*[p[1] for p in parts])
                sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
                sd[f"{key}.alpha"] = torch.tensor(3.0)
                continue
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = _pair(gen, shape, rank)
            sd[f"{key}.alpha"] = torch.tensor(rank / 2)
    else:   # ai-toolkit
        for name, shape in _bfl_linears(linears).items():
            a, b = _pair(gen, shape, rank)
            sd[f"diffusion_model.{name}.lora_A.weight"], sd[f"diffusion_model.{name}.lora_B.weight"] = a, b
    meta = _metadata(fmt, rank, sorted(linears))
    return {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, meta


def _metadata(fmt: str, rank: int = RANK, targets=None) -> dict:
    """The header entries a format's files carry: diffusers' adapter metadata (alpha), ai-toolkit's software."""
    if fmt == "diffusers":
        targets = sorted(_linears()) if targets is None else targets
        return {"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": 2 * rank,
                                                     "transformer.target_modules": targets})}
    if fmt == "ai-toolkit":
        return {"software": json.dumps({"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit"})}
    return {}


def write_flux2_demo_loras(folder, seed: int = 0) -> dict:
    """Write (once) the demo FLUX.2 LoRAs as ``<folder>/flux2-<format>.safetensors``; returns {format: path}."""
    out = {}
    for fmt in FORMATS:
        path = pathlib.Path(folder) / f"flux2-{fmt}.safetensors"
        stamp = {**demo_stamp(f"flux2-lora-{fmt}", VERSION, seed), **_metadata(fmt)}
        out[fmt] = write_safetensors_once(path, lambda fmt=fmt: flux2_lora_state_dict(fmt, seed)[0], stamp)
    return out
