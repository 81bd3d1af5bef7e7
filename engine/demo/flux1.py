"""Small random-weight FLUX.1 models written in the official file layouts.

``write_demo_model(models_dir)`` writes ``<models_dir>/FLUX-Studio/FLUX.1-dev-random-demo/``, a miniature of the
black-forest-labs/FLUX.1-dev repository: the same file names, the same tensor key names, the same dtypes, the same
sharding scheme, only fewer blocks and narrower widths. The studio uses it to run every control on a machine without
weights (``--demo``) and the tests use it to drive the real loading code, which infers the architecture from tensor
shapes and so cannot tell these files from the 24 GB ones except by size. Images made with it are noise.

This module deliberately does not use ``engine.loading``: the layouts are written from the formats themselves
(checked against ``checkpoint-manifests/`` by ``tests/test_demo.py``), so the loader and the demo are independent and
a bug in one is caught by the other.

Layout (all relative to the demo folder)::

    flux1-dev.safetensors        BFL transformer, BF16, every key of the real file (incl. guidance_in)
    ae.safetensors               BFL autoencoder, F32
    text_encoder/                CLIP-L text layout (``text_model.*`` keys), BF16, + config.json
    text_encoder_2/              T5 v1.1 encoder, BF16, 2 shards + index (``shared.weight``, no ``encoder.embed_tokens``)
    tokenizer/                   CLIP BPE (vocab.json, merges.txt, ...), trained offline on a built-in word list
    tokenizer_2/                 T5 Unigram (spiece.model, tokenizer.json, ...), trained offline likewise
    transformer/, vae/           diffusers layouts (only with ``diffusers_layout=True``), written by diffusers'
                                 own ``save_pretrained``; they hold the SAME weights as flux1-dev.safetensors and
                                 ae.safetensors (converted; vae/ rounded to BF16), so BFL-path and diffusers-path
                                 loads can be compared for parity.
"""
from __future__ import annotations

import contextlib
import json
import math
import pathlib
import zlib

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

DEMO_CONFIG = {"transformer": TRANSFORMER, "ae": AE, "clip": CLIP, "t5": T5}

# ---------------------------------------------------------------------------------------------------------------------
# Files (relative to the demo folder). The registry points at these.

