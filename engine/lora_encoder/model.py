"""DiffSynth-Studio's LoRA Encoder for FLUX.1-dev: a LoRA's weights -> one prompt token (1, 1, 4096).

The math (the seed's ``diffsynth/models/flux_lora_encoder.py``, written here from its description):

- one learned query ``x`` (1, 16, in) per transformer linear layer (304 = 19 double blocks x 10 + 38 single x 3,
  named as DiffSynth's FluxDiT names them: ``blocks.0.attn.a_to_qkv``, ``single_blocks.5.to_qkv_mlp``, ...);
  the layer's LoRA acts on it, ``LN(x @ Aᵀ @ Bᵀ)`` (a LayerNorm over the layer's output width), and a projection
  per layer TYPE (``attn.a_to_qkv``, ``ff_a.0``, ...) takes the 16 results to the token width (4096)
- the 304 x 16 tokens follow one learned special token through one CLIP-style encoder layer (32 heads of 128,
  quick-GELU MLP); the special token's output, LayerNorm'd and through a last linear, is the LoRA's token.

The key names are the official file's (``embedder.model_dict.blocks___0___attn___a_to_qkv.x``, ``encoders.0.*``,
``special_embeds``, ...), so the file loads one to one. Widths, block counts, tokens per layer and the encoder's
depth come from the tensor shapes (tests build small ones).

A LoRA reaches the encoder in diffusers' module names (``engine.lora.read_lora``: any of the engine's formats), where
DiffSynth's fused layers are split (``a_to_qkv`` -> ``attn.to_q/k/v``, ``to_qkv_mlp`` -> ``attn.to_q/k/v`` +
``proj_mlp``). ``layer_pieces`` puts them back in the fused layer's row order; ``x @ Aᵀ @ Bᵀ`` of the fused pair the
seed builds (A stacked, B block-diagonal) is the concatenation of each piece's ``x @ Aⱼᵀ @ Bⱼᵀ``, which is what
``LayerBlock`` computes. A single block's missing ``proj_mlp`` part is zeros, as the seed's converter fills it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

ROLE = "lora_encoder"
HEAD_WIDTH = 128            # the official encoder layer: 4096 wide, 32 heads of 128

# DiffSynth's FluxDiT layer (suffix after ``blocks.<i>.``) -> diffusers' FluxTransformer2DModel layers, in the fused
# layer's row order; the seed's LoRAEmbedder lists them in this order.
DOUBLE_LAYERS = {
    "attn.a_to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.a_to_out": ("attn.to_out.0",),
    "ff_a.0": ("ff.net.0.proj",),
    "ff_a.2": ("ff.net.2",),
    "norm1_a.linear": ("norm1.linear",),
    "attn.b_to_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "attn.b_to_out": ("attn.to_add_out",),
    "ff_b.0": ("ff_context.net.0.proj",),
    "ff_b.2": ("ff_context.net.2",),
    "norm1_b.linear": ("norm1_context.linear",),
}
SINGLE_LAYERS = {
    "to_qkv_mlp": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "proj_out": ("proj_out",),
    "norm.linear": ("norm.linear",),
}
OPTIONAL = {"proj_mlp"}     # the seed fills a missing single-block MLP part with zeros
_NAME = re.compile(r"^embedder\.model_dict\.(single_blocks|blocks)___(\d+)___(.+)\.x$")


def dotted(name: str) -> str:
    return name.replace("___", ".")


def undotted(name: str) -> str:
    return name.replace(".", "___")


@dataclass(frozen=True)
class LayerSpec:
    name: str                # DiffSynth's name: "blocks.0.attn.a_to_qkv"
    kind: str                # its type (which projection reads it): "attn.a_to_qkv"
    dim_in: int
    dim_out: int
    targets: tuple           # diffusers' module names, in row order: ("transformer_blocks.0.attn.to_q", ...)


def layer_specs(double_blocks: int, single_blocks: int, widths: dict) -> list:
    """The encoder's layers in the seed's order. ``widths``: {name: (in, out)}."""
    out = []
    for i in range(double_blocks):
        for kind, targets in DOUBLE_LAYERS.items():
            name = f"blocks.{i}.{kind}"
            out.append(LayerSpec(name, kind, *widths[name], tuple(f"transformer_blocks.{i}.{t}" for t in targets)))
    for i in range(single_blocks):
        for kind, targets in SINGLE_LAYERS.items():
            name = f"single_blocks.{i}.{kind}"
            out.append(LayerSpec(name, kind, *widths[name],
                                 tuple(f"single_transformer_blocks.{i}.{t}" for t in targets)))
    return out


def infer_config(sd: dict) -> dict:
    """The architecture from the tensor shapes of an official-layout state dict (meta tensors are enough)."""
    from ..loading.errors import ModelFileError
    if "special_embeds" not in sd:
        raise ModelFileError("no special_embeds tensor: this is not DiffSynth-Studio's LoRA Encoder.")
    blocks = {"blocks": set(), "single_blocks": set()}
    widths, tokens = {}, set()
    for key, t in sd.items():
        m = _NAME.match(key)
        if not m:
            continue
        blocks[m.group(1)].add(int(m.group(2)))
        name = dotted(key[len("embedder.model_dict."):-len(".x")])
        ln = sd.get(f"embedder.model_dict.{undotted(name)}.layer_norm.weight")
        if ln is None:
            raise ModelFileError(f"embedder.model_dict.{undotted(name)} has no layer_norm.weight.")
        widths[name] = (int(t.shape[-1]), int(ln.shape[0]))
        tokens.add(int(t.shape[1]))
    depth = len({k.split(".")[1] for k in sd if k.startswith("encoders.")})
    if not widths or not depth or len(tokens) != 1:
        raise ModelFileError("the LoRA Encoder's embedder (embedder.model_dict.*.x, one token count) or its encoder "
                             "layers (encoders.*) are missing.")
    double, single = max(blocks["blocks"], default=-1) + 1, max(blocks["single_blocks"], default=-1) + 1
    width = int(sd["special_embeds"].shape[-1])
    cfg = dict(double_blocks=double, single_blocks=single, widths=widths, tokens_per_layer=tokens.pop(),
               width=width, intermediate=int(sd["encoders.0.fc1.weight"].shape[0]), depth=depth,
               heads=width // HEAD_WIDTH if width % HEAD_WIDTH == 0 else 1,
               special_tokens=int(sd["special_embeds"].shape[1]))
    try:
        layer_specs(double, single, widths)
    except KeyError as e:
        raise ModelFileError(f"the embedder has no layer {e.args[0]} (blocks must each have all their layers).") from e
    return cfg


# ------------------------------------------------------------------------------------------------------ modules
class LayerBlock(nn.Module):
    """One transformer layer's query ``x`` (1, L, in) and the LayerNorm over its output width."""

    def __init__(self, tokens: int, dim_in: int, dim_out: int):
        super().__init__()
        self.x = nn.Parameter(torch.zeros(1, tokens, dim_in))
        self.layer_norm = nn.LayerNorm(dim_out)

    def forward(self, pieces) -> torch.Tensor:
        """``pieces``: [(A [r, in], B [out_j, r], scale) or an int width of zeros], in row order."""
        x = self.x
        parts = [x.new_zeros(*x.shape[:2], p) if isinstance(p, int) else (x @ p[0].T @ p[1].T) * p[2]
                 for p in pieces]
        return self.layer_norm(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])


