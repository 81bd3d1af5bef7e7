"""CLIP-L (``text_encoder/``) and T5-XXL encoder (``text_encoder_2/``) onto transformers' model classes.

CLIP: the published file's keys start with ``text_model.`` (the transformers 4 module tree); transformers 5's
``CLIPTextModel`` has no ``text_model`` submodule and only strips that prefix inside ``from_pretrained``, so a plain
``load_state_dict`` needs it removed. ``embeddings.position_ids`` is a non-persistent buffer (absent from the file);
``text_projection``/``logit_scale`` (present in some single-file CLIP-L exports) have no place in
``CLIPTextModel`` and are dropped. Shapes give hidden, layers, intermediate, vocab and positions; heads =
hidden/64 (CLIP's head width; 12 for CLIP-L). As FLUX.1-dev's ``text_encoder/config.json``: quick_gelu,
``bos/pad/eos_token_id = 0/1/2`` -- eos 2 makes transformers take the pooled output at argmax(input_ids), the
end-of-text token being the largest id, which is what FLUX (and diffusers' pipeline) use.

T5: the file has ``shared.weight`` but not ``encoder.embed_tokens.weight``: the embedding is tied to ``shared``
after loading. Shapes give d_model, d_ff (``wi_0``/``wi_1``: gated-gelu; a single ``wi``: relu, T5 v1.0), layers,
heads and buckets from ``relative_attention_bias`` ([buckets, heads]), d_kv = q rows / heads, vocab from
``shared``. A ``config.json`` beside the files is preferred for both encoders when it is of the right kind.
"""
from __future__ import annotations

import re

from .errors import ModelFileError, few

CLIP_HEAD_DIM = 64
CLIP_DROP = ("embeddings.position_ids", "text_projection.weight", "logit_scale")


def _get(sd, key, what):
    try:
        return sd[key]
    except KeyError:
        raise ModelFileError(f"the {what} checkpoint lacks {key!r}: the file is incomplete.") from None


def _count(keys, pattern) -> int:
    found = sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})
    if found != list(range(len(found))):
        raise ModelFileError(f"layers numbered {found[:8]}… are not 0..n-1: the file is incomplete.")
    return len(found)


# ---------------------------------------------------------------------------------------------------- CLIP-L

def convert_clip(sd) -> dict:
    """Published ``text_model.*`` keys -> transformers 5 ``CLIPTextModel.state_dict()`` keys."""
    out = {}
    for k, v in sd.items():
        k2 = k[len("text_model."):] if k.startswith("text_model.") else k
        if k2 in CLIP_DROP:
            continue
        out[k2] = v
    return out


def infer_clip_config(sd, config_json: dict | None = None):
    """A ``CLIPTextConfig`` from config.json (when it describes a CLIP text model) or else from the shapes."""
    from transformers import CLIPTextConfig

    if config_json:
        if config_json.get("model_type") == "clip_text_model":
            return CLIPTextConfig.from_dict(config_json)
        if config_json.get("model_type") == "clip" and isinstance(config_json.get("text_config"), dict):
            return CLIPTextConfig.from_dict(config_json["text_config"])
    sd = convert_clip(sd)
    vocab, hidden = _get(sd, "embeddings.token_embedding.weight", "CLIP").shape
    if hidden % CLIP_HEAD_DIM:
        raise ModelFileError(f"CLIP width {hidden} is not a multiple of CLIP's head width {CLIP_HEAD_DIM}.")
    return CLIPTextConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(_get(sd, "encoder.layers.0.mlp.fc1.weight", "CLIP").shape[0]),
        projection_dim=int(hidden),
        num_hidden_layers=_count(sd, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=int(hidden) // CLIP_HEAD_DIM,
        max_position_embeddings=int(_get(sd, "embeddings.position_embedding.weight", "CLIP").shape[0]),
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )


def build_clip(config):
    from transformers import CLIPTextModel

    return CLIPTextModel(config)


# ---------------------------------------------------------------------------------------------------- T5

def convert_t5(sd) -> dict:
    """T5 encoder keys as published; an ``encoder.embed_tokens.weight`` without ``shared.weight`` becomes ``shared``
    (the loader re-ties ``encoder.embed_tokens`` to it). A duplicate ``encoder.embed_tokens.weight`` is dropped."""
    out = dict(sd)
    if "encoder.embed_tokens.weight" in out:
        emb = out.pop("encoder.embed_tokens.weight")
        out.setdefault("shared.weight", emb)
    return out


def infer_t5_config(sd, config_json: dict | None = None):
    """A ``T5Config`` from config.json (when it is a T5 config) or else from the shapes."""
    from transformers import T5Config

    if config_json and config_json.get("model_type") in ("t5", "umt5"):
        if config_json.get("model_type") == "umt5":
            raise ModelFileError("this is a UMT5 encoder config; FLUX.1 uses T5 v1.1 XXL.")
        return T5Config.from_dict(config_json)
    sd = convert_t5(sd)
    vocab, d_model = _get(sd, "shared.weight", "T5").shape
    buckets, heads = _get(sd, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "T5").shape
    inner = _get(sd, "encoder.block.0.layer.0.SelfAttention.q.weight", "T5").shape[0]
    if inner % heads:
        raise ModelFileError(f"T5 attention width {inner} is not a multiple of its {heads} heads.")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    wi = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")
    layers = _count(sd, r"encoder\.block\.(\d+)\.")
    return T5Config(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(inner // heads),
        d_ff=int(_get(sd, wi, "T5").shape[0]),
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=int(heads),
        relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu",
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def build_t5(config):
    from transformers import T5EncoderModel

    return T5EncoderModel(config)


def check_no_decoder(sd):
    dec = [k for k in sd if k.startswith(("decoder.", "lm_head."))]
    if dec:
        raise ModelFileError(f"this is a full T5 (encoder-decoder: {few(dec, 2)}); FLUX needs the encoder only "
                             f"(text_encoder_2 of the FLUX.1 repository).")
