"""Reading the official FLUX.2 files exactly: the transformer, the 32-channel VAE and the text encoders.

Every architecture comes from tensor shapes (a ``config.json`` beside the weights only supplies what shapes cannot
say: rope theta and axes, norm epsilons, the text model's rope theta), so a tiny random checkpoint in an official
layout loads through exactly the code the real files do. Files are read with ``engine.loading.files`` (headers
checked, memory-mapped, shard sets and indexes) and modules assembled with ``engine.loading.load.assemble`` (built on
the meta device, every tensor matched one to one and shape-exact, then assigned).

Components and their layouts (``detect_flux2``):

- ``dit``: diffusers ``transformer/`` (``Flux2Transformer2DModel`` keys) or BFL's single file (``double_blocks``,
  ``single_blocks``, ``*_modulation.lin``; fused qkv split here, the final adaLN halves swapped to diffusers'
  (scale, shift) order). klein has no guidance embedder; [dev] has one.
- ``vae``: diffusers ``vae/`` onto ``AutoencoderKLFlux2`` (32 latent channels, quant convs, ``bn`` statistics of
  the 2x2-patchified latent).
- ``text_encoder``: Qwen3 (klein 4B: Qwen3-4B, tied; klein 9B: Qwen3-8B with an ``lm_head`` that text encoding
  never uses) onto transformers' ``Qwen3Model``; Mistral-Small-3.x (FLUX.2 [dev], the pre-4.52 ``Mistral3`` layout)
  onto ``MistralModel`` -- its vision tower, projector and ``lm_head`` ship in the file but encoding a prompt reads
  none of them. Only the decoder layers up to the deepest hidden state the DiT reads are kept (klein reads 9/18/27
  of 36, [dev] 10/20/30 of 40), see ``trim_text_encoder``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..loading.errors import ModelFileError, few
from ..loading.files import FileGroup, add_group, read_state_dict, resolve_group
from ..loading import quantized
from ..loading.load import assemble

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
QWEN3_LAYERS = (9, 18, 27)          # klein: hidden_states indices (0 = embeddings)
MISTRAL_LAYERS = (10, 20, 30)       # [dev]
ROLE_NAMES = {"dit": "the FLUX.2 transformer (transformer/ or a BFL flux-2 .safetensors)",
              "vae": "the FLUX.2 VAE (vae/diffusion_pytorch_model.safetensors)",
              "text_encoder": "the FLUX.2 text encoder (text_encoder/: Qwen3 for klein, Mistral Small for [dev])"}


# ---------------------------------------------------------------------------------------------------- detection

def _strip(keys, prefixes):
    keys = list(keys)
    for p in prefixes:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


def detect_flux2(keys) -> tuple[str, str, str]:
    """(role, format, description) of a FLUX.2 component from its keys; ("unknown", ...) for anything else."""
    ks = set(keys)
    p = _strip(ks, BFL_PREFIXES)
    if p + "single_stream_modulation.lin.weight" in ks and p + "img_in.weight" in ks:
        return "dit", "bfl", "a FLUX.2 transformer (BFL layout)"
    if {"x_embedder.weight", "single_stream_modulation.linear.weight", "context_embedder.weight"} <= ks:
        return "dit", "diffusers", "a FLUX.2 transformer (diffusers layout)"
    if {"bn.running_mean", "encoder.conv_in.weight", "decoder.conv_in.weight"} <= ks:
        return "vae", "diffusers", "the FLUX.2 VAE (diffusers layout)"
    if {"model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight"} <= ks:
        return "text_encoder", "qwen3", "a Qwen3 language model (transformers layout)"
    if {"model.language_model.embed_tokens.weight", "model.language_model.layers.0.self_attn.q_norm.weight"} <= ks:
        return "unknown", "unknown", "a Qwen3-VL model, FLUX 3's text encoder (it loads with Flux3ImagePipeline)"
    if p + "early_stream_modulations.image.lin.weight" in ks or "x_embedders.image_cond.weight" in ks:
        return "unknown", "unknown", "a FLUX 3 transformer, not FLUX.2's (it loads with Flux3ImagePipeline)"
    for pre in ("language_model.model.", "model.language_model."):
        if pre + "embed_tokens.weight" in ks and pre + "layers.0.self_attn.q_proj.weight" in ks:
            return "text_encoder", "mistral3", "a Mistral3 model (Mistral Small 3.x, transformers layout)"
    if any(k.startswith(("double_blocks.", "transformer_blocks.")) for k in ks):
        return ("unknown", "unknown",
                "a FLUX.1-style transformer, not FLUX.2's (FLUX.1 files load with FluxImagePipeline)")
    return "unknown", "unknown", f"tensors that are no FLUX.2 component (keys like {few(ks, 3)})"


def _count(keys, pattern) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if found and found != set(range(len(found))):
        raise ModelFileError(f"blocks matching {pattern} are not numbered 0..n-1 ({sorted(found)}): the file is "
                             f"incomplete.")
    return len(found)


def _shape(sd, key) -> tuple:
    try:
        return tuple(sd[key].shape)
    except KeyError:
        raise ModelFileError(f"the checkpoint lacks {key!r}: the file is incomplete or of another model.") from None


# ---------------------------------------------------------------------------------------------------- transformer

def rope_axes(head_dim: int) -> tuple:
    """FLUX.2's four rotary axes (t, h, w, l): 32 each for its 128-wide heads; a narrower head splits evenly."""
    if head_dim % 8:
        raise ModelFileError(f"attention heads {head_dim} wide cannot split into FLUX.2's four even rotary axes.")
    return (head_dim // 4,) * 4


def infer_transformer_config(sd, config_json: dict | None = None) -> dict:
    """``Flux2Transformer2DModel(**cfg)`` kwargs from the shapes of a diffusers-layout state dict."""
    keys = list(sd)
    inner, in_channels = _shape(sd, "x_embedder.weight")
    first = "single_transformer_blocks.0" if any(k.startswith("single_transformer_blocks.") for k in keys) \
        else "transformer_blocks.0"
    head_dim = _shape(sd, first + ".attn.norm_q.weight")[0]
    if inner % head_dim:
        raise ModelFileError(f"width {inner} is not a whole number of {head_dim}-wide heads.")
    layers = _count(keys, r"transformer_blocks\.(\d+)\.")
    single = _count(keys, r"single_transformer_blocks\.(\d+)\.")
    if layers:
        mlp_hidden = _shape(sd, "transformer_blocks.0.ff.linear_in.weight")[0] // 2
    else:
        mlp_hidden = (_shape(sd, "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight")[0] - 3 * inner) // 2
    cfg = {
        "patch_size": 1, "in_channels": in_channels, "out_channels": _shape(sd, "proj_out.weight")[0],
        "num_layers": layers, "num_single_layers": single, "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim, "joint_attention_dim": _shape(sd, "context_embedder.weight")[1],
        "timestep_guidance_channels": _shape(sd, "time_guidance_embed.timestep_embedder.linear_1.weight")[1],
        "mlp_ratio": mlp_hidden / inner, "axes_dims_rope": rope_axes(head_dim), "rope_theta": 2000, "eps": 1e-6,
        "guidance_embeds": "time_guidance_embed.guidance_embedder.linear_1.weight" in sd,
    }
    for name in ("axes_dims_rope", "rope_theta", "eps"):     # not in the shapes: the folder's config.json says
        if config_json and name in config_json:
            value = config_json[name]
            cfg[name] = tuple(value) if isinstance(value, list) else value
    if sum(cfg["axes_dims_rope"]) != head_dim:
        raise ModelFileError(f"rotary axes {list(cfg['axes_dims_rope'])} do not add up to the {head_dim}-wide heads.")
    return cfg


_BFL_RENAMES = (
    (r"img_in\.weight", "x_embedder.weight"), (r"txt_in\.weight", "context_embedder.weight"),
    (r"time_in\.in_layer\.weight", "time_guidance_embed.timestep_embedder.linear_1.weight"),
    (r"time_in\.out_layer\.weight", "time_guidance_embed.timestep_embedder.linear_2.weight"),
    (r"guidance_in\.in_layer\.weight", "time_guidance_embed.guidance_embedder.linear_1.weight"),
    (r"guidance_in\.out_layer\.weight", "time_guidance_embed.guidance_embedder.linear_2.weight"),
    (r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.lin\.weight",
     r"\1.linear.weight"),
    (r"final_layer\.linear\.weight", "proj_out.weight"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_q.weight"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_k.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_added_q.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_added_k.weight"),
    (r"double_blocks\.(\d+)\.img_attn\.proj\.weight", r"transformer_blocks.\1.attn.to_out.0.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.proj\.weight", r"transformer_blocks.\1.attn.to_add_out.weight"),
    (r"double_blocks\.(\d+)\.img_mlp\.0\.weight", r"transformer_blocks.\1.ff.linear_in.weight"),
    (r"double_blocks\.(\d+)\.img_mlp\.2\.weight", r"transformer_blocks.\1.ff.linear_out.weight"),
    (r"double_blocks\.(\d+)\.txt_mlp\.0\.weight", r"transformer_blocks.\1.ff_context.linear_in.weight"),
    (r"double_blocks\.(\d+)\.txt_mlp\.2\.weight", r"transformer_blocks.\1.ff_context.linear_out.weight"),
    (r"single_blocks\.(\d+)\.linear1\.weight", r"single_transformer_blocks.\1.attn.to_qkv_mlp_proj.weight"),
    (r"single_blocks\.(\d+)\.linear2\.weight", r"single_transformer_blocks.\1.attn.to_out.weight"),
    (r"single_blocks\.(\d+)\.norm\.query_norm\.scale", r"single_transformer_blocks.\1.attn.norm_q.weight"),
    (r"single_blocks\.(\d+)\.norm\.key_norm\.scale", r"single_transformer_blocks.\1.attn.norm_k.weight"),
)
_QKV = re.compile(r"double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.weight")


def convert_bfl_transformer(sd) -> dict:
    """BFL FLUX.2 keys -> diffusers ``Flux2Transformer2DModel`` keys (views only; works on meta tensors).

    The double blocks' fused qkv is split in three (q, k, v rows in that order); ``final_layer.adaLN_modulation.1``
    holds (shift, scale) where diffusers' ``norm_out.linear`` holds (scale, shift), so its halves are swapped."""
    p = _strip(sd, BFL_PREFIXES)
    out, unknown = {}, []
    for key, t in sd.items():
        k = key[len(p):]
        m = _QKV.fullmatch(k)
        if m:
            q, kk, v = t.chunk(3, dim=0)
            names = ("to_q", "to_k", "to_v") if m[2] == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
            for name, part in zip(names, (q, kk, v)):
                out[f"transformer_blocks.{m[1]}.attn.{name}.weight"] = part
            continue
        if k == "final_layer.adaLN_modulation.1.weight":
            shift, scale = t.chunk(2, dim=0)
            out["norm_out.linear.weight"] = torch.cat([scale, shift], dim=0)
            continue
        for pattern, repl in _BFL_RENAMES:
            if re.fullmatch(pattern, k):
                out[re.sub(pattern, repl, k)] = t
                break
        else:
            unknown.append(key)
    if unknown:
        raise ModelFileError(f"the BFL transformer file has tensors FLUX.2's transformer does not: {few(unknown)}.")
    return out


def build_transformer(cfg: dict):
    from diffusers import Flux2Transformer2DModel
    return Flux2Transformer2DModel(**cfg)


# ---------------------------------------------------------------------------------------------------- VAE

def infer_vae_config(sd, config_json: dict | None = None) -> dict:
    """``AutoencoderKLFlux2(**cfg)`` kwargs from the shapes of a diffusers-layout state dict."""
    import inspect

    from diffusers import AutoencoderKLFlux2

    from ..loading.vae import infer_vae_config as flux1_shapes
    base = flux1_shapes({k: v for k, v in sd.items() if not k.startswith("bn.")})
    allowed = set(inspect.signature(AutoencoderKLFlux2.__init__).parameters) - {"self"}
    cfg = {k: v for k, v in base.items() if k in allowed}
    latent = cfg["latent_channels"]
    bn = _shape(sd, "bn.running_mean")[0]
    patch = int(round((bn / latent) ** 0.5))
    if patch * patch * latent != bn:
        raise ModelFileError(f"bn statistics over {bn} channels are not a square patch of the {latent} latent "
                             f"channels.")
    cfg["patch_size"] = (patch, patch)
    levels = _count(sd, r"decoder\.up_blocks\.(\d+)\.")
    dec = tuple(_shape(sd, f"decoder.up_blocks.{i}.resnets.0.conv2.weight")[0] for i in range(levels))[::-1]
    cfg["decoder_block_out_channels"] = None if dec == tuple(cfg["block_out_channels"]) else dec
    for name in ("batch_norm_eps", "batch_norm_momentum", "norm_num_groups", "sample_size"):
        if config_json and name in config_json:
            cfg[name] = config_json[name]
    return cfg


def build_vae(cfg: dict):
    from diffusers import AutoencoderKLFlux2
    return AutoencoderKLFlux2(**cfg)


# ---------------------------------------------------------------------------------------------------- text encoders

def _qwen_like_config(sd, prefix: str, config_json: dict | None, defaults: dict) -> dict:
    keys = list(sd)
    vocab, hidden = _shape(sd, prefix + "embed_tokens.weight")
    layers = _count(keys, re.escape(prefix) + r"layers\.(\d+)\.")
    a = prefix + "layers.0."
    q_rows = _shape(sd, a + "self_attn.q_proj.weight")[0]
    kv_rows = _shape(sd, a + "self_attn.k_proj.weight")[0]
    head_dim = (_shape(sd, a + "self_attn.q_norm.weight")[0] if a + "self_attn.q_norm.weight" in sd
                else (config_json or {}).get("head_dim") or defaults["head_dim"])
    cfg = dict(defaults)
    cfg.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, head_dim=head_dim,
               num_attention_heads=q_rows // head_dim, num_key_value_heads=kv_rows // head_dim,
               intermediate_size=_shape(sd, a + "mlp.gate_proj.weight")[0])
    for name in ("rope_theta", "rms_norm_eps", "max_position_embeddings", "sliding_window"):
        if config_json and config_json.get(name) is not None:
            cfg[name] = config_json[name]
    rope = (config_json or {}).get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    return cfg


