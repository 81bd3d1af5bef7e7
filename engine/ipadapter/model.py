"""InstantX's FLUX.1 IP-Adapter and its SigLIP image encoder, from their official files.

- ``ip-adapter.bin`` (InstantX/FLUX.1-dev-IP-Adapter): a ``torch.save`` pickle of a NESTED dict
  ``{"image_proj": {...}, "ip_adapter": {...}}``, read with ``torch.load(weights_only=True)`` only (plain tensors and
  dicts; any other object in the pickle is refused). Its keys, flattened as ``<outer>.<inner>``, are exactly this
  module's state dict:

  ``image_proj.proj.0``   Linear(SigLIP width 1152 -> 2304)      ``image_proj.proj.1`` is the GELU (no tensors)
  ``image_proj.proj.2``   Linear(2304 -> 128 tokens x 4096)
  ``image_proj.norm``     LayerNorm(4096) over each of the 128 tokens
  ``ip_adapter.{i}.to_k_ip`` / ``.to_v_ip``   Linear(4096 -> 3072, no bias), i = 0..56: the 19 double blocks, then
                          the 38 single blocks, in the transformer's order

  The key norm of each block (an RMSNorm over the head width, eps 1e-5, no weight) has no tensors. The architecture
  (widths, tokens, blocks) comes from the shapes; the heads come from the transformer it is used with.
- The SigLIP encoder: google/siglip-so400m-patch14-384's ``model.safetensors`` is a whole ``SiglipModel`` (text and
  vision towers); only ``vision_model.*`` is kept (a vision tower alone, as FLUX.1-Redux ships it, is accepted too)
  and built with ``engine.redux.model``'s SigLIP code onto transformers' ``SiglipVisionModel``. The IP-Adapter reads
  its ``pooler_output`` (the MAP head ``vision_model.head.*``), one 1152-wide vector per image.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..loading.errors import ModelFileError, few

ENCODER_ROLE, ADAPTER_ROLE = "ipadapter_image_encoder", "ipadapter"
KEY_NORM_EPS = 1e-5
PROJ_KEYS = ("image_proj.proj.0.weight", "image_proj.proj.0.bias", "image_proj.proj.2.weight",
             "image_proj.proj.2.bias", "image_proj.norm.weight", "image_proj.norm.bias")
BLOCK_KEY = re.compile(r"^ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight$")
GET_IT = ("Download InstantX/FLUX.1-dev-IP-Adapter's ip-adapter.bin (models/InstantX/FLUX.1-dev-IP-Adapter/"
          "ip-adapter.bin).")


# ---------------------------------------------------------------------------------------------------- the module
class ImageProjection(torch.nn.Module):
    """SigLIP's pooled vector -> ``num_tokens`` tokens of ``cross_dim`` (Linear, GELU, Linear, then LayerNorm per
    token)."""

    def __init__(self, siglip_dim: int, hidden_dim: int, cross_dim: int, num_tokens: int):
        super().__init__()
        self.cross_dim, self.num_tokens = cross_dim, num_tokens
        self.proj = torch.nn.Sequential(torch.nn.Linear(siglip_dim, hidden_dim), torch.nn.GELU(),
                                        torch.nn.Linear(hidden_dim, cross_dim * num_tokens))
        self.norm = torch.nn.LayerNorm(cross_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(pooled).reshape(-1, self.num_tokens, self.cross_dim))


class IPBlock(torch.nn.Module):
    """One transformer block's keys and values of the image tokens."""

    def __init__(self, cross_dim: int, inner_dim: int):
        super().__init__()
        self.to_k_ip = torch.nn.Linear(cross_dim, inner_dim, bias=False)
        self.to_v_ip = torch.nn.Linear(cross_dim, inner_dim, bias=False)


