"""InfiniteYou's two files onto modules, architecture from tensor shapes.

- ``infu_flux_v1.0/aes_stage2/image_proj_model.bin``: a torch pickle of a nested dict ``{"image_proj": {...}}`` (read
  with ``torch.load(weights_only=True)`` only: plain tensors, never arbitrary objects) -> ``IdProjector``, a
  Perceiver resampler: 8 learned query tokens attend to the projected 512-d ArcFace embedding through 4 layers of
  (attention, feed-forward), then ``proj_out`` + ``norm_out`` give 8 tokens in T5's space (4096). Our own module
  with the file's key names (``latents``, ``proj_in``, ``layers.<i>.0.{norm1,norm2,to_q,to_kv,to_out}``,
  ``layers.<i>.1.{0,1,3}``, ``proj_out``, ``norm_out``), one to one and shape-exact. Widths, depth, query count
  and feed-forward ratio come from the shapes; the head width is not in any shape: 64, as both references build it
  (1280 wide -> 20 heads).
- ``InfuseNetModel/*.safetensors``: a FLUX ControlNet in diffusers' layout (4 double + 10 single blocks, guidance
  embedder, 64 control features, no union modes) -> diffusers' ``FluxControlNetModel`` through
  ``engine.controlnet.load_controlnet``. ``is_infusenet`` tells it from the ControlNets the studio offers by that
  shape (Union-alpha 5 + 10 with modes, Upscaler 5 + 0, Inpainting-Beta 6 + 0).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..loading.errors import ModelFileError, few

PREFIX = "image_proj."
DIM_HEAD = 64                       # both references: Resampler(dim=1280, dim_head=64, heads=20)
INFUSENET_BLOCKS = (4, 10)          # double, single
PROJECTOR_ROLE, INFUSENET_ROLE = "infinityou_image_projector", "infinityou_infusenet"
_LAYER = re.compile(r"^layers\.(\d+)\.")


# ------------------------------------------------------------------------------------------------- projector
class _PerceiverAttention(nn.Module):
    """The queries read the image features and themselves (keys/values of both), softmax in float32."""

    def __init__(self, dim: int, inner: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        features, queries = self.norm1(features), self.norm2(queries)
        b, n, _ = queries.shape
        q = self.to_q(queries)
        k, v = self.to_kv(torch.cat([features, queries], dim=1)).chunk(2, dim=-1)

        def heads(t):
            return t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)
        q, k, v = heads(q), heads(k), heads(v)
        scale = q.shape[-1] ** -0.25                     # split between q and k: steadier in half precision
        scores = (q * scale) @ (k * scale).transpose(-2, -1)
        weights = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
        return self.to_out((weights @ v).transpose(1, 2).reshape(b, n, -1))


def _feed_forward(dim: int, hidden: int) -> nn.Sequential:
    # the file's indices: 0 norm, 1 up, 2 GELU (no tensors), 3 down
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden, bias=False), nn.GELU(),
                         nn.Linear(hidden, dim, bias=False))


class IdProjector(nn.Module):
    """ArcFace embedding (B, 1, 512) -> identity tokens (B, num_queries, output_dim)."""

    def __init__(self, dim=1280, depth=4, heads=20, inner=1280, num_queries=8, embedding_dim=512, output_dim=4096,
                 ff_hidden=5120):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.layers = nn.ModuleList(nn.ModuleList([_PerceiverAttention(dim, inner, heads),
                                                   _feed_forward(dim, ff_hidden)]) for _ in range(depth))
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    @property
    def embedding_dim(self) -> int:
        return self.proj_in.in_features

    @property
    def output_dim(self) -> int:
        return self.proj_out.out_features

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        if embedding.ndim == 2:
            embedding = embedding[:, None]
        queries = self.latents.to(embedding.dtype).expand(embedding.shape[0], -1, -1)
        features = self.proj_in(embedding)
        for attention, ff in self.layers:
            queries = attention(features, queries) + queries
            queries = ff(queries) + queries
        return self.norm_out(self.proj_out(queries))


def unwrap(sd) -> dict:
    """The projector's tensors without the file's ``image_proj`` level (nested dict or ``image_proj.`` keys)."""
    if isinstance(sd, dict) and set(sd) == {"image_proj"} and isinstance(sd["image_proj"], dict):
        return dict(sd["image_proj"])
    keys = list(sd)
    if keys and all(k.startswith(PREFIX) for k in keys):
        return {k[len(PREFIX):]: sd[k] for k in keys}
    return dict(sd)


def is_id_projector(keys) -> bool:
    """InfiniteYou's projector (with or without its ``image_proj`` level): learned queries, ``proj_in``,
    ``proj_out``, ``norm_out`` and Perceiver layers; an IP-Adapter (``ip_adapter.*`` beside it) is not."""
    ks = {k[len(PREFIX):] if k.startswith(PREFIX) else k for k in keys}
    return ({"latents", "proj_in.weight", "proj_out.weight", "norm_out.weight", "layers.0.0.to_kv.weight"} <= ks
            and not any(k.startswith("ip_adapter.") for k in keys))


def infer_projector_config(sd) -> dict:
    """``IdProjector`` arguments from the shapes (``sd`` without the ``image_proj`` level)."""
    def shape(key):
        if key not in sd:
            raise ModelFileError(f"the InfiniteYou image projector has no {key}: the file is incomplete.")
        return tuple(sd[key].shape)
    _, queries, dim = shape("latents")
    depth = len({int(m.group(1)) for k in sd for m in [_LAYER.match(k)] if m})
    if depth == 0:
        raise ModelFileError("the InfiniteYou image projector has no layers.<i>.* tensors.")
    inner = shape("layers.0.0.to_q.weight")[0]
    if inner % DIM_HEAD:
        raise ModelFileError(f"the projector's attention is {inner} wide, not a multiple of its head width {DIM_HEAD}.")
    out_dim, proj_dim = shape("proj_out.weight")
    emb_dim = shape("proj_in.weight")[1]
    if proj_dim != dim or shape("proj_in.weight")[0] != dim:
        raise ModelFileError(f"the projector's proj_in/proj_out do not fit its {dim}-wide queries.")
    return dict(dim=int(dim), depth=int(depth), heads=int(inner // DIM_HEAD), inner=int(inner),
                num_queries=int(queries), embedding_dim=int(emb_dim), output_dim=int(out_dim),
                ff_hidden=int(shape("layers.0.1.1.weight")[0]))


def build_projector(cfg: dict) -> IdProjector:
    return IdProjector(**cfg)


def read_bin(path) -> dict:
    """A ``.bin`` checkpoint's tensors, read with ``torch.load(weights_only=True)`` (memory-mapped where the file is
    in the zip format): plain tensors and containers only; anything else is refused by torch, named here."""
    path = Path(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:                       # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file or one holding objects: never unpickle them
        raise ModelFileError(f"{path} could not be read as a tensor checkpoint with torch.load(weights_only=True) "
                             f"({type(e).__name__}: {str(e)[:200]}). Download it again.", str(path)) from e
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path} holds a {type(obj).__name__}, not a dict of tensors.", str(path))
    return obj


def load_projector(path, torch_dtype=torch.bfloat16, device="cpu") -> IdProjector:
    """``image_proj_model.bin`` -> ``IdProjector`` in eval mode, without gradients, tagged like every component."""
    from ..loading.load import assemble
    raw = read_bin(path)
    sd = unwrap(raw)
    if not is_id_projector(sd):
        raise ModelFileError(f"{path} is not InfiniteYou's image projector (keys like {few(sorted(sd), 3)}); "
                             f"expected infu_flux_v1.0/aes_stage2/image_proj_model.bin.", str(path))
    bad = [k for k, t in sd.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise ModelFileError(f"{path} holds non-tensor entries ({few(bad)}).", str(path))
    try:
        cfg = infer_projector_config(sd)
        model = assemble(lambda: build_projector(cfg), sd, torch_dtype, torch.device(device))
    except ModelFileError as e:
        raise ModelFileError(f"{path} (InfiniteYou image projector): {e}", str(path)) from e
    model.flux_studio_files = [str(path)]
    model.flux_studio_format = "custom"
    model.flux_studio_role = PROJECTOR_ROLE
    model.flux_studio_description = (f"InfiniteYou's image projector ({cfg['embedding_dim']}-d face embedding -> "
                                     f"{cfg['num_queries']} tokens of {cfg['output_dim']})")
    return model


# ------------------------------------------------------------------------------------------------- InfuseNet
def _blocks(keys, prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)})


def is_infusenet(keys) -> bool:
    """InfuseNet's shape among FLUX ControlNets: 4 double + 10 single blocks, a guidance embedder, 64 control
    features (``controlnet_x_embedder`` as wide as ``x_embedder``) and no union modes."""
    ks = set(keys.keys() if hasattr(keys, "keys") else keys)
    if not {"controlnet_x_embedder.weight", "x_embedder.weight", "context_embedder.weight",
            "time_text_embed.guidance_embedder.linear_1.weight"} <= ks or "controlnet_mode_embedder.weight" in ks:
        return False
    if (_blocks(ks, "controlnet_blocks."), _blocks(ks, "controlnet_single_blocks.")) != INFUSENET_BLOCKS:
        return False
    if hasattr(keys, "keys"):
        try:
            return tuple(keys["controlnet_x_embedder.weight"].shape) == tuple(keys["x_embedder.weight"].shape)
        except Exception:  # noqa: BLE001 - no shapes: the keys decide
            return True
    return True


def load_infusenet(files, torch_dtype=torch.bfloat16, device="cpu") -> torch.nn.Module:
    """``InfuseNetModel/`` (shards, index or folder) -> diffusers' ``FluxControlNetModel``, tagged as InfuseNet."""
    from ..controlnet.load import load_controlnet
    model = load_controlnet(files, torch_dtype=torch_dtype, device=device)
    c = model.config
    if (c.num_layers, c.num_single_layers) != INFUSENET_BLOCKS or c.num_mode or not c.guidance_embeds:
        raise ModelFileError(f"{', '.join(model.flux_studio_files)} is a FLUX ControlNet with {c.num_layers} double "
                             f"+ {c.num_single_layers} single blocks, not InfiniteYou's InfuseNet (4 + 10, with a "
                             f"guidance embedder).", model.flux_studio_files[0])
    model.flux_studio_role = INFUSENET_ROLE
    model.flux_studio_description = "InfiniteYou's InfuseNet (a FLUX ControlNet, 4 double + 10 single blocks)"
    return model


