"""Small random-weight FLUX 3 Image Klein models (step-distilled and base) in the official layouts, for tests and the
offline demo.

``write_flux3_demo(models_dir)`` writes ``<models_dir>/FLUX-Studio/flux-3-image-klein-random-demo/`` (the
step-distilled model, ``ref_time_in``) and ``.../flux-3-image-klein-base-random-demo/`` (the base model, none)::

    model.safetensors            BFL's single-file keys (emb_in, content_mode_blocks, txt_mode_blocks, single_blocks,
                                 *_stream_modulations.*.lin, final_layer.image; adaLN halves in BFL's (shift, scale)),
                                 BF16: 2 blocks per mode + 2 joint single blocks, 64 wide (2 heads x 32, rotary axes
                                 4 x 8), image and reference tokens 128 channels, text 8 x 32 = 256
    transformer/config.json, diffusion_pytorch_model.safetensors    the same weights in Flux3Transformer2DModel keys
    text_encoder/ (klein only; the base demo's rows read it there, as the real base model's read klein's)
        config.json, model-0000{1,2}-of-00002.safetensors + index   Qwen3VLForConditionalGeneration's saved keys
                                 (model.language_model.*, model.visual.*, tied: no lm_head), BF16: a language model
                                 10 layers 32 wide (2 heads x 16, 1 kv head) and a 2-block vision tower
        tokenizer.json, tokenizer_config.json, chat_template.jinja  a byte-level BPE trained offline (the FLUX.2
                                 demo's writer) with Qwen3-VL's special tokens and a chat template that writes what
                                 Qwen3-VL-4B-Instruct's does for text and image turns and ``add_generation_prompt``

    vae/config.json, diffusion_pytorch_model.safetensors (klein only)   the FLUX.2 demo's VAE (its writer, same
                                 seed stream): AutoencoderKLFlux2, 32 latent channels, as the real FLUX 3 rows read
                                 FLUX.2's VAE

FLUX 3 reads Qwen3-VL hidden states 4, 8, ..., 32 of 36 layers. The demo's encoder is 10 layers deep, and its
config.json says which hidden states to read instead: ``"flux_studio_text_layers": [1, ..., 8]`` (eight of them, so
the DiT's text width is 8 x the encoder's as 20480 = 8 x 2560; the loader keeps 9 of the 10 layers, as it keeps 33 of
36). Written by ``engine.demo.files`` (hidden temporary folder, marker last, renamed into
place). Images made with it are noise.
"""
from __future__ import annotations

import json
import math
import pathlib

from . import flux2 as flux2_demo
from .files import read_marker, save_safetensors, write_folder_once, write_json

DEMO_ID = "FLUX-Studio/flux-3-image-klein-random-demo"
BASE_DEMO_ID = "FLUX-Studio/flux-3-image-klein-base-random-demo"
VERSION = 1
MARKER = ".flux-studio-flux3-demo.json"
TEXT_LAYERS = (1, 2, 3, 4, 5, 6, 7, 8)                     # Qwen3-VL-4B: 4, 8, ..., 32
QWEN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=10, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16)            # Qwen3-VL-4B: 2560, 9728, 36, 32, 8, 128
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
              num_position_embeddings=16, deepstack_visual_indexes=[1], patch_size=16, spatial_merge_size=2,
              temporal_patch_size=2, hidden_act="gelu_pytorch_tanh", in_channels=3)   # 24, 1024, 4096, 16, 2560, 2304
DIT = dict(num_layers=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=32,
           axes_dims_rope=(8, 8, 8, 8))                    # klein: 5, 28, 24, 128, 4 x 32
SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TRANSFORMER_FILES = ("model.safetensors", "transformer/config.json",
                     "transformer/diffusion_pytorch_model.safetensors")
TEXT_FILES = ("text_encoder/config.json", "text_encoder/model-00001-of-00002.safetensors",
              "text_encoder/model-00002-of-00002.safetensors", "text_encoder/model.safetensors.index.json",
              "text_encoder/tokenizer.json", "text_encoder/tokenizer_config.json", "text_encoder/chat_template.jinja",
              "vae/config.json", "vae/diffusion_pytorch_model.safetensors")

