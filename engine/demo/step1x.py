"""Small random-weight Step1X-Edit files in the official layouts, for tests and the offline demo.

``write_step1x_demo(models_dir)`` writes ``<models_dir>/FLUX-Studio/Step1X-Edit-random-demo/``::

    step1x-edit-i1258.safetensors   BFL DiT without guidance_in + connector.* (as stepfun-ai/Step1X-Edit), BF16
    vae.safetensors                 BFL ae layout, F32
    Qwen2.5-VL-7B-Instruct/         as Qwen/Qwen2.5-VL-7B-Instruct: config.json (the published flat layout),
                                    model-0000{1,2}-of-00002.safetensors + index in the transformers < 4.52 key layout
                                    (model.*, visual.*, lm_head.weight), tokenizer (byte-level BPE trained offline on a
                                    built-in text, Qwen's special tokens), preprocessor_config.json, chat_template.json

Widths are tiny; the connector maps the tiny Qwen width to the DiT's text width (as 3584 -> 4096 does) and its
pooled output feeds the DiT's vector_in (as 768 does). Written by ``engine.demo.files.write_folder_once`` like the
FLUX.1 demo: built in a hidden temporary folder, a marker written last, renamed into place.
"""
from __future__ import annotations

import json
import math
import pathlib

from ..registry import STEP1X_DEMO_ID
from . import flux1 as base
from .files import read_marker, save_safetensors, write_folder_once, write_json
from .tokenizers import corpus_lines
from .weights import RandomWeights
QWEN_SUBDIR = "Qwen2.5-VL-7B-Instruct"
VERSION = 1
MARKER = ".flux-studio-step1x-demo.json"

QWEN_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=[2, 3, 3])          # 3584, 18944, 28, 28, 4, [16, 24, 24]
QWEN_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1])
CONNECTOR = dict(hidden=128, pooled=32, depth=2)                           # 4096, 768, 2
DIT = dict(hidden=64, head_dim=32, depth=1, depth_single=1, in_channels=64)  # 3072, 128, 19, 38, 64

FILES = ("step1x-edit-i1258.safetensors", "vae.safetensors", f"{QWEN_SUBDIR}/config.json",
         f"{QWEN_SUBDIR}/model-00001-of-00002.safetensors", f"{QWEN_SUBDIR}/model-00002-of-00002.safetensors",
         f"{QWEN_SUBDIR}/model.safetensors.index.json", f"{QWEN_SUBDIR}/tokenizer.json",
         f"{QWEN_SUBDIR}/tokenizer_config.json", f"{QWEN_SUBDIR}/preprocessor_config.json",
         f"{QWEN_SUBDIR}/chat_template.json")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2.5-VL's chat template (system default, "Picture n: " with add_vision_id, generation prompt)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def step1x_demo_dir(models_dir) -> pathlib.Path:
    return pathlib.Path(models_dir) / STEP1X_DEMO_ID


def step1x_demo_files(models_dir) -> dict:
    """role -> path of the written demo: ``dit`` (the DiT + connector file), ``vae``, ``qwen_vl`` (folder)."""
    root = step1x_demo_dir(models_dir)
    return {"dit": root / FILES[0], "vae": root / FILES[1], "qwen_vl": root / QWEN_SUBDIR}


def write_step1x_demo(models_dir, seed: int = 0) -> pathlib.Path:
    """Write (once) the random-weight Step1X-Edit demo; returns its folder. Deterministic for a seed."""
    target = step1x_demo_dir(models_dir)

    def write(tmp):
        _write(tmp, seed)
        write_json(tmp / MARKER, {"version": VERSION, "seed": int(seed), "files": list(FILES)})

    return write_folder_once(target, lambda: _complete(target, seed), write)


def _complete(target: pathlib.Path, seed) -> bool:
    m = read_marker(target / MARKER)
    return m.get("version") == VERSION and m.get("seed") == int(seed) and all((target / f).is_file() for f in FILES)


def _write(root: pathlib.Path, seed: int) -> None:
    qdir = root / QWEN_SUBDIR
    tok = write_qwen_tokenizer(qdir)
    sd = step1x_dit_state_dict(seed)
    sd.update(connector_state_dict(seed))
    save_safetensors(sd, root / FILES[0])
    save_safetensors(base.bfl_ae_state_dict(seed), root / FILES[1])
    _write_qwen(qdir, seed, tok)


# ------------------------------------------------------------------------------------------------ DiT + connector

def step1x_dit_state_dict(seed: int = 0) -> dict:
    """BFL DiT keys without guidance_in (the schnell / Step1X key set), BF16."""
    return base.bfl_transformer_state_dict(seed, name="step1x-dit", config=dict(
        hidden_size=DIT["hidden"], head_dim=DIT["head_dim"], depth=DIT["depth"],
        depth_single_blocks=DIT["depth_single"], in_channels=DIT["in_channels"], out_channels=DIT["in_channels"],
        vec_in_dim=CONNECTOR["pooled"], context_in_dim=CONNECTOR["hidden"], guidance_embed=False))