DEMO_COMPONENT_FILES = {
    "dit": "flux1-dev.safetensors",
    "vae": "ae.safetensors",
    "text_encoder_1": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/",
    "tokenizer_1": "tokenizer/",
    "tokenizer_2": "tokenizer_2/",
    "transformer_diffusers": "transformer/",  # only with diffusers_layout=True
    "vae_diffusers": "vae/",                  # only with diffusers_layout=True
}

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
    from .files import write_folder_once
    target = demo_dir(models_dir)

    def write(tmp):
        _write_tree(tmp, seed, diffusers_layout)
        _write_json(tmp / MARKER_NAME, demo_marker(seed, diffusers_layout))     # last: it says the folder is whole

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
    try:
        m = json.loads((target / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if m.get("demo_version") != DEMO_VERSION or m.get("seed") != int(seed):
        return False
    if diffusers_layout and not m.get("diffusers_layout"):
        return False  # a tree without diffusers folders does not satisfy a request for them (the reverse does)
    return all((target / f).is_file() for f in demo_files(diffusers_layout))


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _write_tree(root: pathlib.Path, seed: int, diffusers_layout: bool) -> None:
    clip_tok_size = _write_clip_tokenizer(root / "tokenizer")
    t5_tok_size = _write_t5_tokenizer(root / "tokenizer_2")

    dit = bfl_transformer_state_dict(seed)
    _save_safetensors(dit, root / "flux1-dev.safetensors")
    ae = bfl_ae_state_dict(seed)
    _save_safetensors(ae, root / "ae.safetensors")

    (root / "text_encoder").mkdir()
    _save_safetensors(clip_state_dict(seed, clip_tok_size), root / "text_encoder" / "model.safetensors")
    _write_json(root / "text_encoder" / "config.json", clip_config(clip_tok_size))

    t5_vocab = 128 * math.ceil(t5_tok_size / 128)
    (root / "text_encoder_2").mkdir()
    _save_sharded_t5(t5_state_dict(seed, t5_vocab), root / "text_encoder_2")
    _write_json(root / "text_encoder_2" / "config.json", t5_config(t5_vocab))

    if diffusers_layout:
        _write_diffusers(root, dit, ae)

    (root / "README.md").write_text(_readme(seed, diffusers_layout, clip_tok_size, t5_tok_size, t5_vocab))


def _save_safetensors(sd, path: pathlib.Path, metadata=None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata or {"format": "pt"})


def _write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _generator(seed: int, name: str):
    import torch

    # One stream per component, so changing one component never changes the others' weights.
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


class _Init:
    """Draws tensors in a fixed order from a seeded generator (float32), cast to the file's dtype."""

    def __init__(self, seed, name, dtype):
        import torch

        self.torch = torch
        self.g = _generator(seed, name)
        self.dtype = dtype
        self.sd = {}

    def normal(self, key, shape, std, mean=0.0):
        t = self.torch.randn(shape, generator=self.g, dtype=self.torch.float32) * std + mean
        self.sd[key] = t.to(self.dtype)

    def linear(self, prefix, out_f, in_f, bias=True, gain=1.0):
        # ~N(0, 1/fan_in): activations keep unit scale through the stack.
        self.normal(prefix + ".weight", (out_f, in_f), gain / math.sqrt(in_f))
        if bias:
            self.normal(prefix + ".bias", (out_f,), 0.05)

    def conv(self, prefix, out_c, in_c, k, gain=1.0):
        self.normal(prefix + ".weight", (out_c, in_c, k, k), gain / math.sqrt(in_c * k * k))
        self.normal(prefix + ".bias", (out_c,), 0.05)

    def norm(self, key_weight, n, key_bias=None):
        # Scales near 1 (not exactly 1) so a swapped or dropped norm shows up in parity tests.
        self.normal(key_weight, (n,), 0.1, mean=1.0)
        if key_bias:
            self.normal(key_bias, (n,), 0.05)


def bfl_transformer_state_dict(seed: int = 0, config: dict | None = None, name: str = "flux1-dev"):
    """The BFL ``Flux`` state dict (keys of flux1-dev.safetensors) at the demo size, BF16. ``config`` overrides
    ``TRANSFORMER`` entries (other demos: e.g. Step1X's DiT has no guidance embedder)."""
    import torch

    c = {**TRANSFORMER, **(config or {})}
    h, hd = c["hidden_size"], c["head_dim"]
    mlp = int(h * c["mlp_ratio"])
    it = _Init(seed, name, torch.bfloat16)
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
    it = _Init(seed, "ae", torch.float32)
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
    it = _Init(seed, "text_encoder", torch.bfloat16)
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
    it = _Init(seed, "text_encoder_2", torch.bfloat16)
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
        _save_safetensors(part, folder / name)
    total = sum(v.numel() * v.element_size() for v in sd.values())
    _write_json(folder / "model.safetensors.index.json", {
        "metadata": {"total_size": total},
        "weight_map": {k: names[shard_of(k)] for k in sorted(sd)},
    })


# ---------------------------------------------------------------------------------------------------------------------
# diffusers layouts (same weights as the BFL files)


def bfl_to_diffusers_transformer(sd):
    """BFL transformer keys -> diffusers ``FluxTransformer2DModel`` keys; widths are taken from the tensors."""
    out = {}
    h = sd["img_in.weight"].shape[0]

    def cp(src, dst):
        for s in ("weight", "bias"):
            if f"{src}.{s}" in sd:
                out[f"{dst}.{s}"] = sd[f"{src}.{s}"]

    cp("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    cp("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    cp("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    cp("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    cp("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
    cp("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    cp("txt_in", "context_embedder")
    cp("img_in", "x_embedder")
    n_double = len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_blocks.")})
    for i in range(n_double):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        cp(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        cp(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        for s in ("weight", "bias"):
            q, k, v = sd[f"{b}.img_attn.qkv.{s}"].split(h, dim=0)
            out[f"{d}.attn.to_q.{s}"], out[f"{d}.attn.to_k.{s}"], out[f"{d}.attn.to_v.{s}"] = q, k, v
            q, k, v = sd[f"{b}.txt_attn.qkv.{s}"].split(h, dim=0)
            out[f"{d}.attn.add_q_proj.{s}"], out[f"{d}.attn.add_k_proj.{s}"], out[f"{d}.attn.add_v_proj.{s}"] = q, k, v
        out[f"{d}.attn.norm_q.weight"] = sd[f"{b}.img_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{b}.img_attn.norm.key_norm.scale"]
        out[f"{d}.attn.norm_added_q.weight"] = sd[f"{b}.txt_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_added_k.weight"] = sd[f"{b}.txt_attn.norm.key_norm.scale"]
        cp(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        cp(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
        cp(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        cp(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        cp(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        cp(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
    for i in range(n_single):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for s in ("weight", "bias"):
            t = sd[f"{b}.linear1.{s}"]
            q, k, v, m = t.split([h, h, h, t.shape[0] - 3 * h], dim=0)
            out[f"{d}.attn.to_q.{s}"], out[f"{d}.attn.to_k.{s}"], out[f"{d}.attn.to_v.{s}"] = q, k, v
            out[f"{d}.proj_mlp.{s}"] = m
        out[f"{d}.attn.norm_q.weight"] = sd[f"{b}.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{b}.norm.key_norm.scale"]
        cp(f"{b}.linear2", f"{d}.proj_out")
        cp(f"{b}.modulation.lin", f"{d}.norm.linear")
    cp("final_layer.linear", "proj_out")
    for s in ("weight", "bias"):  # BFL final adaLN gives (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift)
        shift, scale = sd[f"final_layer.adaLN_modulation.1.{s}"].chunk(2, dim=0)
        out[f"norm_out.linear.{s}"] = __import__("torch").cat([scale, shift], dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def bfl_to_diffusers_vae(sd, num_levels: int):
    """BFL autoencoder keys -> diffusers ``AutoencoderKL`` keys (1x1 conv attention -> linear)."""
    import re

    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", n)
        n = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", n)
        n = re.sub(r"^decoder\.up\.(\d+)\.block\.",
                   lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.resnets.", n)
        n = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                   lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.", n)
        n = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", n)
        n = n.replace(".mid.attn_1.", ".mid_block.attentions.0.")
        n = n.replace(".nin_shortcut.", ".conv_shortcut.")
        n = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", n)
        if ".mid_block.attentions.0." in n:
            n = n.replace(".attentions.0.norm.", ".attentions.0.group_norm.")
            n = re.sub(r"\.attentions\.0\.(q|k|v)\.", r".attentions.0.to_\1.", n)
            n = n.replace(".attentions.0.proj_out.", ".attentions.0.to_out.0.")
            if v.ndim == 4:
                v = v[:, :, 0, 0]
        out[n] = v.contiguous()
    return out


def diffusers_transformer_config() -> dict:
    c = TRANSFORMER
    return dict(
        patch_size=1,
        in_channels=c["in_channels"],
        out_channels=None,
        num_layers=c["depth"],
        num_single_layers=c["depth_single_blocks"],
        attention_head_dim=c["head_dim"],
        num_attention_heads=c["num_heads"],
        joint_attention_dim=c["context_in_dim"],
        pooled_projection_dim=c["vec_in_dim"],
        guidance_embeds=c["guidance_embed"],
        axes_dims_rope=tuple(c["axes_dim"]),
    )


def diffusers_vae_config() -> dict:
    c = AE
    n = len(c["ch_mult"])
    return dict(
        in_channels=c["in_channels"],
        out_channels=c["out_ch"],
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(c["ch"] * m for m in c["ch_mult"]),
        layers_per_block=c["num_res_blocks"],
        act_fn="silu",
        latent_channels=c["z_channels"],
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=c["scale_factor"],
        shift_factor=c["shift_factor"],
        latents_mean=None,
        latents_std=None,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def _write_diffusers(root: pathlib.Path, dit_sd, ae_sd) -> None:
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    with torch.device("meta"):  # no init work: every parameter is assigned from the converted BFL weights
        dit = FluxTransformer2DModel(**diffusers_transformer_config())
        vae = AutoencoderKL(**diffusers_vae_config())
    dit.load_state_dict(bfl_to_diffusers_transformer(dit_sd), strict=True, assign=True)
    vae_sd = {k: v.to(torch.bfloat16) for k, v in bfl_to_diffusers_vae(ae_sd, len(AE["ch_mult"])).items()}
    vae.load_state_dict(vae_sd, strict=True, assign=True)
    for m in (dit, vae):
        bad = [n for n, t in list(m.named_parameters()) + list(m.named_buffers()) if t.is_meta]
        if bad:
            raise RuntimeError(f"demo: diffusers model left on meta: {bad[:5]}")
    # Two shards like the real three-shard transformer/ (load through the index, never by shard name).
    total = sum(v.numel() * v.element_size() for v in dit_sd.values())
    with contextlib.redirect_stdout(None):
        dit.save_pretrained(root / "transformer", safe_serialization=True, max_shard_size=int(total * 0.6))
        vae.save_pretrained(root / "vae", safe_serialization=True)
    got = sorted(p.name for p in (root / "transformer").glob("*.safetensors"))
    want = [pathlib.PurePath(f).name for f in DEMO_DIFFUSERS_FILES if f.startswith("transformer/") and f.endswith(".safetensors")]
    if got != want:
        raise RuntimeError(f"demo: diffusers wrote transformer shards {got}, expected {want}")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers, trained offline on a built-in text (deterministic)

_CORPUS = """\
a cat on a mat. a cat sitting on a red mat in the sun.
a photo of a dog running on the beach at sunset, golden hour, high detail.
portrait of a young woman with long silver hair and blue eyes, soft light, studio photo.
an old man with a white beard reading a book by the window, film grain.
a bowl of fresh fruit on a wooden table: apples, oranges, grapes and a banana.
a red sports car parked on a wet street at night, neon signs, reflections.
a small house in the mountains covered with snow, pine trees, clear blue sky.
an astronaut riding a horse on the moon, oil painting, dramatic lighting.
a castle on a hill above a quiet lake, fog in the morning, fantasy art.
a close up of a yellow flower with a bee, macro photography, shallow depth of field.
a city skyline seen from above, skyscrapers, clouds, aerial view, 4k.
a girl in a green dress dancing in the rain, umbrella, cinematic.
a bird sitting on a branch of a cherry tree in spring, pink blossoms.
the quick brown fox jumps over the lazy dog.
a cup of hot coffee and a croissant on a plate, breakfast, cozy cafe.
a robot playing chess against a child in a library, warm colors.
a ship sailing across the ocean during a storm, huge waves, lightning.
a forest path with tall trees and sunlight through the leaves, autumn colors.
an owl with big orange eyes in the dark woods, moonlight.
a bicycle leaning against a brick wall, green door, flower pots.
a watercolor painting of a river valley with hills and a small bridge.
a pencil sketch of a horse, black and white, simple lines.
a knight in shining armor holding a sword and a shield, epic scene.
a plate of pasta with tomato sauce and basil, top view, food photo.
a frog wearing a tiny hat, sitting on a leaf, cute, 3d render.
a desert with sand dunes under a starry sky, milky way, long exposure.
a lighthouse on a rocky coast, waves crashing, seagulls, evening.
a child flying a kite in a field of tall grass, summer afternoon.
two friends laughing at a table in a restaurant, candid photo.
a glass of water on a table, sharp focus, minimal background, white.
a dragon flying over a village, smoke, fire, wings spread wide.
a wooden boat on a calm lake with mountains behind, reflection, dawn.
a man in a suit walking through a crowded train station, motion blur.
a street market with colorful fabrics, spices and people shopping.
a black cat with green eyes looking at the camera, close portrait.
an apple, a pear and a lemon painted in the style of an old master.
a garden with roses, tulips and sunflowers next to a stone fountain.
a snowy owl and a fox in the winter forest, children's book illustration.
a vintage camera on a shelf with old photographs and letters.
a mountain climber on a steep cliff, rope, bright jacket, blue sky.
a bakery window full of bread, cakes and cookies, warm light.
a neon sign that says open, glowing pink and blue at midnight.
a whale jumping out of the sea near a small fishing boat.
a teddy bear on a bed with a blanket, soft morning light.
a temple in the jungle covered with vines, ancient ruins, mystery.
a hot air balloon floating over green fields and small farms.
a musician playing guitar on a stage, spotlight, concert crowd.
a kitchen with copper pots, herbs and a big window, rustic style.
a panda eating bamboo, sitting in the grass, nature documentary.
a futuristic city with flying cars and glass towers, science fiction.
an empty road through the desert, heat haze, a single cactus.
a little girl and her grandmother baking cookies together, happy.
a tiger resting in the shade of a tree, stripes, intense eyes.
a map on a desk with a compass, a candle and a quill pen.
a rainbow over a waterfall, mist, tropical plants, bright colors.
a cozy reading corner with a chair, a lamp, a cat and many books.
a pair of red shoes on a wooden floor, product photo, clean.
a portrait of a man with glasses and a hat, black and white photograph.
a bridge over a river in a big city at night, lights on the water.
a field of lavender in france, purple rows, a farmhouse in the distance.
a group of penguins standing on the ice, cold, blue and white.
a cake with candles on a birthday table, balloons, party.
one two three four five six seven eight nine ten, 1 2 3 4 5 6 7 8 9 0.
a painting, a drawing, a photo, a render, an illustration, a poster, a logo, a sticker.
very detailed, high quality, best quality, masterpiece, sharp, realistic, beautiful, simple, dark, bright.
red orange yellow green blue purple pink brown black white gray gold silver.
small big tall short long round square old new young happy sad calm angry quiet loud.
A Photo Of The Eiffel Tower In Paris, France; New York City (USA) - Tokyo & Kyoto [Japan]!
What is this? It's "art": 50% light + 50% shadow / 100 @ home #1 ~ $5 * 2 = 10 > 9 < 11 | \\ ^ _ {x}.
ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789.
"""


def _corpus_lines():
    return [ln.strip() for ln in _CORPUS.splitlines() if ln.strip()]


def _bytes_to_unicode():
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 up.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _learn_bpe(words: dict, max_merges: int) -> list:
    """Plain BPE merge learning over {symbol tuple: count}; ties broken by the pair's text, so the result is the
    same on every run (the `tokenizers` trainer breaks ties in hash order)."""
    import heapq
    from collections import defaultdict

    entries = [[list(w), c] for w, c in sorted(words.items())]
    counts = defaultdict(int)
    where = defaultdict(set)
    for i, (syms, c) in enumerate(entries):
        for q in zip(syms, syms[1:]):
            counts[q] += c
            where[q].add(i)
    heap = [(-c, q) for q, c in counts.items()]
    heapq.heapify(heap)
    merges = []
    while heap and len(merges) < max_merges:
        neg, p = heapq.heappop(heap)
        if counts.get(p, 0) != -neg or neg >= 0:
            continue  # stale entry
        merges.append(p)
        new = p[0] + p[1]
        touched = set()
        for i in sorted(where.pop(p, ())):
            syms, c = entries[i]
            old = list(zip(syms, syms[1:]))
            out, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == p[0] and syms[j + 1] == p[1]:
                    out.append(new)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            if len(out) == len(syms):
                continue
            entries[i][0] = out
            for q in old:
                counts[q] -= c
            for q in zip(out, out[1:]):
                counts[q] += c
                where[q].add(i)
            touched.update(old)
            touched.update(zip(out, out[1:]))
        counts.pop(p, None)
        for q in sorted(touched):
            if counts.get(q, 0) > 0:
                heapq.heappush(heap, (-counts[q], q))
            else:
                counts.pop(q, None)
    return merges


def _write_clip_tokenizer(folder: pathlib.Path, max_merges: int = 2000) -> int:
    """CLIP's BPE format: vocab = 256 byte symbols, the same with </w>, the merges' results, then
    <|startoftext|>, <|endoftext|> (the highest id, as in the real 49408-token vocabulary)."""
    from collections import Counter

    from tokenizers import Regex, normalizers, pre_tokenizers

    # The same normalisation and pre-tokenisation transformers' CLIPTokenizer applies.
    norm = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    words = Counter()
    for line in _corpus_lines():
        for w, _ in pre.pre_tokenize_str(norm.normalize_str(line)):
            words[tuple(w[:-1]) + (w[-1] + "</w>",)] += 1
    merges = _learn_bpe(words, max_merges)
    byte_syms = list(_bytes_to_unicode().values())

    vocab = {}
    for s in byte_syms + [s + "</w>" for s in byte_syms]:
        vocab.setdefault(s, len(vocab))
    kept = []
    for a, b in merges:
        if a in vocab and b in vocab and a + b not in vocab:  # always true for BPE; guards the file format
            vocab[a + b] = len(vocab)
            kept.append((a, b))
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)

    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept), encoding="utf-8")
    special = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": {**special, "content": CLIP_BOS},
        "eos_token": {**special, "content": CLIP_EOS},
        "pad_token": CLIP_EOS,
        "unk_token": {**special, "content": CLIP_EOS},
    })
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(vocab[t]): {**special, "content": t, "special": True} for t in (CLIP_BOS, CLIP_EOS)},
        "bos_token": CLIP_BOS,
        "clean_up_tokenization_spaces": False,  # True in the real file; transformers 5 ignores it for BPE and warns
        "do_lower_case": True,
        "eos_token": CLIP_EOS,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": CLIP_EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": CLIP_EOS,
    })
    return len(vocab)


def _write_t5_tokenizer(folder: pathlib.Path, target_vocab: int = 1000) -> int:
    """T5's SentencePiece Unigram format: <pad>=0, </s>=1, <unk>=2, pieces, then <extra_id_99>..<extra_id_0>.
    Returns the tokenizer's size (pieces + 100 sentinels)."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()), model_writer=buf, vocab_size=target_vocab, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2,
        shuffle_input_sentence=False, normalization_rule_name="nmt_nfkc")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    n_pieces = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()

    extra = [f"<extra_id_{i}>" for i in range(100)]
    # tokenizer.json: the fast tokenizer transformers itself builds from spiece.model (Unigram + Precompiled
    # normaliser + Metaspace), saved as the real repo ships it next to spiece.model.
    from transformers import T5Tokenizer

    fast = T5Tokenizer.from_pretrained(str(folder), extra_ids=100, legacy=True, model_max_length=512)
    fast.backend_tokenizer.save(str(folder / "tokenizer.json"))
    size = len(fast)
    if size != n_pieces + 100:
        raise RuntimeError(f"demo: T5 tokenizer has {size} tokens, expected {n_pieces} pieces + 100 sentinels")

    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    added = {str(i): {"content": t, **special} for i, t in enumerate(["<pad>", "</s>", "<unk>"])}
    for i in range(100):
        added[str(n_pieces + 99 - i)] = {"content": f"<extra_id_{i}>", **special}
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": True,
        "added_tokens_decoder": dict(sorted(added.items(), key=lambda kv: int(kv[0]))),
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": 100,
        "legacy": True,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    })
    st = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    _write_json(folder / "special_tokens_map.json", {
        "additional_special_tokens": extra,
        "eos_token": {"content": "</s>", **st},
        "pad_token": {"content": "<pad>", **st},
        "unk_token": {"content": "<unk>", **st},
    })
    return size


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

