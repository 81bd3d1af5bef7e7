"""Nexus-GenV2's decoder files (``generation_decoder.bin`` / ``edit_decoder.bin``): the adapter or the embedding
merger that turn the AR model's 81 target embeddings into FLUX text tokens, and the DiT they were trained with.

Math written from the seed (``diffsynth/models/nexus_gen_projector.py``):

- ``NexusGenAdapter`` (generation): Linear(3584, 4096) -> LayerNorm -> ReLU -> Linear(4096, 4096) -> LayerNorm.
- ``NexusGenEmbeddingMerger`` (editing): one Qwen2.5-VL decoder layer over [target tokens; reference tokens] with
  NON-causal attention and multimodal rotary positions whose rows and columns are rescaled to a 72x72 grid
  (``grid_positions``), then RMSNorm -> Linear(3584, 4*4096) -> RMSNorm -> SiLU -> Linear(4*4096, 4096) -> RMSNorm.
  The layer's shape constants are the published Qwen config's: head width 128, mrope sections (16, 24, 24),
  rope theta 1e6, RMS eps 1e-6; its widths and the key/value heads come from the tensors.

The DiT is stored as ``pipe.dit.<DiffSynth FluxDiT key>`` (fused ``a_to_qkv`` / ``to_qkv_mlp``, ``final_norm_out``
already in diffusers' (scale, shift) order: the seed swaps it into DiffSynth's) and is converted here to diffusers'
``FluxTransformer2DModel`` keys, one to one.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..loading.errors import ModelFileError, few
from ..lora.formats import DIFFSYNTH_DOUBLE, DIFFSYNTH_SINGLE, DIFFSYNTH_TOP

GENERATION_ROLE = "nexus_gen_generation_adapter"
EDITING_ROLE = "nexus_gen_editing_adapter"
DIT_PREFIX = "pipe.dit."
ADAPTER_PREFIX = "adapter."
MERGER_PREFIX = "embedding_merger."
HEAD_DIM = 128
MROPE_SECTION = (16, 24, 24)
ROPE_THETA = 1000000.0
EPS = 1e-6
BASE_GRID = 72
SPATIAL_MERGE = 2
TOKENS_PER_SECOND = 2


# ------------------------------------------------------------------------------------------------ the adapter

class NexusGenAdapter(nn.Module):
    def __init__(self, input_dim: int = 3584, output_dim: int = 4096):
        super().__init__()
        self.adapter = nn.Sequential(nn.Linear(input_dim, output_dim), nn.LayerNorm(output_dim), nn.ReLU(),
                                     nn.Linear(output_dim, output_dim), nn.LayerNorm(output_dim))

    def forward(self, x):
        return self.adapter(x)


# ------------------------------------------------------------------------------------------------ the merger

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class MergerAttention(nn.Module):
    def __init__(self, hidden: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads = hidden // HEAD_DIM, kv_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, kv_heads * HEAD_DIM)
        self.v_proj = nn.Linear(hidden, kv_heads * HEAD_DIM)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, HEAD_DIM).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        w = torch.softmax((q @ k.transpose(2, 3)) / math.sqrt(HEAD_DIM), dim=-1, dtype=torch.float32).to(q.dtype)
        return self.o_proj((w @ v).transpose(1, 2).reshape(b, n, -1))   # no mask: every token sees every token


class MergerMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MergerLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, kv_heads: int):
        super().__init__()
        self.self_attn = MergerAttention(hidden, kv_heads)
        self.mlp = MergerMLP(hidden, intermediate)
        self.input_layernorm = RMSNorm(hidden)
        self.post_attention_layernorm = RMSNorm(hidden)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def grid_positions(grid_thw: torch.Tensor) -> torch.Tensor:
    """(3, 1, tokens) float positions of one image's merged tokens: t, and rows / columns scaled by 72 / grid side
    (the unmerged grid's, as the seed does)."""
    t, h, w = (int(v) for v in grid_thw.reshape(-1, 3)[0])
    gh, gw = h // SPATIAL_MERGE, w // SPATIAL_MERGE
    t_idx = (torch.arange(t) * TOKENS_PER_SECOND).repeat_interleave(gh * gw).float()
    h_idx = torch.arange(gh).view(1, -1, 1).expand(t, gh, gw).flatten() * (BASE_GRID / h)
    w_idx = torch.arange(gw).view(1, 1, -1).expand(t, gh, gw).flatten() * (BASE_GRID / w)
    return torch.stack([t_idx, h_idx.float(), w_idx.float()]).unsqueeze(1)


def mrope_cos_sin(positions: torch.Tensor, dtype, device):
    """cos and sin (1, 1, tokens, 128) of the three position rows, each frequency band taken from its section's row
    (t: the first 16 frequencies, h: the next 24, w: the last 24), as Qwen2.5-VL's multimodal rotary embedding."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32, device=device) / HEAD_DIM))
    freqs = positions.to(device=device, dtype=torch.float32)[..., None] * inv_freq     # (3, 1, n, 64)
    row = torch.repeat_interleave(torch.arange(3, device=device), torch.tensor(MROPE_SECTION, device=device))
    picked = freqs.gather(0, row.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])).squeeze(0)   # (1, n, 64)
    emb = torch.cat((picked, picked), dim=-1).unsqueeze(1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class NexusGenEmbeddingMerger(nn.Module):
    def __init__(self, hidden: int = 3584, intermediate: int = 18944, kv_heads: int = 4, layers: int = 1,
                 out_channel: int = 4096, expand: int = 4):
        super().__init__()
        if hidden % HEAD_DIM:
            raise ModelFileError(f"the embedding merger is {hidden} wide, not a multiple of the head width {HEAD_DIM}.")
        self.layers = nn.ModuleList([MergerLayer(hidden, intermediate, kv_heads) for _ in range(layers)])
        self.projector = nn.Sequential(RMSNorm(hidden), nn.Linear(hidden, out_channel * expand),
                                       RMSNorm(out_channel * expand), nn.SiLU(),
                                       nn.Linear(out_channel * expand, out_channel), RMSNorm(out_channel))

    def forward(self, embeds, embeds_grid, ref_embeds=None, ref_embeds_grid=None):
        positions, x = grid_positions(embeds_grid), embeds
        if ref_embeds is not None:
            positions = torch.cat([positions, grid_positions(ref_embeds_grid)], dim=-1)
            x = torch.cat([embeds, ref_embeds], dim=1)
        cos, sin = mrope_cos_sin(positions, x.dtype, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.projector(x)


def merger_config(sd: dict) -> dict:
    """Widths from the ``embedding_merger.*`` tensors (prefix removed)."""
    try:
        hidden = sd["projector.0.weight"].shape[0]
        wide, out = sd["projector.1.weight"].shape[0], sd["projector.4.weight"].shape[0]
        layers = len({m.group(1) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
        return dict(hidden=hidden, intermediate=sd["layers.0.mlp.gate_proj.weight"].shape[0],
                    kv_heads=sd["layers.0.self_attn.k_proj.weight"].shape[0] // HEAD_DIM, layers=layers,
                    out_channel=out, expand=wide // out)
    except KeyError as e:
        raise ModelFileError(f"the embedding merger lacks {e.args[0]!r}: the edit decoder file is "
                             f"incomplete.") from None


def adapter_config(sd: dict) -> dict:
    try:
        w = sd["adapter.0.weight"]
    except KeyError:
        raise ModelFileError("the generation adapter lacks 'adapter.0.weight': the file is incomplete.") from None
    return dict(input_dim=w.shape[1], output_dim=w.shape[0])


# ------------------------------------------------------------------------------------------------ the DiT

# The norms DiffSynth keeps inside its fused attention (no Linear, so not in the LoRA tables).
_DOUBLE_NORMS = {"attn.norm_q_a": "attn.norm_q", "attn.norm_k_a": "attn.norm_k", "attn.norm_q_b": "attn.norm_added_q",
                 "attn.norm_k_b": "attn.norm_added_k"}
_SINGLE_NORMS = {"norm_q_a": "attn.norm_q", "norm_k_a": "attn.norm_k"}
_BLOCK = re.compile(r"^(blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias)$")


def _targets(module: str):
    """(kind, diffusers module paths) of a DiffSynth module path."""
    m = re.match(r"^(blocks|single_blocks)\.(\d+)\.(.+)$", module)
    if m is None:
        kind, ts = DIFFSYNTH_TOP.get(module, (None, ()))
        return ("plain" if kind == "swap" else kind), ts      # final_norm_out is already in diffusers' order here
    blk, i, rest = m.groups()
    dst = "transformer_blocks" if blk == "blocks" else "single_transformer_blocks"
    norms = _DOUBLE_NORMS if blk == "blocks" else _SINGLE_NORMS
    if rest in norms:
        return "plain", (f"{dst}.{i}.{norms[rest]}",)
    kind, ts = (DIFFSYNTH_DOUBLE if blk == "blocks" else DIFFSYNTH_SINGLE).get(rest, (None, ()))
    return kind, tuple(f"{dst}.{i}.{t}" for t in ts)


def convert_dit(sd: dict) -> dict:
    """DiffSynth FluxDiT keys (``pipe.dit.`` removed) -> diffusers ``FluxTransformer2DModel`` keys. Only splits and
    views (works on meta tensors); an unknown key is an error naming it."""
    out, unknown = {}, []
    for key, t in sd.items():
        module, _, param = key.rpartition(".")
        kind, targets = _targets(module)
        if kind is None:
            unknown.append(key)
        elif kind == "plain":
            out[f"{targets[0]}.{param}"] = t
        elif kind == "qkv":
            if t.shape[0] % 3:
                raise ModelFileError(f"{DIT_PREFIX}{key} has {t.shape[0]} rows, not a multiple of 3 (q|k|v).")
            for target, part in zip(targets, t.chunk(3, dim=0)):
                out[f"{target}.{param}"] = part
        elif kind == "linear1":
            hidden = t.shape[1] if param == "weight" else sd[f"{module}.weight"].shape[1]
            for target, part in zip(targets, t.split([hidden, hidden, hidden, t.shape[0] - 3 * hidden], dim=0)):
                out[f"{target}.{param}"] = part
        else:  # pragma: no cover - the tables hold no other kind
            unknown.append(key)
    if unknown:
        raise ModelFileError(f"the decoder's DiT ({DIT_PREFIX}*) has tensors a FLUX.1 DiT in DiffSynth's names does "
                             f"not: {few(unknown)}.")
    return out


def split_decoder(sd: dict, label: str = "the decoder file") -> tuple:
    """(DiT tensors, adapter tensors, merger tensors, kind) of a decoder file's dict; other keys are an error."""
    dit = {k[len(DIT_PREFIX):]: v for k, v in sd.items() if k.startswith(DIT_PREFIX)}
    adapter = {k: v for k, v in sd.items() if k.startswith(ADAPTER_PREFIX)}
    merger = {k[len(MERGER_PREFIX):]: v for k, v in sd.items() if k.startswith(MERGER_PREFIX)
              and not k.endswith("rotary_emb.inv_freq")}          # a buffer the merger recomputes, if saved
    left = [k for k in sd if not k.startswith((DIT_PREFIX, ADAPTER_PREFIX, MERGER_PREFIX))]
    if left:
        raise ModelFileError(f"{label} has keys that are neither {DIT_PREFIX}*, {ADAPTER_PREFIX}* nor "
                             f"{MERGER_PREFIX}*: {few(left)}. It is not a Nexus-GenV2 decoder.", label)
    if not dit or bool(adapter) == bool(merger):
        raise ModelFileError(f"{label} is not a Nexus-GenV2 decoder: it needs {DIT_PREFIX}* keys and either "
                             f"{ADAPTER_PREFIX}* (generation_decoder.bin) or {MERGER_PREFIX}* (edit_decoder.bin).",
                             label)
    return dit, adapter, merger, (GENERATION_ROLE if adapter else EDITING_ROLE)


def unwrap(obj) -> dict:
    """The tensors of a ``torch.load`` result: a flat dict, or one nested under state_dict / module / model_state
    (as DiffSynth's loader accepts)."""
    if isinstance(obj, dict) and len(obj) == 1:
        (key, inner), = obj.items()
        if key in ("state_dict", "module", "model_state") and isinstance(inner, dict):
            return inner
    return obj


__all__ = ["EDITING_ROLE", "GENERATION_ROLE", "NexusGenAdapter", "NexusGenEmbeddingMerger", "adapter_config",
           "convert_dit", "grid_positions", "merger_config", "mrope_cos_sin", "split_decoder", "unwrap"]
