"""Which model family a LoRA file was made for -- FLUX.1, FLUX.2 or FLUX 3 -- from its key names and shapes; no torch.

The LoRA library lists every file with its family (read from the safetensors header only, cached by size and
mtime), the studio's pickers offer a model only its family's LoRAs, and attaching a LoRA of the other family is
refused with a message naming both (``mismatch_message``).

Evidence, per LoRA pair (module names compared with '.' and '_' alike, so kohya's ``lora_unet_`` names count too):

- names only FLUX 3 has (checked first: some contain FLUX.2's): its per-mode streams (``mode_blocks``,
  ``content_mode_blocks``, ``txt_mode_blocks``), ``early_stream_modulations`` / ``single_stream_modulations``,
  ``x_embedders`` / ``emb_in.image``, ``final_layer.image``, ``ref_time_in`` / ``target_timestep_embedder``, a
  top-level ``timestep_embedder``, and joint blocks with BFL's ``q_proj`` ... ``mlp_out`` or diffusers'
  ``attn.to_out.0`` / ``ff.linear_in|out``; their ``attn.to_q|k|v`` are named as FLUX.1's single blocks' are, and
  count for FLUX.1 only in a file with no FLUX 3 name;
- names only FLUX.2 has: ``double_stream_modulation_*`` / ``single_stream_modulation``, ``ff.linear_in`` /
  ``linear_out``, the single block's ``attn.to_qkv_mlp_proj`` and ``attn.to_out``, ``time_guidance_embed``;
- names only FLUX.1 has: per-block modulation (``img_mod.lin``, ``txt_mod.lin``, single ``modulation.lin``,
  ``norm1.linear``, ``norm.linear``), ``vector_in`` / ``time_text_embed``, ``ff.net.*``, the single block's
  ``proj_mlp`` / ``attn.to_q`` / ``proj_out``, DiffSynth's FluxDiT names (``a_to_qkv``, ``to_qkv_mlp``), XLabs'
  processors;
- BFL names both have (``img_mlp.0``, ``linear1``, ...) by their widths: the MLP is 4x wide with GELU in FLUX.1 and
  3x with SwiGLU (in 6x) in FLUX.2, so ``img_mlp.0`` maps h -> 4h / 6h, ``img_mlp.2`` 4h / 3h -> h, ``linear1``
  h -> 7h / 9h, ``linear2`` 5h / 4h -> h.

A LoRA on only the double blocks' attention (both families name it alike, and FLUX.1 and [klein] 4B are both 3072
wide) has no family: it is offered to both, and attaching decides by the layers' shapes.
"""
from __future__ import annotations

import json
import os
import re
import struct

FLUX1, FLUX2, FLUX3 = "FLUX.1", "FLUX.2", "FLUX 3"
FAMILIES = (FLUX1, FLUX2, FLUX3)

_DOWN = (".lora_A.default.weight", ".lora_A.weight", ".lora_down.weight", ".down.weight")
_UP = (".lora_B.default.weight", ".lora_B.weight", ".lora_up.weight", ".up.weight")

_FLUX3_NAMES = re.compile(r"(mode_blocks_|(early|single)_stream_modulations_|x_embedders_|emb_in_image"
                          r"|final_layer_image_|ref_time_in_|target_timestep_embedder_"
                          r"|(?<!embed_)timestep_embedder_linear_[12]$"
                          r"|single_blocks_\d+_(q_proj|k_proj|v_proj|attn_out|mlp_in|mlp_out)$"
                          r"|single_transformer_blocks_\d+_(attn_to_out_0|ff_linear_(in|out))$)")
_FLUX1_OR_3 = re.compile(r"single_transformer_blocks_\d+_attn_to_[qkv]$")      # single-block attention: both name it
_FLUX2_NAMES = re.compile(r"(double_stream_modulation|single_stream_modulation|ff(_context)?_linear_(in|out)"
                          r"|to_qkv_mlp_proj|time_guidance_embed|single_transformer_blocks_\d+_attn_to_out)")
_FLUX1_NAMES = re.compile(r"((img|txt)_mod_lin|single_blocks_\d+_modulation_lin|vector_in|time_text_embed"
                          r"|ff(_context)?_net_|norm1(_context)?_linear|single_transformer_blocks_\d+_(norm_linear"
                          r"|proj_mlp|proj_out|attn_to_[qkv]$)|a_to_qkv|b_to_qkv|to_qkv_mlp$|norm1_[ab]_linear"
                          r"|processor_(qkv|proj)_lora)")
