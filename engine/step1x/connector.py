"""Step1X-Edit's connector: Qwen2.5-VL hidden states -> FLUX text tokens and the pooled vector.

The math is the model authors' (stepfun-ai/Step1X-Edit, ``modules/connector_edit.py``, ``Qwen2Connector``); the code
is ours. Module names are chosen so the file's ``connector.*`` keys (prefix stripped) are this module's state dict
one to one:

- ``global_proj_out`` (in -> 768): applied to the masked mean of the hidden states times ``1 + scale_factor``;
  it replaces CLIP's pooled vector.
- ``S``: a token refiner. ``t_embedder`` embeds ``1000 * t`` (sinusoid of 256, cos first, then Linear-SiLU-Linear),
  ``c_embedder`` projects the masked mean of the hidden states (Linear-SiLU-Linear); their sum ``c`` modulates
  ``depth`` pre-LayerNorm blocks (eps 1e-6) over ``input_embedder(x)``: attention (no qk-norm) gated by
  ``gate_msa``, MLP (SiLU) gated by ``gate_mlp``, where ``gate_msa, gate_mlp = Linear(SiLU(c)).chunk(2)``.
  The attention mask lets a token attend to a key only when both are real tokens, and every query may attend to
  key 0 (so padding rows are never all masked). Padded tokens still come out (the DiT sees all of them).

Widths come from the tensors: in = columns of ``S.input_embedder``, hidden = its rows, pooled = rows of
``global_proj_out``; depth = number of blocks; heads = hidden / 128 (the authors' 4096 / 32), or 1 head for a
hidden width that is not a multiple of 128 (small test models).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

FREQ_DIM = 256
HEAD_DIM = 128
PREFIX = "connector."


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class _TwoLinear(nn.Module):
    """Linear -> SiLU -> Linear, with the authors' attribute names given by ``names``."""

    def __init__(self, in_f, hidden, names=("linear_1", "linear_2")):
        super().__init__()
        self._names = names
        setattr(self, names[0], nn.Linear(in_f, hidden))
        setattr(self, names[1], nn.Linear(hidden, hidden))

    def forward(self, x):
        return getattr(self, self._names[1])(F.silu(getattr(self, self._names[0])(x)))


class _TimestepEmbedder(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))


class _Mlp(nn.Module):
    def __init__(self, hidden, mlp_hidden):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class RefinerBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio=4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attn_qkv = nn.Linear(hidden, 3 * hidden)
        self.self_attn_proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = _Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c, attn_mask):
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=1)
        b, n, _ = x.shape
        qkv = self.self_attn_qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                                   # (B, H, N, D)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        attn = attn.transpose(1, 2).reshape(b, n, -1)
        x = x + self.self_attn_proj(attn) * gate_msa.unsqueeze(1)
        x = x + self.mlp(self.norm2(x)) * gate_mlp.unsqueeze(1)
        return x


class _BlockList(nn.Module):
    def __init__(self, hidden, heads, depth):
        super().__init__()
        self.blocks = nn.ModuleList([RefinerBlock(hidden, heads) for _ in range(depth)])


class TokenRefiner(nn.Module):
    def __init__(self, in_dim, hidden, heads, depth):
        super().__init__()
        self.input_embedder = nn.Linear(in_dim, hidden)
        self.t_embedder = _TimestepEmbedder(hidden)
        self.c_embedder = _TwoLinear(in_dim, hidden)
        self.individual_token_refiner = _BlockList(hidden, heads, depth)

    def forward(self, x, t, mask):
        m = mask.to(x.dtype).unsqueeze(-1)
        c = self.t_embedder(t) + self.c_embedder((x * m).sum(dim=1) / m.sum(dim=1))
        keep = mask.bool()
        attn_mask = (keep[:, None, None, :] & keep[:, None, :, None]).clone()   # (B, 1, N, N)
        attn_mask[:, :, :, 0] = True
        h = self.input_embedder(x)
        for block in self.individual_token_refiner.blocks:
            h = block(h, c, attn_mask)
        return h


class Step1XConnector(nn.Module):
    """``forward(hidden_states [B, L, in], sigma [B], mask [B, L]) -> (tokens [B, L, hidden], pooled [B, pooled])``.

    ``sigma`` is the flow-matching time in [0, 1] (the authors pass the DiT's timestep and multiply by 1000 here).
    """

    def __init__(self, in_dim=3584, hidden=4096, pooled_dim=768, depth=2, heads=None):
        super().__init__()
        heads = heads or (hidden // HEAD_DIM if hidden % HEAD_DIM == 0 else 1)
        self.config = dict(in_dim=in_dim, hidden=hidden, pooled_dim=pooled_dim, depth=depth, heads=heads)
        self.S = TokenRefiner(in_dim, hidden, heads, depth)
        self.global_proj_out = nn.Linear(in_dim, pooled_dim)
        self.scale_factor = nn.Parameter(torch.full((1,), -(1 - 0.09)))

    def forward(self, x, sigma, mask):
        t = sigma * 1000
        m = mask.to(x.dtype).unsqueeze(-1)
        x_mean = (x * m).sum(dim=1) / m.sum(dim=1) * (1 + self.scale_factor.to(x.dtype))
        pooled = self.global_proj_out(x_mean)
        return self.S(x, t, mask), pooled


def split_connector(sd) -> dict:
    """The ``connector.*`` tensors of a Step1X-Edit file, prefix stripped."""
    return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}


def infer_connector_config(sd) -> dict:
    """``Step1XConnector(**cfg)`` kwargs from its (prefix-stripped) tensors' shapes."""
    from ..loading.errors import ModelFileError
    try:
        hidden, in_dim = sd["S.input_embedder.weight"].shape
        pooled = sd["global_proj_out.weight"].shape[0]
    except KeyError as e:
        raise ModelFileError(f"the Step1X connector lacks connector.{e.args[0]}: the file is incomplete.") from None
    depth = len({m.group(1) for k in sd if (m := re.match(r"S\.individual_token_refiner\.blocks\.(\d+)\.", k))})
    return dict(in_dim=int(in_dim), hidden=int(hidden), pooled_dim=int(pooled), depth=depth)


def build_connector(cfg: dict) -> Step1XConnector:
    return Step1XConnector(**cfg)
