"""A small random-weight FLUX.2 [klein] 4B in the official diffusers folder layout, for tests and the offline demo.

``write_flux2_demo(models_dir)`` writes ``<models_dir>/FLUX-Studio/FLUX.2-klein-4B-random-demo/``::

    transformer/config.json, diffusion_pytorch_model.safetensors    Flux2Transformer2DModel keys, BF16: 2 double +
                                 2 single blocks, 64 wide (2 heads x 32, rotary axes 4 x 8), no guidance embedder
    vae/config.json, diffusion_pytorch_model.safetensors            AutoencoderKLFlux2 keys, BF16 (bn.* as the
                                 official file: running_mean/var [128] and a 0-dim I64 num_batches_tracked), 4 levels
                                 of 32 channels, 32 latent channels
    text_encoder/config.json, model-0000{1,2}-of-00002.safetensors + index   Qwen3ForCausalLM's keys (model.*, tied:
                                 no lm_head), 30 layers 32 wide (so hidden states 9/18/27 are inner layers, as in
                                 Qwen3-4B's 36), BF16
    tokenizer/                   a byte-level BPE trained offline on the demo text with Qwen3's special tokens and a
                                 chat template that writes what Qwen3's does for system/user/assistant turns,
                                 ``add_generation_prompt`` and ``enable_thinking=False`` (the empty think block)

The DiT's context width is 3 x the Qwen3 width (96), as 7680 = 3 x 2560. Written by ``engine.demo.files`` (hidden
temporary folder, marker last, renamed into place). Images made with it are noise.
"""
from __future__ import annotations

import json
import math
import pathlib

from .files import read_marker, save_safetensors, write_folder_once, write_json
from .tokenizers import corpus_lines

DEMO_ID = "FLUX-Studio/FLUX.2-klein-4B-random-demo"
VERSION = 1
MARKER = ".flux-studio-flux2-demo.json"
QWEN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=30, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16)                       # Qwen3-4B: 2560, 9728, 36, 32, 8, 128
DIT = dict(num_layers=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=32,
           axes_dims_rope=(8, 8, 8, 8))                               # klein 4B: 5, 20, 24, 128, 4 x 32
VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1)   # 128/256/512/512, 2
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
FILES = ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
         "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
         "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
         "text_encoder/model.safetensors.index.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
         "tokenizer/chat_template.jinja")

# Qwen3's chat template reduced to what FLUX.2 uses; for these messages it writes the same text as the original.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")


def flux2_demo_dir(models_dir) -> pathlib.Path:
    return pathlib.Path(models_dir) / DEMO_ID


def flux2_demo_files(models_dir) -> dict:
    """role -> folder of the written demo: ``dit``, ``vae``, ``text_encoder``, ``tokenizer``."""
    root = flux2_demo_dir(models_dir)
    return {"dit": root / "transformer", "vae": root / "vae", "text_encoder": root / "text_encoder",
            "tokenizer": root / "tokenizer"}


def write_flux2_demo(models_dir, seed: int = 0) -> pathlib.Path:
    """Write (once) the random-weight FLUX.2 [klein] 4B demo; returns its folder."""
    target = flux2_demo_dir(models_dir)

    def write(tmp):
        _write(tmp, seed)
        write_json(tmp / MARKER, {"version": VERSION, "seed": int(seed), "files": list(FILES)})

    return write_folder_once(target, lambda: _complete(target, seed), write)


def _complete(target: pathlib.Path, seed) -> bool:
    m = read_marker(target / MARKER)
    return m.get("version") == VERSION and m.get("seed") == int(seed) and all((target / f).is_file() for f in FILES)


