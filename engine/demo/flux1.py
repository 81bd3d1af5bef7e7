"""Small random-weight FLUX.1 models written in the official file layouts.

``write_demo_model(models_dir)`` writes ``<models_dir>/FLUX-Studio/FLUX.1-dev-random-demo/``, a miniature of the
black-forest-labs/FLUX.1-dev repository: the same file names, the same tensor key names, the same dtypes, the same
sharding scheme, only fewer blocks and narrower widths. The studio uses it to run every control on a machine without
weights (``--demo``) and the tests use it to drive the real loading code, which infers the architecture from tensor
shapes and so cannot tell these files from the 24 GB ones except by size. Images made with it are noise.

This package deliberately does not use ``engine.loading``: the layouts are written from the formats themselves
(checked against ``checkpoint-manifests/`` by ``tests/test_demo.py``), so the loader and the demo are independent and
a bug in one is caught by the other.

Layout (all relative to the demo folder)::

    flux1-dev.safetensors        BFL transformer, BF16, every key of the real file (incl. guidance_in)
    ae.safetensors               BFL autoencoder, F32
    text_encoder/                CLIP-L text layout (``text_model.*`` keys), BF16, + config.json
    text_encoder_2/              T5 v1.1 encoder, BF16, 2 shards + index (``shared.weight``, no ``encoder.embed_tokens``)
    tokenizer/                   CLIP BPE (vocab.json, merges.txt, ...), trained offline on a built-in word list
    tokenizer_2/                 T5 Unigram (spiece.model, tokenizer.json, ...), trained offline likewise
                                 (both in ``engine.demo.tokenizers``)
    transformer/, vae/           diffusers layouts (only with ``diffusers_layout=True``), written by diffusers'
                                 own ``save_pretrained``; they hold the SAME weights as flux1-dev.safetensors and
                                 ae.safetensors (converted; vae/ rounded to BF16), so BFL-path and diffusers-path
                                 loads can be compared for parity (``engine.demo.convert``).
"""
from __future__ import annotations

import math
import pathlib

from . import convert
from .files import read_marker, save_safetensors, write_folder_once, write_json
from .tokenizers import write_clip_tokenizer, write_t5_tokenizer
from .weights import RandomWeights

DEMO_MODEL_ID = "FLUX-Studio/FLUX.1-dev-random-demo"

# Bump when anything written changes (dims, init, files): an existing demo with another version is rewritten.
DEMO_VERSION = 1

MARKER_NAME = ".flux-studio-demo.json"  # written last; its presence (and matching config) means "complete"

# ---------------------------------------------------------------------------------------------------------------------
# Dimensions. The real FLUX.1-dev values are in the comments.

TRANSFORMER = dict(
    in_channels=64,          # 64  (16 latent channels x 2x2 patches)
    out_channels=64,         # 64
    hidden_size=64,          # 3072
    num_heads=2,             # 24
    head_dim=32,             # 128
    depth=2,                 # 19 double-stream blocks
    depth_single_blocks=2,   # 38 single-stream blocks
    mlp_ratio=4.0,           # 4.0
    context_in_dim=32,       # 4096 (T5 d_model)
    vec_in_dim=64,           # 768  (CLIP hidden size, the pooled vector)
    time_embed_dim=256,      # 256  (sinusoidal features into time_in / guidance_in)
    axes_dim=[4, 14, 14],    # [16, 56, 56]; sums to head_dim
    theta=10000,
    qkv_bias=True,
    guidance_embed=True,
)

AE = dict(
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=32,                   # 128
    ch_mult=[1, 2, 3, 3],    # [1, 2, 4, 4]  -> 32, 64, 96, 96 (GroupNorm(32) needs multiples of 32; the channel
                             #   changes sit at the same levels as the real [1, 2, 4, 4], so the shortcut keys match)
    num_res_blocks=1,        # 2 (the decoder has num_res_blocks + 1 per level)
    z_channels=16,           # 16 (encoder.conv_out has 2 x 16: mean and logvar)
    scale_factor=0.3611,
    shift_factor=0.1159,
)

CLIP = dict(
    hidden_size=64,          # 768
    intermediate_size=128,   # 3072
    num_hidden_layers=2,     # 12
    num_attention_heads=1,   # 12 (head_dim 64 as real, so heads = hidden / 64 holds)
    max_position_embeddings=77,
    # vocab_size: set from the tokenizer (49408 real)
)