def connector_state_dict(seed: int = 0) -> dict:
    """The ``connector.*`` keys of step1x-edit-i1258.safetensors at the demo size, BF16 (41 keys with depth 2)."""
    import torch

    qin, hid = QWEN_TEXT["hidden_size"], CONNECTOR["hidden"]
    it = RandomWeights(seed, "step1x-connector", torch.bfloat16)
    p = "connector.S."
    it.linear(p + "input_embedder", hid, qin)
    it.linear(p + "t_embedder.mlp.0", hid, 256)
    it.linear(p + "t_embedder.mlp.2", hid, hid)
    it.linear(p + "c_embedder.linear_1", hid, qin)
    it.linear(p + "c_embedder.linear_2", hid, hid)
    for i in range(CONNECTOR["depth"]):
        b = f"{p}individual_token_refiner.blocks.{i}."
        it.norm(b + "norm1.weight", hid, b + "norm1.bias")
        it.linear(b + "self_attn_qkv", 3 * hid, hid)
        it.linear(b + "self_attn_proj", hid, hid)
        it.norm(b + "norm2.weight", hid, b + "norm2.bias")
        it.linear(b + "mlp.fc1", 4 * hid, hid)
        it.linear(b + "mlp.fc2", hid, 4 * hid)
        it.linear(b + "adaLN_modulation.1", 2 * hid, hid, gain=0.5)
    it.linear("connector.global_proj_out", CONNECTOR["pooled"], qin)
    it.sd["connector.scale_factor"] = torch.full((1,), -(1 - 0.09)).to(torch.bfloat16)
    return it.sd


# ------------------------------------------------------------------------------------------------ Qwen2.5-VL

def write_qwen_tokenizer(folder: pathlib.Path) -> dict:
    """A byte-level BPE in Qwen2's style, trained offline on the demo corpus and the Step1X prefix text, with the
    chat template and preprocessor_config.json of a Qwen2.5-VL processor folder; returns the special ids and size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..step1x.encoder import PREFIX

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    lines = corpus_lines() + PREFIX.splitlines() + ["“ ” “a” “b” make it “red”"] * 20
    tk.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL, model_max_length=32768)
    fast.add_special_tokens({"additional_special_tokens": SPECIAL})
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    for extra in ("special_tokens_map.json",):
        (folder / extra).unlink(missing_ok=True)
    write_json(folder / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_json(folder / "preprocessor_config.json", {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor"})
    return {t: fast.convert_tokens_to_ids(t) for t in SPECIAL} | {"size": len(fast)}


def qwen_config_json(tok: dict) -> dict:
    """config.json in the published (flat, transformers 4.4x) layout."""
    t, v = QWEN_TEXT, QWEN_VISION
    vocab = 128 * math.ceil(tok["size"] / 128)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0, "bos_token_id": tok["<|endoftext|>"], "eos_token_id": tok["<|im_end|>"],
        "vision_start_token_id": tok["<|vision_start|>"], "vision_end_token_id": tok["<|vision_end|>"],
        "vision_token_id": tok["<|vision_pad|>"], "image_token_id": tok["<|image_pad|>"],
        "video_token_id": tok["<|video_pad|>"], "hidden_act": "silu", "hidden_size": t["hidden_size"],
        "initializer_range": 0.02, "intermediate_size": t["intermediate_size"], "max_position_embeddings": 4096,
        "max_window_layers": t["num_hidden_layers"], "num_attention_heads": t["num_attention_heads"],
        "num_hidden_layers": t["num_hidden_layers"], "num_key_value_heads": t["num_key_value_heads"],
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
        "rope_scaling": {"type": "mrope", "mrope_section": t["mrope_section"]},
        "vision_config": {"depth": v["depth"], "hidden_act": "silu", "hidden_size": v["hidden_size"],
                          "intermediate_size": v["intermediate_size"], "num_heads": v["num_heads"], "in_chans": 3,
                          "out_hidden_size": t["hidden_size"], "patch_size": 14, "spatial_merge_size": 2,
                          "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": v["fullatt_block_indexes"], "tokens_per_second": 2,
                          "temporal_patch_size": 2},
        "vocab_size": vocab,
    }


def published_qwen_keys(sd: dict) -> dict:
    """transformers 5 keys -> the published (transformers < 4.52) layout."""
    out = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = k[len("model."):]
        out[k] = v
    return out


def _write_qwen(folder: pathlib.Path, seed: int, tok: dict) -> None:
    import torch

    from ..step1x.encoder import build_qwen_vl, qwen_config

    cfg = qwen_config_json(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_qwen_vl(qwen_config(cfg))
        # larger than the default 0.02 so the tiny model's outputs depend visibly on its inputs
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.data.normal_(0, 1 / math.sqrt(p.shape[-1] if p.ndim == 2 else p[0].numel()))
    sd = published_qwen_keys({k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()})
    keys = sorted(sd)
    weight_map = {}
    for i in range(2):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        part = {k: sd[k] for k in keys[i::2]}
        save_safetensors(part, folder / name)
        weight_map.update({k: name for k in part})
    write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    write_json(folder / "config.json", cfg)