# Qwen3-VL-4B-Instruct's chat template reduced to user/assistant/system turns with text and images; for these
# messages it writes the same text as the original.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{ message['content'] }}{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'text' %}{{ item['text'] }}{%- elif item['type'] == 'image' or 'image' in item %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{ '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")


def flux3_demo_dir(models_dir, base: bool = False) -> pathlib.Path:
    return pathlib.Path(models_dir) / (BASE_DEMO_ID if base else DEMO_ID)


def flux3_demo_files(models_dir, base: bool = False) -> dict:
    """role -> path of the written demo: ``dit`` (BFL ``model.safetensors``), ``dit_diffusers`` (``transformer/``),
    ``text_encoder`` (folder, with the tokenizer), ``vae`` (``vae/``); the base demo's text encoder and VAE are
    klein's."""
    root, klein = flux3_demo_dir(models_dir, base), flux3_demo_dir(models_dir)
    return {"dit": root / "model.safetensors", "dit_diffusers": root / "transformer",
            "text_encoder": klein / "text_encoder", "tokenizer": klein / "text_encoder",
            "vae": klein / "vae"}


def write_flux3_demo(models_dir, seed: int = 0) -> pathlib.Path:
    """Write (once) the random-weight FLUX 3 Image Klein demos (step-distilled and base); returns the
    step-distilled demo's folder."""
    for base in (False, True):
        target = flux3_demo_dir(models_dir, base)
        files = TRANSFORMER_FILES + (() if base else TEXT_FILES)

        def write(tmp, base=base, files=files):
            _write(tmp, seed, base)
            write_json(tmp / MARKER, {"version": VERSION, "seed": int(seed), "files": list(files)})

        write_folder_once(target, lambda t=target, f=files: _complete(t, seed, f), write)
    return flux3_demo_dir(models_dir)


def _complete(target: pathlib.Path, seed, files) -> bool:
    m = read_marker(target / MARKER)
    return m.get("version") == VERSION and m.get("seed") == int(seed) and all((target / f).is_file() for f in files)


def _write(root: pathlib.Path, seed: int, base: bool) -> None:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + (1 if base else 0))
        _write_transformer(root, flow_map=not base)
        if not base:
            size = _write_tokenizer(root / "text_encoder")
            _write_text_encoder(root / "text_encoder", size)
            flux2_demo._write_vae(root / "vae")


# ---------------------------------------------------------------------------------------------------- transformer

def transformer_config(flow_map: bool = True) -> dict:
    return {"in_channels": 128, "cond_in_channels": 128, "num_layers": DIT["num_layers"],
            "num_single_layers": DIT["num_single_layers"], "attention_head_dim": DIT["attention_head_dim"],
            "num_attention_heads": DIT["num_attention_heads"], "joint_attention_dim": len(TEXT_LAYERS) *
            QWEN["hidden_size"], "timestep_channels": 256, "mlp_ratio": 3.0,
            "axes_dims_rope": list(DIT["axes_dims_rope"]), "rope_theta": 10000, "eps": 1e-6, "flow_map": flow_map}


_BLOCK_TO_BFL = (("attn.to_q.weight", "q_proj.weight"), ("attn.to_k.weight", "k_proj.weight"),
                 ("attn.to_v.weight", "v_proj.weight"), ("attn.to_out.0.weight", "attn_out.weight"),
                 ("attn.norm_q.weight", "norm.query_norm.scale"), ("attn.norm_k.weight", "norm.key_norm.scale"),
                 ("ff.linear_in.weight", "mlp_in.weight"), ("ff.linear_out.weight", "mlp_out.weight"))
_PREFIX_TO_BFL = (("x_embedders.", "emb_in."), ("context_embedder.", "txt_in."),
                  ("mode_blocks.", "content_mode_blocks."), ("single_transformer_blocks.", "single_blocks."))