class Embedder(nn.Module):
    def __init__(self, specs: list, tokens: int, width: int):
        super().__init__()
        self.specs = specs
        self.model_dict = nn.ModuleDict({undotted(s.name): LayerBlock(tokens, s.dim_in, s.dim_out) for s in specs})
        kinds = {}
        for s in specs:
            kinds.setdefault(undotted(s.kind), s.dim_out)
        self.proj_dict = nn.ModuleDict({k: nn.Linear(d, width) for k, d in kinds.items()})

    def forward(self, pieces: dict) -> torch.Tensor:
        out = [self.proj_dict[undotted(s.kind)](self.model_dict[undotted(s.name)](pieces[s.name]))
               for s in self.specs]
        return torch.cat(out, dim=1)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, q, kv):
        """Queries from ``q``, keys and values from ``kv`` (the same tokens, or ``q`` their first rows)."""
        b, w = kv.shape[0], kv.shape[-1]

        def split(t):
            return t.view(b, t.shape[1], self.heads, w // self.heads).transpose(1, 2)
        y = nn.functional.scaled_dot_product_attention(split(self.to_q(q)), split(self.to_k(kv)), split(self.to_v(kv)))
        return self.to_out(y.transpose(1, 2).reshape(b, q.shape[1], w))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer, CLIP's: attention then a quick-GELU MLP, each with a residual."""

    def __init__(self, width: int, intermediate: int, heads: int):
        super().__init__()
        self.attn = Attention(width, heads)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, intermediate), nn.Linear(intermediate, width)

    def forward(self, x, keep: int | None = None):
        """``keep``: compute only the first ``keep`` tokens' outputs (every token still serves as key and value);
        each row's result is the same as in the full pass."""
        h = self.layer_norm1(x)
        q = h if keep is None else h[:, :keep]
        x = (x if keep is None else x[:, :keep]) + self.attn(q, h)
        h = self.fc1(self.layer_norm2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))