def repo_folder(projector) -> Optional[Path]:
    """The InfiniteYou folder the projector was loaded from (``<...>/infu_flux_v1.0/aes_stage2/image_proj_model.bin``
    -> ``<...>``), where the seed's ``supports/insightface`` lies; None when unknown."""
    files = getattr(projector, "flux_studio_files", None) or []
    if not files:
        return None
    path = Path(files[0]).resolve()
    parents = path.parents
    if len(parents) > 2 and parents[1].name.startswith("infu_flux"):
        return parents[2]
    return path.parent


def check_pair(projector, infusenet, dit=None) -> None:
    """The projector's tokens must be as wide as InfuseNet's text input, and InfuseNet must fit the transformer."""
    from ..errors import EngineError
    want = int(infusenet.config.joint_attention_dim)
    if projector.output_dim != want:
        raise EngineError(f"InfiniteYou's image projector makes {projector.output_dim}-wide tokens but InfuseNet reads "
                          f"{want}-wide ones: the two files do not belong together (use both from "
                          f"ByteDance/InfiniteYou infu_flux_v1.0/aes_stage2/).")
    if dit is not None:
        from ..controlnet.load import check_compatible
        check_compatible(infusenet, dit)


__all__ = ["IdProjector", "PREFIX", "DIM_HEAD", "INFUSENET_BLOCKS", "PROJECTOR_ROLE", "INFUSENET_ROLE", "unwrap",
           "is_id_projector", "infer_projector_config", "build_projector", "read_bin", "load_projector",
           "is_infusenet", "load_infusenet", "repo_folder", "check_pair"]
