"""A small random-weight twin of BFL's FLUX 3 prompt upsampler (black-forest-labs/flux-3-image-klein-pup, a Qwen3.5
fine-tune run with transformers' ``Qwen3_5ForConditionalGeneration`` and ``AutoProcessor``), for tests and the
offline demo.

``write_flux3_pup_demo(models_dir)`` writes ``<models_dir>/FLUX-Studio/FLUX.3-Image-Klein-pup-random-demo/``
(``engine.registry.adapter_demo_id("FLUX.3-Image-Klein-pup")``) in the layout ``save_pretrained`` gives::

    config.json, model.safetensors, generation_config.json
                     Qwen3_5ForConditionalGeneration, BF16: a language model of 2 layers 32 wide (one Gated DeltaNet
                     ``linear_attention`` layer, one ``full_attention`` layer: 2 heads x 16, 1 kv head, a quarter of
                     each head rotated with interleaved M-RoPE) and a 1-block vision tower; the generation config
                     samples (temperature, top-p, top-k) as chat models ship, so a caller that forgets greedy
                     decoding gives other text than diffusers' block
    tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json, video_preprocessor_config.json
                     the FLUX 3 demo's byte-level BPE (Qwen's special tokens, the vision tokens, <think> </think>),
                     Qwen2-VL's image processor and Qwen3-VL's video processor (16-pixel patches merged 2 x 2; written
                     as JSON, as building them needs torchvision) and a chat template that writes Qwen3.5's turns:
                     system / user text, images as <|vision_start|><|image_pad|><|vision_end|>, and
                     ``enable_thinking=False`` as an empty <think></think> block after the assistant header

Written by ``engine.demo.files`` (hidden temporary folder, marker last, renamed into place). Its captions are
gibberish, but every step of the upsampler runs on it: the chat template, the reference images through the vision
tower, greedy generation, the decoding and the cleanup.
"""
from __future__ import annotations

import pathlib

from .files import read_marker, write_folder_once, write_json

MODEL_NAME = "FLUX.3-Image-Klein-pup"
DEMO_ID = "FLUX-Studio/FLUX.3-Image-Klein-pup-random-demo"     # engine.registry.adapter_demo_id(MODEL_NAME)
VERSION = 1
MARKER = ".flux-studio-flux3-pup-demo.json"
FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_num_key_heads=2, linear_num_value_heads=4,
            layer_types=["linear_attention", "full_attention"])   # Qwen3.5: 3 linear layers per full one
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
              num_position_embeddings=16, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
              hidden_act="gelu_pytorch_tanh", in_channels=3)

# Qwen3.5's chat template reduced to what the upsampler sends: a system turn and a user turn of text and image parts,
# then the assistant header; without thinking, an empty think block follows it (as Qwen3.5's template writes it).
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{ message['content'] }}{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'text' %}{{ item['text'] }}{%- elif item['type'] == 'image' or 'image' in item %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{ '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{ '<think>\\n' }}{%- endif %}{%- endif %}")


def flux3_pup_demo_dir(models_dir) -> pathlib.Path:
    return pathlib.Path(models_dir) / DEMO_ID


def write_flux3_pup_demo(models_dir, seed: int = 0) -> pathlib.Path:
    """Write (once) the random-weight prompt-upsampler folder; returns it."""
    target = flux3_pup_demo_dir(models_dir)

    def write(tmp):
        _write(tmp, seed)
        write_json(tmp / MARKER, {"version": VERSION, "seed": int(seed), "files": list(FILES)})

    def complete() -> bool:
        m = read_marker(target / MARKER)
        return m.get("version") == VERSION and m.get("seed") == int(seed) and all((target / f).is_file()
                                                                                 for f in FILES)

    write_folder_once(target, complete, write)
    return target


def _write(root: pathlib.Path, seed: int) -> None:
    import torch

    from . import flux3 as flux3_demo
    size = flux3_demo._write_tokenizer(root)            # tokenizer.json + tokenizer_config.json (+ a template)
    (root / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tokenizer = _write_processor(root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _write_model(root, 64 * -(-size // 64), tokenizer)


def _write_processor(root: pathlib.Path):
    """Qwen3.5's processor files (Qwen3VLProcessor: the tokenizer, Qwen2-VL's image processor, Qwen3-VL's video
    processor) beside the model, as JSON (the processors' classes need torchvision to be built, not to be read);
    returns the tokenizer."""
    from transformers import AutoTokenizer
    common = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5] * 3,
              "image_std": [0.5] * 3, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "do_convert_rgb": True}
    write_json(root / "preprocessor_config.json", {**common, "image_processor_type": "Qwen2VLImageProcessor",
                                                   "size": {"shortest_edge": 64 * 64, "longest_edge": 512 * 512},
                                                   "processor_class": "Qwen3VLProcessor"})
    write_json(root / "video_preprocessor_config.json", {**common, "video_processor_type": "Qwen3VLVideoProcessor",
                                                         "size": {"shortest_edge": 64 * 64,
                                                                  "longest_edge": 512 * 512},
                                                         "processor_class": "Qwen3VLProcessor"})
    return AutoTokenizer.from_pretrained(str(root), local_files_only=True)


def _write_model(root: pathlib.Path, vocab_size: int, tokenizer) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from . import flux2 as flux2_demo
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                            "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    text = {"model_type": "qwen3_5_text", "vocab_size": vocab_size, "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                                "mrope_section": [1, 1, 0], "mrope_interleaved": True},
            "eos_token_id": ids["<|im_end|>"], "tie_word_embeddings": False, **TEXT}
    config = Qwen3_5Config(text_config=text, vision_config={"model_type": "qwen3_5_vision", **VISION},
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                           tie_word_embeddings=False)
    model = Qwen3_5ForConditionalGeneration(config)
    flux2_demo._randomise(model)
    model.model.language_model.embed_tokens.weight.data.normal_(0, 1.0)
    for name, p in model.model.language_model.named_parameters():   # peaked attention: the caption depends on the
        if name.endswith(("q_proj.weight", "k_proj.weight", "in_proj_qkv.weight")):    # request, not just its end
            p.data.mul_(8.0)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=True, temperature=0.7, top_p=0.8, top_k=20)
    model.to(torch.bfloat16).save_pretrained(str(root))
