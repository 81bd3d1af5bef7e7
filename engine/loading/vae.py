"""The FLUX VAE: BFL ``ae.safetensors`` and the diffusers ``vae/`` folder onto diffusers' ``AutoencoderKL``.

Layout differences the mapping handles:

- BFL ``encoder.down.{i}.block.{j}`` / ``decoder.up.{i}.block.{j}`` -> ``down_blocks.{i}.resnets.{j}`` /
  ``up_blocks.{n-1-i}.resnets.{j}``: BFL numbers decoder levels from the lowest resolution's *output* side
  (``up.0`` is the last, full-resolution level), diffusers in execution order, so the decoder list is reversed.
- ``mid.block_1/2`` -> ``mid_block.resnets.0/1``; ``mid.attn_1.{norm,q,k,v,proj_out}`` ->
  ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``, where BFL's q/k/v/proj_out are 1x1 convolutions
  (4-D weights) and diffusers' are Linear (2-D): the 1x1 kernel is flattened away.
- ``norm_out`` -> ``conv_norm_out``, ``nin_shortcut`` -> ``conv_shortcut``, ``downsample.conv`` ->
  ``downsamplers.0.conv``, ``upsample.conv`` -> ``upsamplers.0.conv``.

Architecture from shapes: block_out_channels = conv1 rows of each encoder level's first resnet, layers_per_block =
resnets per encoder level (decoder levels have one more), in/out channels from conv_in/conv_out, latent_channels
from ``decoder.conv_in`` columns (16; the encoder emits mean and logvar, 2x16). GroupNorm's group count leaves no
trace in the shapes: 32, as in every FLUX/SD VAE. FLUX's VAE has no quant_conv/post_quant_conv; they are enabled
only if the file has them. Latent scaling is not in the tensors either: FLUX's scaling_factor 0.3611 and
shift_factor 0.1159 (a diffusers folder's config.json, when present, is used instead by the loader).
"""
from __future__ import annotations

import re

from .detect import VAE_PREFIXES, strip_common_prefix
from .errors import ModelFileError, few

FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159
NORM_GROUPS = 32

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET_PARTS = {"norm1", "conv1", "norm2", "conv2", "nin_shortcut"}


def _strip(sd):
    p = strip_common_prefix(sd.keys(), VAE_PREFIXES)
    return {k[len(p):]: v for k, v in sd.items()} if p else dict(sd)


def _levels(keys, pattern) -> list[int]:
    found = sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})
    if found != list(range(len(found))):
        raise ModelFileError(f"the VAE checkpoint's levels ({pattern}) are not numbered 0..n-1 ({found}): the file is "
                             f"incomplete.")
    return found


def _get(sd, key):
    try:
        return sd[key]
    except KeyError:
        raise ModelFileError(f"the VAE checkpoint lacks {key!r}: the file is incomplete or not a FLUX VAE.") from None


def is_bfl_vae(keys) -> bool:
    return any(k.startswith("encoder.down.") or ".encoder.down." in k for k in keys)