def _write(root: pathlib.Path, seed: int) -> None:
    import torch

    size = _write_tokenizer(root / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _write_text_encoder(root / "text_encoder", size)
        _write_transformer(root / "transformer")
        _write_vae(root / "vae")


def _randomise(model, gain: float = 1.0) -> None:
    """Weights ~ N(0, gain / fan_in) (activations keep their scale through the tiny stacks), norm scales near 1."""
    import torch
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.data.normal_(0, gain / math.sqrt(fan_in))
        elif "norm" in name and name.endswith("weight"):
            p.data.normal_(1.0, 0.1)
        else:
            p.data.normal_(0, 0.05)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(torch.randn_like(b) * 0.2)
        elif name.endswith("running_var"):
            b.copy_(torch.rand_like(b) * 1.5 + 0.5)


def _bf16(sd: dict) -> dict:
    import torch
    return {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach()).contiguous()
            for k, v in sd.items()}


def transformer_config() -> dict:
    return {"patch_size": 1, "in_channels": 128, "out_channels": None, "num_layers": DIT["num_layers"],
            "num_single_layers": DIT["num_single_layers"], "attention_head_dim": DIT["attention_head_dim"],
            "num_attention_heads": DIT["num_attention_heads"], "joint_attention_dim": 3 * QWEN["hidden_size"],
            "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": list(DIT["axes_dims_rope"]),
            "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False}


def vae_config() -> dict:
    n = len(VAE["block_out_channels"])
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": list(VAE["block_out_channels"]),
            "layers_per_block": VAE["layers_per_block"], "act_fn": "silu", "latent_channels": 32,
            "norm_num_groups": 32, "sample_size": 1024, "use_quant_conv": True, "use_post_quant_conv": True,
            "mid_block_add_attention": True, "batch_norm_eps": 1e-4, "batch_norm_momentum": 0.1,
            "patch_size": [2, 2]}


def qwen_config(vocab_size: int) -> dict:
    """config.json as Qwen/Qwen3-4B publishes it (Qwen3ForCausalLM, tied embeddings)."""
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
            "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "silu",
            "initializer_range": 0.02, "max_position_embeddings": 40960, "max_window_layers": QWEN["num_hidden_layers"],
            "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
            "vocab_size": vocab_size, **QWEN}


def _write_transformer(folder: pathlib.Path) -> None:
    from diffusers import Flux2Transformer2DModel
    cfg = transformer_config()
    model = Flux2Transformer2DModel(**{**cfg, "axes_dims_rope": tuple(cfg["axes_dims_rope"])})
    _randomise(model)
    save_safetensors(_bf16(model.state_dict()), folder / "diffusion_pytorch_model.safetensors")
    write_json(folder / "config.json", {"_class_name": "Flux2Transformer2DModel", "_diffusers_version": "0.42.1",
                                        **cfg})


def _write_vae(folder: pathlib.Path) -> None:
    from diffusers import AutoencoderKLFlux2
    cfg = vae_config()
    model = AutoencoderKLFlux2(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    _randomise(model)
    save_safetensors(_bf16(model.state_dict()), folder / "diffusion_pytorch_model.safetensors")
    write_json(folder / "config.json", {"_class_name": "AutoencoderKLFlux2", "_diffusers_version": "0.42.1", **cfg})


def _write_text_encoder(folder: pathlib.Path, tokens: int) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = qwen_config(128 * math.ceil(tokens / 128))
    model = Qwen3ForCausalLM(Qwen3Config(**cfg))
    _randomise(model.model)
    model.model.embed_tokens.weight.data.normal_(0, 1.0)
    sd = _bf16({"model." + k: v for k, v in model.model.state_dict().items()})   # tied: no lm_head.weight
    keys = sorted(sd)
    weight_map = {}
    for i in range(2):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        part = {k: sd[k] for k in keys[i::2]}
        save_safetensors(part, folder / name)
        weight_map.update({k: name for k in part})
    write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    write_json(folder / "config.json", cfg)


def _write_tokenizer(folder: pathlib.Path) -> int:
    """A byte-level BPE in Qwen's style with Qwen3's special tokens; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tk.train_from_iterator(corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=131072)
    fast.add_special_tokens({"additional_special_tokens": SPECIAL})
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return len(fast)