T5 = dict(
    d_model=32,              # 4096
    d_kv=16,                 # 64
    num_heads=2,             # 64
    d_ff=64,                 # 10240
    num_layers=2,            # 24
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    # vocab_size: tokenizer size rounded up to a multiple of 128, as the real 32128 for a 32100-token tokenizer
)

# ---------------------------------------------------------------------------------------------------------------------
# Files (relative to the demo folder), the completion marker excluded.

DEMO_FILES = (
    "README.md",
    "flux1-dev.safetensors",
    "ae.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
)

DEMO_DIFFUSERS_FILES = (
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)


def demo_files(diffusers_layout: bool = True) -> list[str]:
    """Relative paths of every file ``write_demo_model`` writes (the completion marker excluded)."""
    return list(DEMO_FILES) + (list(DEMO_DIFFUSERS_FILES) if diffusers_layout else [])


def demo_dir(models_dir) -> pathlib.Path:
    return pathlib.Path(models_dir) / DEMO_MODEL_ID


# ---------------------------------------------------------------------------------------------------------------------
# Public entry point


def write_demo_model(models_dir, seed: int = 0, diffusers_layout: bool = True) -> pathlib.Path:
    """Write (once) the random-weight demo model under ``<models_dir>/FLUX-Studio/FLUX.1-dev-random-demo/``.

    Idempotent: if the folder holds a completion marker for the same version and seed (and the diffusers layout,
    when asked for) and every file is present, it returns at once. Otherwise the whole tree is built in a hidden
    temporary sibling folder, the marker written last, and the folder renamed into place, so an interrupted write
    never leaves a half model under the real name. Concurrent callers are serialised by a lock file.
    Deterministic: the same seed gives byte-identical weight files.
    """
    target = demo_dir(models_dir)

    def write(tmp):
        _write_tree(tmp, seed, diffusers_layout)
        write_json(tmp / MARKER_NAME, demo_marker(seed, diffusers_layout))     # last: it says the folder is whole

    return write_folder_once(target, lambda: is_demo_complete(target, seed, diffusers_layout), write)


def demo_marker(seed, diffusers_layout):
    return {
        "model_id": DEMO_MODEL_ID,
        "demo_version": DEMO_VERSION,
        "seed": int(seed),
        "diffusers_layout": bool(diffusers_layout),
        "files": demo_files(diffusers_layout),
    }


def is_demo_complete(target: pathlib.Path, seed, diffusers_layout) -> bool:
    m = read_marker(target / MARKER_NAME)
    if m.get("demo_version") != DEMO_VERSION or m.get("seed") != int(seed):
        return False
    if diffusers_layout and not m.get("diffusers_layout"):
        return False  # a tree without diffusers folders does not satisfy a request for them (the reverse does)
    return all((target / f).is_file() for f in demo_files(diffusers_layout))


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _write_tree(root: pathlib.Path, seed: int, diffusers_layout: bool) -> None:
    clip_tok_size = write_clip_tokenizer(root / "tokenizer")
    t5_tok_size = write_t5_tokenizer(root / "tokenizer_2")

    dit = bfl_transformer_state_dict(seed)
    save_safetensors(dit, root / "flux1-dev.safetensors")
    ae = bfl_ae_state_dict(seed)
    save_safetensors(ae, root / "ae.safetensors")

    (root / "text_encoder").mkdir()
    save_safetensors(clip_state_dict(seed, clip_tok_size), root / "text_encoder" / "model.safetensors")
    write_json(root / "text_encoder" / "config.json", clip_config(clip_tok_size))

    t5_vocab = 128 * math.ceil(t5_tok_size / 128)
    (root / "text_encoder_2").mkdir()
    _save_sharded_t5(t5_state_dict(seed, t5_vocab), root / "text_encoder_2")
    write_json(root / "text_encoder_2" / "config.json", t5_config(t5_vocab))

    if diffusers_layout:
        shards = [pathlib.PurePath(f).name for f in DEMO_DIFFUSERS_FILES
                  if f.startswith("transformer/") and f.endswith(".safetensors")]
        convert.write_diffusers(root, dit, ae, diffusers_transformer_config(), diffusers_vae_config(), shards)

    (root / "README.md").write_text(_readme(seed, diffusers_layout, clip_tok_size, t5_tok_size, t5_vocab))