_EXACT_TO_BFL = {"timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
                 "timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
                 "target_timestep_embedder.linear_1.weight": "ref_time_in.in_layer.weight",
                 "target_timestep_embedder.linear_2.weight": "ref_time_in.out_layer.weight",
                 "proj_out.weight": "final_layer.image.linear.weight",
                 "norm_out.linear.weight": "final_layer.image.adaLN_modulation.1.weight"}


def diffusers_to_bfl(sd: dict) -> dict:
    """``Flux3Transformer2DModel`` keys -> BFL's ``model.safetensors`` keys (the inverse of diffusers'
    ``convert_flux3_transformer_checkpoint_to_diffusers``, which the tests run over it); the final adaLN's
    (scale, shift) halves go back to BFL's (shift, scale)."""
    import torch
    out = {}
    for key, t in sd.items():
        if key in _EXACT_TO_BFL:
            if key == "norm_out.linear.weight":
                scale, shift = t.chunk(2, dim=0)
                t = torch.cat([shift, scale], dim=0)
            out[_EXACT_TO_BFL[key]] = t
            continue
        new = key
        for a, b in _PREFIX_TO_BFL:
            if new.startswith(a):
                new = b + new[len(a):]
                break
        new = new.replace(".linear.weight", ".lin.weight")
        for a, b in _BLOCK_TO_BFL:
            if new.endswith(a):
                new = new[: -len(a)] + b
                break
        out[new] = t
    return out


def _write_transformer(root: pathlib.Path, flow_map: bool) -> None:
    from diffusers import Flux3Transformer2DModel
    cfg = transformer_config(flow_map)
    model = Flux3Transformer2DModel(**{**cfg, "axes_dims_rope": tuple(cfg["axes_dims_rope"])})
    flux2_demo._randomise(model)
    sd = flux2_demo._bf16(model.state_dict())
    save_safetensors(sd, root / "transformer" / "diffusion_pytorch_model.safetensors")
    write_json(root / "transformer" / "config.json", {"_class_name": "Flux3Transformer2DModel",
                                                      "_diffusers_version": "0.42.1", **cfg})
    save_safetensors({k: v.contiguous() for k, v in diffusers_to_bfl(sd).items()}, root / "model.safetensors")


# ---------------------------------------------------------------------------------------------------- text encoder

def qwen3_vl_config(vocab_size: int, ids: dict) -> dict:
    """config.json in Qwen/Qwen3-VL-4B-Instruct's shape (Qwen3VLForConditionalGeneration, tied embeddings), tiny,
    plus the hidden states the demo's FLUX 3 reads."""
    text = {"model_type": "qwen3_vl_text", "vocab_size": vocab_size, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144, "attention_bias": False, "attention_dropout": 0.0,
            "rope_scaling": {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
            "rope_theta": 5000000, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
            "tie_word_embeddings": True, **QWEN}
    return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
            "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
            "tie_word_embeddings": True, "text_config": text,
            "vision_config": {"model_type": "qwen3_vl", "initializer_range": 0.02, **VISION},
            "flux_studio_text_layers": list(TEXT_LAYERS)}


def _write_text_encoder(folder: pathlib.Path, tokens: int) -> None:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    tok = json.loads((folder / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    ids.update(bos=ids["<|endoftext|>"], eos=ids["<|im_end|>"])
    cfg = qwen3_vl_config(128 * math.ceil(tokens / 128), ids)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**{k: v for k, v in cfg.items()
                                                            if not k.startswith("flux_studio_")}))
    flux2_demo._randomise(model.model)
    model.model.language_model.embed_tokens.weight.data.normal_(0, 1.0)
    sd = flux2_demo._bf16({"model." + k: v for k, v in model.model.state_dict().items()})   # tied: no lm_head
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
    """The FLUX.2 demo's Qwen-style BPE plus Qwen3-VL's vision tokens and its chat template; returns its size."""
    from transformers import PreTrainedTokenizerFast
    flux2_demo._write_tokenizer(folder)
    fast = PreTrainedTokenizerFast.from_pretrained(str(folder))
    fast.add_special_tokens({"additional_special_tokens": flux2_demo.SPECIAL + SPECIAL})
    fast.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return len(fast)