# BFL names both families use, told apart by (output width / input width): {name pattern: {ratio: family}}
_RATIOS = (
    (re.compile(r"(img|txt)_mlp_0$"), {4.0: FLUX1, 6.0: FLUX2}),
    (re.compile(r"(img|txt)_mlp_2$"), {0.25: FLUX1, 1 / 3: FLUX2}),
    (re.compile(r"single_blocks_\d+_linear1$"), {7.0: FLUX1, 9.0: FLUX2}),
    (re.compile(r"single_blocks_\d+_linear2$"), {0.2: FLUX1, 0.25: FLUX2}),
)


def _pairs(shapes: dict) -> dict:
    """{module (underscored, prefixes kept): (down shape, up shape)} of the LoRA pairs among ``shapes``."""
    down, up = {}, {}
    for key, shape in shapes.items():
        for suffix in _DOWN:
            if key.endswith(suffix):
                down[key[: -len(suffix)]] = shape
                break
        else:
            for suffix in _UP:
                if key.endswith(suffix):
                    up[key[: -len(suffix)]] = shape
                    break
    return {m.replace(".", "_"): (down[m], up[m]) for m in down if m in up}


def votes(shapes: dict) -> dict:
    """{family: pairs that say so} for a {key: shape} mapping (a state dict's or a header's shapes)."""
    out, either_1_3 = {FLUX1: 0, FLUX2: 0, FLUX3: 0}, 0
    for module, (d, u) in _pairs(shapes).items():
        if _FLUX3_NAMES.search(module):
            out[FLUX3] += 1
            continue
        if _FLUX1_OR_3.search(module):
            either_1_3 += 1
            continue
        if _FLUX2_NAMES.search(module):
            out[FLUX2] += 1
            continue
        if _FLUX1_NAMES.search(module):
            out[FLUX1] += 1
            continue
        if len(d) < 2 or len(u) < 1 or not d[-1]:
            continue
        ratio = u[0] / d[-1]
        for pattern, table in _RATIOS:
            if pattern.search(module):
                for value, family in table.items():
                    if abs(ratio - value) < 1e-6:
                        out[family] += 1
                break
    if not out[FLUX3]:
        out[FLUX1] += either_1_3
    return out


def family_of_shapes(shapes: dict) -> str | None:
    """"FLUX.1", "FLUX.2", "FLUX 3", or None when the names and widths say none (or two equally)."""
    v = votes(shapes)
    best = max(v.values())
    leaders = [f for f, n in v.items() if n == best]
    return leaders[0] if best and len(leaders) == 1 else None


def header_shapes(path) -> dict:
    """{key: shape} from a .safetensors header (no tensor is read); {} when the file is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return {}
            (n,) = struct.unpack("<Q", head)
            if n <= 1 or n > 100 * 2 ** 20:
                return {}
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(header, dict):
        return {}
    return {k: tuple(v.get("shape") or ()) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)}


_CACHE: dict = {}


def file_family(path) -> str | None:
    """The family of a LoRA file (header only; cached while the file's size and mtime stay the same)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[key] = family_of_shapes(header_shapes(path))
    return _CACHE[key]


def model_family(dit) -> str:
    """The family of a transformer: diffusers' ``Flux3Transformer2DModel`` (its per-mode blocks) is FLUX 3,
    ``Flux2Transformer2DModel`` (its shared stream modulations) FLUX.2, anything else FLUX.1."""
    if type(dit).__name__.startswith("Flux3") or hasattr(dit, "mode_blocks"):
        return FLUX3
    if type(dit).__name__.startswith("Flux2") or hasattr(dit, "single_stream_modulation"):
        return FLUX2
    return FLUX1


def mismatch_message(label, lora_family: str, model_family_: str, model_label: str | None = None) -> str:
    """The refusal for a LoRA of the other family, naming both and the two ways out."""
    model = model_label or f"the loaded {model_family_} model"
    return (f"{label} is a {lora_family} LoRA, and {model} is {model_family_}: a {lora_family} LoRA does not fit a "
            f"{model_family_} transformer (its layers are named and sized differently). Use a {model_family_} LoRA, "
            f"or choose a {lora_family} model.")