def bfl_transformer_state_dict(seed: int = 0, config: dict | None = None, name: str = "flux1-dev"):
    """The BFL ``Flux`` state dict (keys of flux1-dev.safetensors) at the demo size, BF16. ``config`` overrides
    ``TRANSFORMER`` entries (other demos: e.g. Step1X's DiT has no guidance embedder)."""
    import torch

    c = {**TRANSFORMER, **(config or {})}
    h, hd = c["hidden_size"], c["head_dim"]
    mlp = int(h * c["mlp_ratio"])
    it = RandomWeights(seed, name, torch.bfloat16)
    it.linear("img_in", h, c["in_channels"])
    it.linear("time_in.in_layer", h, c["time_embed_dim"])
    it.linear("time_in.out_layer", h, h)
    it.linear("vector_in.in_layer", h, c["vec_in_dim"])
    it.linear("vector_in.out_layer", h, h)
    if c["guidance_embed"]:
        it.linear("guidance_in.in_layer", h, c["time_embed_dim"])
        it.linear("guidance_in.out_layer", h, h)
    it.linear("txt_in", h, c["context_in_dim"])
    for i in range(c["depth"]):
        p = f"double_blocks.{i}"
        for s in ("img", "txt"):
            it.linear(f"{p}.{s}_mod.lin", 6 * h, h, gain=0.5)
            it.linear(f"{p}.{s}_attn.qkv", 3 * h, h, bias=c["qkv_bias"])
            it.norm(f"{p}.{s}_attn.norm.query_norm.scale", hd)
            it.norm(f"{p}.{s}_attn.norm.key_norm.scale", hd)
            it.linear(f"{p}.{s}_attn.proj", h, h)
            it.linear(f"{p}.{s}_mlp.0", mlp, h)
            it.linear(f"{p}.{s}_mlp.2", h, mlp)
    for i in range(c["depth_single_blocks"]):
        p = f"single_blocks.{i}"
        it.linear(f"{p}.linear1", 3 * h + mlp, h)
        it.linear(f"{p}.linear2", h, h + mlp)
        it.norm(f"{p}.norm.query_norm.scale", hd)
        it.norm(f"{p}.norm.key_norm.scale", hd)
        it.linear(f"{p}.modulation.lin", 3 * h, h, gain=0.5)
    it.linear("final_layer.adaLN_modulation.1", 2 * h, h, gain=0.5)
    it.linear("final_layer.linear", c["out_channels"], h, gain=0.1)  # small final layer
    return it.sd


def bfl_ae_state_dict(seed: int = 0):
    """The BFL ``AutoEncoder`` state dict (keys of ae.safetensors) at the demo size, F32."""
    import torch

    c = AE
    it = RandomWeights(seed, "ae", torch.float32)
    ch, mult, nrb, z = c["ch"], c["ch_mult"], c["num_res_blocks"], c["z_channels"]
    n = len(mult)

    def resnet(p, cin, cout):
        it.norm(f"{p}.norm1.weight", cin, f"{p}.norm1.bias")
        it.conv(f"{p}.conv1", cout, cin, 3)
        it.norm(f"{p}.norm2.weight", cout, f"{p}.norm2.bias")
        it.conv(f"{p}.conv2", cout, cout, 3, gain=0.5)
        if cin != cout:
            it.conv(f"{p}.nin_shortcut", cout, cin, 1)

    def mid(p, cc):
        resnet(f"{p}.mid.block_1", cc, cc)
        it.norm(f"{p}.mid.attn_1.norm.weight", cc, f"{p}.mid.attn_1.norm.bias")
        for q in ("q", "k", "v", "proj_out"):
            it.conv(f"{p}.mid.attn_1.{q}", cc, cc, 1)
        resnet(f"{p}.mid.block_2", cc, cc)

    # encoder
    it.conv("encoder.conv_in", ch, c["in_channels"], 3)
    in_mult = [1] + list(mult)
    cin = ch
    for lvl in range(n):
        cin, cout = ch * in_mult[lvl], ch * mult[lvl]
        for b in range(nrb):
            resnet(f"encoder.down.{lvl}.block.{b}", cin, cout)
            cin = cout
        if lvl != n - 1:
            it.conv(f"encoder.down.{lvl}.downsample.conv", cin, cin, 3)
    mid("encoder", cin)
    it.norm("encoder.norm_out.weight", cin, "encoder.norm_out.bias")
    it.conv("encoder.conv_out", 2 * z, cin, 3)
    # decoder
    cin = ch * mult[-1]
    it.conv("decoder.conv_in", cin, z, 3)
    mid("decoder", cin)
    for lvl in reversed(range(n)):
        cout = ch * mult[lvl]
        for b in range(nrb + 1):
            resnet(f"decoder.up.{lvl}.block.{b}", cin, cout)
            cin = cout
        if lvl != 0:
            it.conv(f"decoder.up.{lvl}.upsample.conv", cin, cin, 3)
    it.norm("decoder.norm_out.weight", cin, "decoder.norm_out.bias")
    it.conv("decoder.conv_out", c["out_ch"], cin, 3)
    return it.sd