QWEN3_DEFAULTS = {"head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "max_position_embeddings": 40960,
                  "attention_bias": False, "hidden_act": "silu", "tie_word_embeddings": True}
MISTRAL_DEFAULTS = {"head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 1000000000.0,
                    "max_position_embeddings": 131072, "hidden_act": "silu", "sliding_window": None}


def infer_qwen3_config(sd, config_json: dict | None = None):
    from transformers import Qwen3Config
    cfg = _qwen_like_config(sd, "model.", config_json, QWEN3_DEFAULTS)
    cfg["tie_word_embeddings"] = "lm_head.weight" not in sd
    return Qwen3Config(**cfg)


def infer_mistral_config(sd, config_json: dict | None = None):
    """``MistralConfig`` of the language model inside a Mistral3 file; head width from config.json's text_config
    (Mistral has no q_norm to show it), else 128 as Mistral Small 3.x."""
    from transformers import MistralConfig
    text_json = (config_json or {}).get("text_config", config_json)
    prefix = "language_model.model." if "language_model.model.embed_tokens.weight" in sd else "model.language_model."
    return MistralConfig(**_qwen_like_config(sd, prefix, text_json, MISTRAL_DEFAULTS))


def convert_qwen3(sd) -> tuple[dict, list]:
    """File keys -> ``Qwen3Model`` keys; returns (tensors, unused keys): ``lm_head.weight`` (Qwen3-8B) is never read
    by text encoding."""
    out, unused = {}, []
    for k, t in sd.items():
        if k.startswith("model."):
            out[k[len("model."):]] = t
        elif k == "lm_head.weight":
            unused.append(k)
        else:
            raise ModelFileError(f"the Qwen3 file has a tensor no Qwen3 model has: {k}.")
    return out, unused


