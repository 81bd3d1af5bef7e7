"""The FLUX transformer: architecture from tensor shapes, and the BFL -> diffusers key mapping.

Every width is read from the tensors, never assumed, so a narrow random checkpoint in the official layout goes
through the same code as the 12B one (diffusers' own converter hard-codes inner_dim=3072 when it splits the fused
single-block projection, and so cannot convert a narrower model).

Shapes -> ``FluxTransformer2DModel`` kwargs:

- hidden = rows of ``img_in`` (``x_embedder``); in_channels = its columns (64 dev, 384 Fill, 196 Flex.2)
- attention_head_dim = length of the q-norm scale (128 in every FLUX.1); heads = hidden / head_dim
- num_layers / num_single_layers = count of double / single blocks (indices must run 0..n-1)
- joint_attention_dim = columns of ``txt_in``; pooled_projection_dim = columns of ``vector_in.in_layer``
- guidance_embeds = presence of ``guidance_in`` (absent in schnell and Step1X)
- out_channels = rows of ``final_layer.linear`` (None when equal to in_channels, as in the official configs)
- axes_dims_rope: (16, 56, 56) for head_dim 128. For another head_dim the same proportions are kept:
  (head_dim/8, 7*head_dim/16, 7*head_dim/16), which sums to head_dim; each part must be even (the rotary
  embedding rotates pairs), so head_dim must be a multiple of 32.

The diffusers class fixes what FLUX.1 fixes: MLP ratio 4, timestep/guidance sinusoid width 256, patch size 1 (the
2x2 patchify happens outside); a checkpoint that differs is rejected with the offending tensor named.
"""
from __future__ import annotations

import re

import torch

from .detect import DIT_PREFIXES, strip_common_prefix
from .errors import ModelFileError, few