class FluxLoRAEncoder(nn.Module):
    def __init__(self, double_blocks: int, single_blocks: int, widths: dict, tokens_per_layer: int = 16,
                 width: int = 4096, intermediate: int = 8192, depth: int = 1, heads: int = 32,
                 special_tokens: int = 1):
        super().__init__()
        self.specs = layer_specs(double_blocks, single_blocks, widths)
        self.embedder = Embedder(self.specs, tokens_per_layer, width)
        self.encoders = nn.ModuleList(EncoderLayer(width, intermediate, heads) for _ in range(depth))
        self.special_embeds = nn.Parameter(torch.zeros(1, special_tokens, width))
        self.final_layer_norm = nn.LayerNorm(width)
        self.final_linear = nn.Linear(width, width)

    @property
    def width(self) -> int:
        return int(self.special_embeds.shape[-1])

    def forward(self, pieces: dict) -> torch.Tensor:
        """``pieces`` ({layer name: its pieces}, ``layer_pieces``) -> (1, special tokens, width)."""
        tokens = self.embedder(pieces)
        x = torch.cat([self.special_embeds.to(tokens.dtype), tokens], dim=1)
        n = self.special_embeds.shape[1]
        for i, layer in enumerate(self.encoders):
            # only the special tokens are read out: the last layer computes their rows alone (~4x less work at the
            # official size: the MLP and the queries of 1 token instead of 4865)
            x = layer(x, keep=n if i == len(self.encoders) - 1 else None)
        return self.final_linear(self.final_layer_norm(x[:, :n]))


def build(cfg: dict) -> FluxLoRAEncoder:
    return FluxLoRAEncoder(**cfg)


def describe(cfg: dict) -> str:
    n = len(cfg["widths"])
    return (f"DiffSynth-Studio's LoRA Encoder ({n} layers: {cfg['double_blocks']} double + {cfg['single_blocks']} "
            f"single blocks, {cfg['tokens_per_layer']} tokens each -> 1 token of {cfg['width']})")


def is_lora_encoder(keys) -> bool:
    ks = set(keys)
    return "special_embeds" in ks and "final_linear.weight" in ks and any(k.startswith("embedder.model_dict.")
                                                                            for k in ks)


__all__ = ["ROLE", "FluxLoRAEncoder", "LayerSpec", "build", "describe", "infer_config", "is_lora_encoder",
           "layer_specs", "DOUBLE_LAYERS", "SINGLE_LAYERS"]