MISTRAL_UNUSED = ("vision_tower.", "multi_modal_projector.", "language_model.lm_head.", "lm_head.",
                  "model.vision_tower.", "model.multi_modal_projector.")


def convert_mistral(sd) -> tuple[dict, list]:
    """Mistral3 file keys (old ``language_model.model.*`` or new ``model.language_model.*``) -> ``MistralModel``
    keys; (tensors, unused keys: the vision tower, the projector and the lm_head)."""
    out, unused = {}, []
    for k, t in sd.items():
        for pre in ("language_model.model.", "model.language_model."):
            if k.startswith(pre):
                out[k[len(pre):]] = t
                break
        else:
            if k.startswith(MISTRAL_UNUSED):
                unused.append(k)
            else:
                raise ModelFileError(f"the Mistral3 file has a tensor no Mistral3 model has: {k}.")
    return out, unused


def trim_text_encoder(model, layers) -> None:
    """Keep the decoder layers the chosen hidden states need, plus one: ``hidden_states[k]`` is layer k-1's output
    and transformers replaces the last entry by the final norm's output, so index max(layers) must not be last."""
    keep = max(layers) + 1
    if len(model.layers) > keep:
        model.layers = model.layers[:keep]
        model.config.num_hidden_layers = keep
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:keep]
    model.flux_studio_layers = tuple(layers)