def clip_state_dict(seed: int, vocab_size: int):
    """transformers ``CLIPTextModel`` state dict as published (``text_model.`` prefix, no position_ids), BF16."""
    import torch

    c = CLIP
    h, f = c["hidden_size"], c["intermediate_size"]
    it = RandomWeights(seed, "text_encoder", torch.bfloat16)
    p = "text_model"
    it.normal(f"{p}.embeddings.token_embedding.weight", (vocab_size, h), 0.02)
    it.normal(f"{p}.embeddings.position_embedding.weight", (c["max_position_embeddings"], h), 0.01)
    for i in range(c["num_hidden_layers"]):
        q = f"{p}.encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            it.linear(f"{q}.self_attn.{proj}", h, h)
        it.norm(f"{q}.layer_norm1.weight", h, f"{q}.layer_norm1.bias")
        it.linear(f"{q}.mlp.fc1", f, h)
        it.linear(f"{q}.mlp.fc2", h, f)
        it.norm(f"{q}.layer_norm2.weight", h, f"{q}.layer_norm2.bias")
    it.norm(f"{p}.final_layer_norm.weight", h, f"{p}.final_layer_norm.bias")
    return it.sd


def clip_config(vocab_size: int) -> dict:
    # Mirrors FLUX.1-dev/text_encoder/config.json (with eos_token_id=2, the legacy value that makes CLIPTextModel pool
    # at argmax(input_ids): the tokenizer's <|endoftext|> must be its highest id, as in the real vocabulary).
    c = CLIP
    return {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": c["hidden_size"],
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate_size"],
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": c["max_position_embeddings"],
        "model_type": "clip_text_model",
        "num_attention_heads": c["num_attention_heads"],
        "num_hidden_layers": c["num_hidden_layers"],
        "pad_token_id": 1,
        "projection_dim": c["hidden_size"],
        "torch_dtype": "bfloat16",
        "vocab_size": vocab_size,
    }


def t5_state_dict(seed: int, vocab_size: int):
    """transformers ``T5EncoderModel`` state dict as published (``shared.weight``, no ``encoder.embed_tokens``), BF16."""
    import torch

    c = T5
    d, kv, nh, ff = c["d_model"], c["d_kv"], c["num_heads"], c["d_ff"]
    inner = kv * nh
    it = RandomWeights(seed, "text_encoder_2", torch.bfloat16)
    it.normal("shared.weight", (vocab_size, d), 1.0)
    for i in range(c["num_layers"]):
        p = f"encoder.block.{i}.layer"
        # T5 does not scale attention scores; its q init carries the 1/sqrt(d_kv) instead.
        it.normal(f"{p}.0.SelfAttention.q.weight", (inner, d), 1.0 / math.sqrt(d * kv))
        it.linear(f"{p}.0.SelfAttention.k", inner, d, bias=False)
        it.linear(f"{p}.0.SelfAttention.v", inner, d, bias=False)
        it.linear(f"{p}.0.SelfAttention.o", d, inner, bias=False)
        if i == 0:
            it.normal(f"{p}.0.SelfAttention.relative_attention_bias.weight",
                      (c["relative_attention_num_buckets"], nh), 0.1)
        it.norm(f"{p}.0.layer_norm.weight", d)
        it.linear(f"{p}.1.DenseReluDense.wi_0", ff, d, bias=False)
        it.linear(f"{p}.1.DenseReluDense.wi_1", ff, d, bias=False)
        it.linear(f"{p}.1.DenseReluDense.wo", d, ff, bias=False)
        it.norm(f"{p}.1.layer_norm.weight", d)
    it.norm("encoder.final_layer_norm.weight", d)
    return it.sd