class FluxIPAdapter(torch.nn.Module):
    """The image projection and the per-block keys/values (state dict = the file's keys, flattened)."""

    def __init__(self, siglip_dim=1152, hidden_dim=2304, cross_dim=4096, num_tokens=128, inner_dim=3072, blocks=57):
        super().__init__()
        self.config = dict(siglip_dim=siglip_dim, hidden_dim=hidden_dim, cross_dim=cross_dim, num_tokens=num_tokens,
                           inner_dim=inner_dim, blocks=blocks)
        self.image_proj = ImageProjection(siglip_dim, hidden_dim, cross_dim, num_tokens)
        self.ip_adapter = torch.nn.ModuleList([IPBlock(cross_dim, inner_dim) for _ in range(blocks)])

    def tokens(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, siglip_dim) pooled vectors -> (1, N x num_tokens, cross_dim): every image's tokens in one sequence."""
        out = self.image_proj(pooled)
        return out.reshape(1, -1, out.shape[-1])

    def keys_values(self, tokens: torch.Tensor, heads: int) -> tuple:
        """Per block: the image tokens' keys (RMS-normed per head) and values, each (1, heads, T, head_dim)."""
        ks, vs = [], []
        for block in self.ip_adapter:
            k = block.to_k_ip(tokens)
            v = block.to_v_ip(tokens)
            k = k.view(1, -1, heads, k.shape[-1] // heads).transpose(1, 2)
            v = v.view(1, -1, heads, v.shape[-1] // heads).transpose(1, 2)
            ks.append(rms_norm(k, KEY_NORM_EPS))
            vs.append(v)
        return ks, vs


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis without a weight, computed in float32 and returned in ``x``'s dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# ------------------------------------------------------------------------------------------------- the .bin file
def flatten(nested) -> dict:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` -> ``{"image_proj.<k>": t, "ip_adapter.<k>": t}``."""
    out = {}
    for outer, inner in nested.items():
        if isinstance(inner, dict):
            for k, v in inner.items():
                out[f"{outer}.{k}"] = v
        else:
            out[str(outer)] = inner
    return out


def _shape(sd, key):
    t = sd.get(key)
    return tuple(t.shape) if t is not None and hasattr(t, "shape") else None


def wrong_kind(sd) -> str | None:
    """What a file with IP-Adapter keys is when it is not InstantX's FLUX.1 IP-Adapter (None when it may be)."""
    keys = set(sd)
    if any(k.startswith("double_blocks.") and "ip_adapter_double_stream" in k for k in keys):
        return ("an XLabs FLUX IP-Adapter (double_blocks.*.processor.ip_adapter_double_stream_*), which diffusers' "
                "load_ip_adapter reads; this engine runs InstantX's format")
    if "image_proj.proj.weight" in keys or "image_proj.latents" in keys or "image_proj.proj_in.weight" in keys:
        k = next((k for k in sorted(keys) if BLOCK_KEY.match(k)), None)
        width = _shape(sd, k) if k else None
        return (f"a Stable Diffusion / SDXL IP-Adapter (image_proj.{'proj.weight' if 'image_proj.proj.weight' in keys else 'latents'}"
                f"{f', {k} {list(width)}' if width else ''}), not InstantX's FLUX.1 IP-Adapter")
    if not any(BLOCK_KEY.match(k) for k in keys) or not all(k in keys for k in PROJ_KEYS):
        return f"not an IP-Adapter this engine knows (keys like {few(keys, 3)})"
    return None


def infer_config(sd) -> dict:
    """``FluxIPAdapter`` arguments from the flattened file's shapes; a file of another kind is a ModelFileError."""
    kind = wrong_kind(sd)
    if kind:
        raise ModelFileError(f"the file is {kind}. {GET_IT}")
    p0, p2, norm = _shape(sd, "image_proj.proj.0.weight"), _shape(sd, "image_proj.proj.2.weight"), \
        _shape(sd, "image_proj.norm.weight")
    cross = norm[0]
    if len(p0) != 2 or len(p2) != 2 or p2[1] != p0[0] or p2[0] % cross:
        raise ModelFileError(f"the image projection's shapes do not fit Linear -> GELU -> Linear -> 128 tokens: "
                             f"proj.0 {list(p0)}, proj.2 {list(p2)}, norm {list(norm)}. {GET_IT}")
    blocks = sorted({int(m.group(1)) for k in sd for m in [BLOCK_KEY.match(k)] if m})
    if blocks != list(range(len(blocks))):
        raise ModelFileError(f"the IP-Adapter's blocks are not numbered 0..n-1 ({blocks[:6]}...). {GET_IT}")
    k0 = _shape(sd, "ip_adapter.0.to_k_ip.weight")
    if k0 is None or len(k0) != 2 or k0[1] != cross:
        raise ModelFileError(f"ip_adapter.0.to_k_ip.weight is {list(k0) if k0 else 'missing'}; it should read the "
                             f"{cross}-wide image tokens. {GET_IT}")
    return dict(siglip_dim=p0[1], hidden_dim=p0[0], cross_dim=cross, num_tokens=p2[0] // cross, inner_dim=k0[0],
                blocks=len(blocks))


def read_bin(path) -> dict:
    """The flattened tensors of an IP-Adapter ``.bin``, through ``torch.load(weights_only=True)`` (memory-mapped
    when the file allows it). Anything but plain tensors in the pickle is refused."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist. {GET_IT}", path)
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)   # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 - an unpickling refusal or a broken file: name it
        what = "holds objects other than tensors (refused: only weights_only loading is allowed)" \
            if "weights_only" in str(e) or "Unpickl" in type(e).__name__ else f"could not be read ({type(e).__name__})"
        raise ModelFileError(f"{path} {what}: {str(e).splitlines()[0][:200]}. {GET_IT}", path) from e
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path} holds a {type(obj).__name__}, not the IP-Adapter's dict of tensors. {GET_IT}",
                             path)
    sd = flatten(obj)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelFileError(f"{path} has entries that are not tensors ({few(bad, 3)}). {GET_IT}", path)
    return sd


def build(cfg: dict) -> FluxIPAdapter:
    return FluxIPAdapter(**cfg)


# ------------------------------------------------------------------------------------------------------- SigLIP
def siglip_vision(sd) -> dict:
    """The vision tower's tensors of a whole SiglipModel file (or of a vision tower alone)."""
    from ..redux.model import is_full_siglip, is_siglip_vision
    keys = set(sd)
    if is_siglip_vision(keys):
        return dict(sd)
    if is_full_siglip(keys):
        return {k: v for k, v in sd.items() if k.startswith("vision_model.")}
    raise ModelFileError(f"the file is not a SigLIP model (keys like {few(keys, 3)}): the IP-Adapter's image encoder "
                         f"is google/siglip-so400m-patch14-384's model.safetensors.")


def pooled_width(encoder) -> int:
    return int(getattr(getattr(encoder, "config", None), "hidden_size", 0) or 0)


def check_pair(encoder, adapter) -> None:
    """The SigLIP width must be what the image projection reads."""
    want = adapter.config["siglip_dim"]
    got = pooled_width(encoder)
    if got and got != want:
        raise ModelFileError(f"the SigLIP encoder gives {got}-wide vectors but the IP-Adapter's image projection "
                             f"reads {want}: use google/siglip-so400m-patch14-384 with InstantX's IP-Adapter.")


def head_layout(dit) -> tuple:
    """(heads, head_dim, blocks) of a diffusers FluxTransformer2DModel."""
    blocks = list(getattr(dit, "transformer_blocks", [])) + list(getattr(dit, "single_transformer_blocks", []))
    attn = blocks[0].attn
    return int(attn.heads), int(getattr(attn, "head_dim", attn.inner_dim // attn.heads)), len(blocks)


def describe(cfg: dict) -> str:
    return (f"InstantX's FLUX.1 IP-Adapter ({cfg['num_tokens']} image tokens x {cfg['cross_dim']}, "
            f"{cfg['blocks']} blocks)")


__all__ = ["ADAPTER_ROLE", "ENCODER_ROLE", "FluxIPAdapter", "build", "check_pair", "flatten", "head_layout",
           "infer_config", "read_bin", "rms_norm", "siglip_vision", "wrong_kind"]