def build_qwen3(conf, device=None):
    from transformers import Qwen3Model
    return _with_rotary(Qwen3Model(conf), device)


def build_mistral(conf, device=None):
    from transformers import MistralModel
    return _with_rotary(MistralModel(conf), device)


def _with_rotary(model, device):
    """The rotary ``inv_freq`` buffers are not in the files: computed on ``device`` as transformers does."""
    if device is not None and torch.device(device).type != "meta":
        from ..step1x.encoder import _materialise_rotary
        _materialise_rotary(model, torch.device(device))
    return model


# ---------------------------------------------------------------------------------------------------- load

def load_component(g: FileGroup, role: str, fmt: str, dtype, device, trim: bool = True) -> torch.nn.Module:
    device = torch.device(device)
    qkind = quantized.file_kind(g)          # GGUF / 4-bit / fp8 community files (engine.loading.quantized)
    if qkind and (role == "dit" or quantized.refuse_role(g, qkind, ROLE_NAMES[role])):
        return quantized.load_quantized_flux2_transformer(g, qkind, fmt, dtype, device)
    sd = read_state_dict(g, device="meta" if device.type == "meta" else None)
    cj = g.config()
    if role == "dit":
        tensors = convert_bfl_transformer(sd) if fmt == "bfl" else dict(sd)
        cfg = infer_transformer_config(tensors, cj if fmt == "diffusers" else None)
        return assemble(lambda: build_transformer(cfg), tensors, dtype, device)
    if role == "vae":
        cfg = infer_vae_config(sd, cj)
        return assemble(lambda: build_vae(cfg), dict(sd), dtype, device)
    if role == "text_encoder" and fmt in TEXT_ENCODERS:
        infer, convert, build, layers = TEXT_ENCODERS[fmt]
        conf = infer(sd, cj)
        tensors, unused = convert(sd)
        model = assemble(lambda: build(conf, device), tensors, dtype, device)
        model.flux_studio_unused = unused
        if trim:
            trim_text_encoder(model, layers)
        return model
    raise ModelFileError(f"{g.label}: no FLUX.2 loader for {role} ({fmt}).")