def infer_vae_config(sd) -> dict:
    """``AutoencoderKL(**cfg)`` kwargs from the shapes of a BFL (ae) or diffusers VAE state dict."""
    sd = _strip(sd)
    bfl = is_bfl_vae(sd)
    if bfl:
        enc = _levels(sd, r"encoder\.down\.(\d+)\.")
        dec = _levels(sd, r"decoder\.up\.(\d+)\.")
        res = lambda i: f"encoder.down.{i}.block.0.conv1.weight"  # noqa: E731
        n_res = len(_levels(sd, r"encoder\.down\.0\.block\.(\d+)\."))
        n_dec_res = len(_levels(sd, r"decoder\.up\.0\.block\.(\d+)\."))
        attn = "encoder.mid.attn_1.q.weight"
    else:
        enc = _levels(sd, r"encoder\.down_blocks\.(\d+)\.")
        dec = _levels(sd, r"decoder\.up_blocks\.(\d+)\.")
        res = lambda i: f"encoder.down_blocks.{i}.resnets.0.conv1.weight"  # noqa: E731
        n_res = len(_levels(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
        n_dec_res = len(_levels(sd, r"decoder\.up_blocks\.0\.resnets\.(\d+)\."))
        attn = "encoder.mid_block.attentions.0.to_q.weight"
    if not enc or len(dec) != len(enc) or n_dec_res != n_res + 1:
        raise ModelFileError(f"the VAE has {len(enc)} encoder levels with {n_res} resnets each and {len(dec)} decoder "
                             f"levels with {n_dec_res}: AutoencoderKL needs equal level counts and one more resnet per "
                             f"decoder level.")
    channels = [int(_get(sd, res(i)).shape[0]) for i in enc]
    latent = int(_get(sd, "decoder.conv_in.weight").shape[1])
    enc_out = int(_get(sd, "encoder.conv_out.weight").shape[0])
    if enc_out != 2 * latent:
        raise ModelFileError(f"encoder.conv_out has {enc_out} output channels, expected 2 x {latent} (mean and "
                             f"log-variance of the {latent} latent channels).")
    bad = [c for c in channels if c % NORM_GROUPS]
    if bad:
        raise ModelFileError(f"VAE widths {bad} are not divisible by the {NORM_GROUPS} GroupNorm groups.")
    n = len(channels)
    return {
        "in_channels": int(_get(sd, "encoder.conv_in.weight").shape[1]),
        "out_channels": int(_get(sd, "decoder.conv_out.weight").shape[0]),
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": tuple(channels),
        "layers_per_block": n_res,
        "act_fn": "silu",
        "latent_channels": latent,
        "norm_num_groups": NORM_GROUPS,
        "sample_size": 1024,
        "scaling_factor": FLUX_SCALING_FACTOR,
        "shift_factor": FLUX_SHIFT_FACTOR,
        "force_upcast": True,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": attn in sd,
    }


def _map_key(key: str, n_up: int) -> tuple[str, bool] | None:
    """BFL VAE key -> (diffusers key, flatten 1x1 kernel?) or None when unknown."""
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", key)
    if m:
        name = "conv_norm_out" if m[2] == "norm_out" else m[2]
        return f"{m[1]}.{name}.{m[3]}", False
    if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key):
        return key, False
    m = re.fullmatch(r"(encoder\.down|decoder\.up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m and m[4] in _RESNET_PARTS:
        side, i = ("encoder.down_blocks", int(m[2])) if m[1] == "encoder.down" else ("decoder.up_blocks",
                                                                                      n_up - 1 - int(m[2]))
        part = "conv_shortcut" if m[4] == "nin_shortcut" else m[4]
        return f"{side}.{i}.resnets.{m[3]}.{part}.{m[5]}", False
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key)
    if m:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}", False
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key)
    if m:
        return f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}", False
    m = re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)", key)
    if m and m[3] in _RESNET_PARTS:
        part = "conv_shortcut" if m[3] == "nin_shortcut" else m[3]
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{part}.{m[4]}", False
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", key)
    if m:
        return f"{m[1]}.mid_block.attentions.0.{_ATTN[m[2]]}.{m[3]}", m[2] != "norm" and m[3] == "weight"
    return None


def convert_bfl_vae(sd) -> dict:
    """BFL ``ae.safetensors`` keys -> diffusers ``AutoencoderKL`` keys (views only; works on meta tensors)."""
    sd = _strip(sd)
    n_up = len(_levels(sd, r"decoder\.up\.(\d+)\."))
    out, unknown = {}, []
    for key, t in sd.items():
        mapped = _map_key(key, n_up)
        if mapped is None:
            unknown.append(key)
            continue
        new, flatten = mapped
        if flatten and t.dim() > 2:
            if any(d != 1 for d in t.shape[2:]):
                raise ModelFileError(f"{key} has shape {list(t.shape)}; a 1x1 kernel was expected.")
            t = t.flatten(1)
        out[new] = t
    if unknown:
        raise ModelFileError(f"the VAE checkpoint has tensors a FLUX VAE does not: {few(unknown)}.")
    return out


def convert_diffusers_vae(sd) -> dict:
    """A diffusers VAE state dict needs no renaming; old saves' 1x1-conv attention weights are flattened."""
    sd = _strip(sd)
    out = {}
    for k, t in sd.items():
        if ".mid_block.attentions.0." in k and k.endswith(".weight") and t.dim() > 2:
            t = t.flatten(1)
        out[k] = t
    return out


def vae_config_from_json(cfg: dict) -> dict | None:
    """``AutoencoderKL`` kwargs from a diffusers ``config.json`` (None if it is not an AutoencoderKL config)."""
    if cfg.get("_class_name") not in ("AutoencoderKL", None) or "block_out_channels" not in cfg:
        return None
    import inspect

    from diffusers import AutoencoderKL

    allowed = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in allowed}


def build_vae(cfg: dict):
    """``AutoencoderKL(**cfg)``; call under ``torch.device('meta')`` (or empty-weights) to allocate nothing."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**cfg)
