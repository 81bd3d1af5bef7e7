"""The IP-Adapter's attention term inside diffusers' FLUX transformer, as DiffSynth-Studio computes it.

``install(dit)`` puts an ``IPAdapterAttnProcessor`` on each of the transformer's attention modules (19 double, then 38
single blocks: index 0..56, the order of the file's ``ip_adapter.{i}``). It wraps the processor that was there: while
a call passes no ``ipadapter`` entry in ``joint_attention_kwargs`` it hands the call to that processor untouched, so
it is inert without an IP-Adapter. With one (an ``IPAdapterKV``: per block the image tokens' keys and values, and a
scale) it computes the block's attention as diffusers' ``FluxAttnProcessor`` does (same projections, RoPE and
``attention_mask``: EliGen's mask keeps working) and adds the IP term where DiffSynth-Studio's ``flux_dit.py`` does:

- double blocks: ``scale * sdpa(q_img, k_ip, v_ip)`` is added to the image stream's attention output BEFORE its
  output projection (``to_out``); ``q_img`` is the image tokens' query after its RMSNorm and WITHOUT RoPE;
- single blocks: ``scale * sdpa(q, k_ip, v_ip)`` is added to the whole attention output (text and image tokens)
  before the block's ``proj_out``; ``q`` is the query WITH RoPE.

LoRAs hook the attention's Linear layers (forward hooks), which this processor calls as the original does, so they
keep working. ``remove(dit)`` puts the original processors back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KWARG = "ipadapter"          # the joint_attention_kwargs entry


@dataclass
class IPAdapterKV:
    """What every block reads in one transformer call: ``keys[i]`` / ``values[i]`` (1, heads, T, head_dim) for
    block i, and the scale of the term."""

    keys: list
    values: list
    scale: float = 1.0


def ip_term(query_bhsd: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * attention(query, key, value)`` as (B, S, heads x head_dim)."""
    b, _h, s, _d = query_bhsd.shape
    out = F.scaled_dot_product_attention(query_bhsd, key.to(query_bhsd.dtype), value.to(query_bhsd.dtype))
    return scale * out.transpose(1, 2).reshape(b, s, -1)


class IPAdapterAttnProcessor:
    """FLUX attention with the IP-Adapter's term for block ``index`` (see the module's docstring)."""

    def __init__(self, index: int, original):
        self.index = index
        self.original = original

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor = None, image_rotary_emb=None, ipadapter: IPAdapterKV = None):
        if ipadapter is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.transformers.transformer_flux import (_get_qkv_projections, apply_rotary_emb,
                                                                    dispatch_attention_fn)
        key_ip, value_ip = ipadapter.keys[self.index], ipadapter.values[self.index]
        query, key, value, e_query, e_key, e_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        image_query = query                                   # (B, S_img, H, D), no RoPE: the double blocks' query
        if attn.added_kv_proj_dim is not None:
            e_query = attn.norm_added_q(e_query.unflatten(-1, (-1, attn.head_dim)))
            e_key = attn.norm_added_k(e_key.unflatten(-1, (-1, attn.head_dim)))
            e_value = e_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([e_query, query], dim=1)
            key = torch.cat([e_key, key], dim=1)
            value = torch.cat([e_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                    backend=getattr(self.original, "_attention_backend", None),
                                    parallel_config=getattr(self.original, "_parallel_config", None))
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:                     # single block: every token, RoPE'd query
            return out + ip_term(query.transpose(1, 2), key_ip, value_ip, ipadapter.scale)
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] -
                                            encoder_hidden_states.shape[1]], dim=1)
        image = image + ip_term(image_query.transpose(1, 2), key_ip, value_ip, ipadapter.scale)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


def attention_modules(dit) -> list:
    """The transformer's attention modules in the IP-Adapter's block order: double blocks, then single blocks."""
    blocks = list(getattr(dit, "transformer_blocks", [])) + list(getattr(dit, "single_transformer_blocks", []))
    return [b.attn for b in blocks]


def install(dit) -> int:
    """Put the IP-Adapter processor on every attention module (idempotent); returns how many blocks it covers."""
    modules = attention_modules(dit)
    for i, attn in enumerate(modules):
        current = attn.processor
        if isinstance(current, IPAdapterAttnProcessor):
            current.index = i
            continue
        attn.processor = IPAdapterAttnProcessor(i, current)
    return len(modules)


def remove(dit) -> None:
    """The original processors back."""
    for attn in attention_modules(dit):
        if isinstance(attn.processor, IPAdapterAttnProcessor):
            attn.processor = attn.processor.original


def installed(dit) -> bool:
    modules = attention_modules(dit)
    return bool(modules) and all(isinstance(a.processor, IPAdapterAttnProcessor) for a in modules)


__all__ = ["IPAdapterAttnProcessor", "IPAdapterKV", "KWARG", "attention_modules", "install", "installed", "ip_term",
           "remove"]