def t5_config(vocab_size: int) -> dict:
    # Mirrors FLUX.1-dev/text_encoder_2/config.json (google/t5-v1_1-xxl, T5EncoderModel).
    c = T5
    return {
        "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0,
        "d_ff": c["d_ff"],
        "d_kv": c["d_kv"],
        "d_model": c["d_model"],
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_decoder_layers": c["num_layers"],
        "num_heads": c["num_heads"],
        "num_layers": c["num_layers"],
        "output_past": True,
        "pad_token_id": 0,
        "relative_attention_max_distance": c["relative_attention_max_distance"],
        "relative_attention_num_buckets": c["relative_attention_num_buckets"],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def diffusers_transformer_config() -> dict:
    return convert.transformer_config(TRANSFORMER)


def diffusers_vae_config() -> dict:
    return convert.vae_config(AE)


def _save_sharded_t5(sd, folder: pathlib.Path) -> None:
    # Shard 1: shared + the first half of the blocks; shard 2: the rest + final_layer_norm (as the real split runs).
    n = T5["num_layers"]
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]

    def shard_of(k):
        if k.startswith("encoder.block."):
            return 0 if int(k.split(".")[2]) < (n + 1) // 2 else 1
        return 0 if k == "shared.weight" else 1

    parts = [{}, {}]
    for k, v in sd.items():
        parts[shard_of(k)][k] = v
    for name, part in zip(names, parts):
        save_safetensors(part, folder / name)
    total = sum(v.numel() * v.element_size() for v in sd.values())
    write_json(folder / "model.safetensors.index.json", {
        "metadata": {"total_size": total},
        "weight_map": {k: names[shard_of(k)] for k in sorted(sd)},
    })


# ---------------------------------------------------------------------------------------------------------------------


def _readme(seed, diffusers_layout, clip_vocab, t5_tok, t5_vocab) -> str:
    t, a, c, t5 = TRANSFORMER, AE, CLIP, T5
    lines = [
        "# FLUX.1-dev random demo (FLUX Studio)",
        "",
        "**Random weights. Every image this model makes is noise.** It exists so that FLUX Studio starts and every",
        "control works on a machine without the real 24 GB weights (`python launch.py --demo`), and so that tests",
        "run the real loading code. Written by `engine/demo/flux1.py` (`write_demo_model`), seed "
        f"{seed}, demo version {DEMO_VERSION}.",
        "",
        "The files mirror the black-forest-labs/FLUX.1-dev repository: same file names, tensor key names, dtypes",
        "and sharding scheme; only fewer blocks and narrower widths. Loaders infer these sizes from tensor shapes.",
        "",
        "| file | layout | size |",
        "|---|---|---|",
        f"| flux1-dev.safetensors | BFL Flux, BF16 | hidden {t['hidden_size']} = {t['num_heads']} heads x "
        f"{t['head_dim']}, {t['depth']} double + {t['depth_single_blocks']} single blocks, context {t['context_in_dim']}, "
        f"pooled {t['vec_in_dim']}, guidance_in |",
        f"| ae.safetensors | BFL AutoEncoder, F32 | ch {a['ch']} x {a['ch_mult']}, {a['num_res_blocks']} res block "
        f"per level, z {a['z_channels']} |",
        f"| text_encoder/ | CLIP-L text (`text_model.*`), BF16 | hidden {c['hidden_size']}, {c['num_hidden_layers']} "
        f"layers, {c['num_attention_heads']} head, vocab {clip_vocab} |",
        f"| text_encoder_2/ | T5 v1.1 encoder, BF16, 2 shards + index | d_model {t5['d_model']}, {t5['num_layers']} "
        f"layers, {t5['num_heads']} heads, d_ff {t5['d_ff']}, vocab {t5_vocab} |",
        f"| tokenizer/ | CLIP BPE, trained offline on a small built-in English text | {clip_vocab} tokens |",
        f"| tokenizer_2/ | T5 SentencePiece Unigram, trained likewise | {t5_tok} tokens |",
    ]
    if diffusers_layout:
        lines += [
            "| transformer/ | diffusers FluxTransformer2DModel, BF16, 2 shards + index | same weights as "
            "flux1-dev.safetensors |",
            "| vae/ | diffusers AutoencoderKL, BF16 | same weights as ae.safetensors (rounded to BF16) |",
        ]
    lines += ["", "Delete this folder to have it rewritten.", ""]
    return "\n".join(lines)