# The text encoders by file format: (config from the tensors, key conversion, builder, hidden-state layers read).
TEXT_ENCODERS = {
    "qwen3": (infer_qwen3_config, convert_qwen3, build_qwen3, QWEN3_LAYERS),
    "mistral3": (infer_mistral_config, convert_mistral, build_mistral, MISTRAL_LAYERS),
}


def load_flux2_models(files, torch_dtype=torch.bfloat16, device="cpu") -> dict:
    """FLUX.2 components from files, shard sets, index jsons or folders -> {role: module}; roles ``dit``
    (``Flux2Transformer2DModel``), ``vae`` (``AutoencoderKLFlux2``), ``text_encoder`` (``Qwen3Model`` /
    ``MistralModel``, trimmed to the layers read; ``flux_studio_text_kind`` says which). Each module carries
    ``flux_studio_files``, ``flux_studio_format`` and ``flux_studio_role``."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    groups: list[FileGroup] = []
    for item in files:
        name = Path(item).name
        if Path(item).is_file() and not name.endswith((".safetensors", ".safetensors.index.json")) \
                and not quantized.is_gguf(item):
            continue                   # config.json and the like, matched by a pattern beside the weights
        add_group(groups, resolve_group(item))
    out = {}
    for g in groups:
        qkind, qmeta, qnote = quantized.read_meta(g)
        header = qmeta if qkind else read_state_dict(g, device="meta")
        role, fmt, desc = detect_flux2(header)
        desc += f", {qnote}" if qkind else ""
        if role == "unknown":
            raise ModelFileError(f"{g.label} holds {desc}; expected {', '.join(ROLE_NAMES.values())}.", g.label)
        if role in out:
            raise ModelFileError(f"{out[role].flux_studio_files[0]} and {g.label} both hold {ROLE_NAMES[role]}: pass "
                                 f"only one.", g.label)
        try:
            model = load_component(g, role, fmt, torch_dtype, device)
        except ModelFileError as e:
            raise ModelFileError(f"{g.label}: {e}" if g.label not in str(e) else str(e), g.label) from e
        model.flux_studio_files = [str(p) for p in g.files]
        model.flux_studio_format = fmt
        model.flux_studio_role = role
        model.flux_studio_description = desc
        if role == "text_encoder":
            model.flux_studio_text_kind = fmt
        out[role] = model
    return out