_DOUBLE = {  # BFL name inside double_blocks.{i}. -> diffusers name inside transformer_blocks.{i}.
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # linear1 = q | k | v | mlp
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # (shift, scale) in BFL, (scale, shift) here


def block_indices(keys, prefix: str) -> list[int]:
    """Sorted indices i of keys '<prefix><i>.…', checked to run 0..n-1."""
    found = sorted({int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})
    if found and found != list(range(len(found))):
        missing = sorted(set(range(found[-1] + 1)) - set(found))
        raise ModelFileError(f"the checkpoint has {prefix}* blocks up to {found[-1]} but lacks {few(missing)}: "
                             f"the file is incomplete.")
    return found


def _strip_bfl(sd: dict) -> dict:
    p = strip_common_prefix(sd.keys(), DIT_PREFIXES)
    return {k[len(p):]: v for k, v in sd.items()} if p else sd


def _get(sd, key):
    try:
        return sd[key]
    except KeyError:
        raise ModelFileError(f"the transformer checkpoint lacks {key!r}: the file is incomplete or not a FLUX.1 "
                             f"transformer.") from None


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's rotary split of a head: (16, 56, 56) at 128, the same proportions (1/8, 7/16, 7/16) otherwise."""
    if head_dim == 128:
        return (16, 56, 56)
    axes = (head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16)
    if head_dim % 32 or sum(axes) != head_dim or any(a % 2 for a in axes):
        raise ModelFileError(f"attention head width {head_dim} cannot be split into FLUX's rotary axes "
                             f"(head_dim/8, 7*head_dim/16, 7*head_dim/16, each even): it must be a multiple of 32.")
    return axes


def infer_transformer_config(sd) -> dict:
    """``FluxTransformer2DModel(**cfg)`` kwargs from a BFL or diffusers state dict's shapes."""
    keys = list(sd.keys())
    if any(k.endswith("img_in.weight") for k in keys):
        sd = _strip_bfl({k: sd[k] for k in keys if not k.startswith("connector.")})
        return _infer_bfl(sd)
    if "x_embedder.weight" in sd:
        return _infer_diffusers(sd)
    raise ModelFileError("the checkpoint has neither img_in.weight (BFL layout) nor x_embedder.weight (diffusers "
                         "layout): it is not a FLUX.1 transformer.")


def _config(*, hidden, in_ch, out_ch, head_dim, n_double, n_single, txt, vec, guidance):
    if hidden % head_dim:
        raise ModelFileError(f"transformer width {hidden} is not a multiple of the head width {head_dim}.")
    return {
        "patch_size": 1,
        "in_channels": in_ch,
        "out_channels": None if out_ch == in_ch else out_ch,
        "num_layers": n_double,
        "num_single_layers": n_single,
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": txt,
        "pooled_projection_dim": vec,
        "guidance_embeds": guidance,
        "axes_dims_rope": rope_axes(head_dim),
    }


def _check(cond, key, shape, want):
    if not cond:
        raise ModelFileError(f"{key} has shape {list(shape)}, but the diffusers FLUX transformer needs {want}: "
                             f"this checkpoint's architecture differs from FLUX.1.")


def _infer_bfl(sd) -> dict:
    hidden, in_ch = _get(sd, "img_in.weight").shape
    doubles, singles = block_indices(sd, "double_blocks."), block_indices(sd, "single_blocks.")
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if doubles else "single_blocks.0.norm.query_norm.scale"
    head_dim = _get(sd, norm).shape[0]
    for key, dim, want in (("time_in.in_layer.weight", None, (hidden, 256)), ("txt_in.weight", 0, hidden),
                           ("vector_in.in_layer.weight", 0, hidden), ("final_layer.linear.weight", 1, hidden)):
        shape = tuple(_get(sd, key).shape)
        ok = shape == want if dim is None else (len(shape) == 2 and shape[dim] == want)
        _check(ok, key, shape, list(want) if dim is None else f"{want} {'rows' if dim == 0 else 'columns'}")
    if doubles:
        k = "double_blocks.0.img_mlp.0.weight"
        _check(tuple(_get(sd, k).shape) == (4 * hidden, hidden), k, _get(sd, k).shape, [4 * hidden, hidden])
    if singles:
        k = "single_blocks.0.linear1.weight"
        _check(tuple(_get(sd, k).shape) == (7 * hidden, hidden), k, _get(sd, k).shape, [7 * hidden, hidden])
    return _config(hidden=hidden, in_ch=in_ch, out_ch=sd["final_layer.linear.weight"].shape[0], head_dim=head_dim,
                   n_double=len(doubles), n_single=len(singles), txt=sd["txt_in.weight"].shape[1],
                   vec=sd["vector_in.in_layer.weight"].shape[1], guidance="guidance_in.in_layer.weight" in sd)


def _infer_diffusers(sd) -> dict:
    hidden, in_ch = _get(sd, "x_embedder.weight").shape
    doubles, singles = block_indices(sd, "transformer_blocks."), block_indices(sd, "single_transformer_blocks.")
    norm = "transformer_blocks.0.attn.norm_q.weight" if doubles else "single_transformer_blocks.0.attn.norm_q.weight"
    return _config(hidden=hidden, in_ch=in_ch, out_ch=_get(sd, "proj_out.weight").shape[0],
                   head_dim=_get(sd, norm).shape[0], n_double=len(doubles), n_single=len(singles),
                   txt=_get(sd, "context_embedder.weight").shape[1],
                   vec=_get(sd, "time_text_embed.text_embedder.linear_1.weight").shape[1],
                   guidance="time_text_embed.guidance_embedder.linear_1.weight" in sd)


def convert_bfl_transformer(sd) -> dict:
    """BFL keys (``double_blocks.*`` …, optionally prefixed ``model.diffusion_model.``) -> diffusers
    ``FluxTransformer2DModel`` keys. Only chunk/split/cat/indexing, so it works on meta tensors and returns views of
    memory-mapped tensors; the input dict is not modified. A key it does not know is an error."""
    sd = _strip_bfl(sd)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key):
        used.add(key)
        return _get(sd, key)

    for old, new in _TOP.items():
        if old.startswith("guidance_in") and f"{old}.weight" not in sd:
            continue
        out[f"{new}.weight"], out[f"{new}.bias"] = take(f"{old}.weight"), take(f"{old}.bias")
    old, new = _FINAL_MOD
    for s in ("weight", "bias"):
        shift, scale = take(f"{old}.{s}").chunk(2, dim=0)
        out[f"{new}.{s}"] = torch.cat([scale, shift], dim=0)

    for i in block_indices(sd, "double_blocks."):
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for old, new in _DOUBLE.items():
            out[f"{dst}{new}.weight"], out[f"{dst}{new}.bias"] = take(f"{src}{old}.weight"), take(f"{src}{old}.bias")
        for old, new in _DOUBLE_NORMS.items():
            out[dst + new] = take(src + old)
        for old, news in _DOUBLE_QKV.items():
            for s in ("weight", "bias"):
                t = take(f"{src}{old}.{s}")
                if t.shape[0] % 3:
                    raise ModelFileError(f"{src}{old}.{s} has {t.shape[0]} rows, not a multiple of 3 (q|k|v).")
                for new, part in zip(news, t.chunk(3, dim=0)):
                    out[f"{dst}{new}.{s}"] = part

    for i in block_indices(sd, "single_blocks."):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for old, new in _SINGLE.items():
            out[f"{dst}{new}.weight"], out[f"{dst}{new}.bias"] = take(f"{src}{old}.weight"), take(f"{src}{old}.bias")
        for old, new in _SINGLE_NORMS.items():
            out[dst + new] = take(src + old)
        hidden = sd[f"{src}linear2.weight"].shape[0]  # the block's width, from its own output projection
        for s in ("weight", "bias"):
            t = take(f"{src}linear1.{s}")
            mlp = t.shape[0] - 3 * hidden
            if mlp <= 0:
                raise ModelFileError(f"{src}linear1.{s} has {t.shape[0]} rows, too few for q|k|v|mlp at width "
                                     f"{hidden}.")
            for new, part in zip(_SINGLE_FUSED, t.split([hidden, hidden, hidden, mlp], dim=0)):
                out[f"{dst}{new}.{s}"] = part

    extra = set(sd) - used
    if extra:
        raise ModelFileError(f"the transformer checkpoint has tensors a FLUX.1 transformer does not: {few(extra)}.")
    return out


def build_transformer(cfg: dict):
    """``FluxTransformer2DModel(**cfg)``; call under ``torch.device('meta')`` (or empty-weights) to allocate nothing."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**cfg)
