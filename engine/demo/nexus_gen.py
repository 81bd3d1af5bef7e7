"""Small random-weight Nexus-GenV2 files in the official layouts, for tests and the offline demo.

``write_nexus_gen_demo(models_dir)`` writes ``<models_dir>/FLUX-Studio/Nexus-GenV2-random-demo/``::

    model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json
                            the AR Qwen2.5-VL in the transformers 4.49 key layout (model.*, visual.*, lm_head.*)
                            plus vision_head.weight and image_prefill_embeds.weight (81 rows), BF16
    config.json             its config (published flat layout)
    processor/              tokenizer (byte-level BPE trained offline), chat template, preprocessor_config.json
    generation_decoder.bin  pipe.dit.* (the FLUX.1 demo's transformer in DiffSynth's FluxDiT names, final_norm_out
                            in diffusers' order as in the real file) + adapter.*; torch.save of plain tensors
    edit_decoder.bin        the same pipe.dit.* + embedding_merger.*

The AR width is 128 (one head of 128: the embedding merger's head width is the published constant), the adapter's
and merger's outputs are as wide as the FLUX.1 demo's T5 (its ``joint_attention_dim``), and the DiT holds exactly
the FLUX.1 demo's weights, so that demo's text encoders and VAE serve (the registry rows name them).
"""
from __future__ import annotations

import math
import pathlib

from . import flux1 as base
from .files import read_marker, save_safetensors, write_folder_once, write_json
from .weights import RandomWeights

MODEL_ID = "FLUX-Studio/Nexus-GenV2-random-demo"
VERSION = 1
MARKER = ".flux-studio-nexus-gen-demo.json"
AR_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
               num_key_value_heads=1, mrope_section=[16, 24, 24])      # 3584, 18944, 28, 28, 4, [16, 24, 24]
MERGER = dict(intermediate=256, kv_heads=1, expand=4)                    # 18944, 4, 4
FILES = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
         "config.json", "processor/tokenizer.json", "processor/tokenizer_config.json", "processor/chat_template.json",
         "processor/preprocessor_config.json", "generation_decoder.bin", "edit_decoder.bin")

# BFL -> DiffSynth FluxDiT names (the seed's flux_dit converter's table, written out for the demo).
_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "time_in.in_layer": "time_embedder.timestep_embedder.0",
        "time_in.out_layer": "time_embedder.timestep_embedder.2", "vector_in.in_layer": "pooled_text_embedder.0",
        "vector_in.out_layer": "pooled_text_embedder.2",
        "guidance_in.in_layer": "guidance_embedder.timestep_embedder.0",
        "guidance_in.out_layer": "guidance_embedder.timestep_embedder.2", "final_layer.linear": "final_proj_out",
        "final_layer.adaLN_modulation.1": "final_norm_out.linear"}
_DOUBLE = {"img_attn.qkv": "attn.a_to_qkv", "img_attn.proj": "attn.a_to_out", "img_mlp.0": "ff_a.0",
           "img_mlp.2": "ff_a.2", "img_mod.lin": "norm1_a.linear", "txt_attn.qkv": "attn.b_to_qkv",
           "txt_attn.proj": "attn.b_to_out", "txt_mlp.0": "ff_b.0", "txt_mlp.2": "ff_b.2",
           "txt_mod.lin": "norm1_b.linear", "img_attn.norm.query_norm": "attn.norm_q_a",
           "img_attn.norm.key_norm": "attn.norm_k_a", "txt_attn.norm.query_norm": "attn.norm_q_b",
           "txt_attn.norm.key_norm": "attn.norm_k_b"}
_SINGLE = {"linear1": "to_qkv_mlp", "linear2": "proj_out", "modulation.lin": "norm.linear",
           "norm.query_norm": "norm_q_a", "norm.key_norm": "norm_k_a"}


def nexus_gen_demo_dir(models_dir) -> pathlib.Path:
    return pathlib.Path(models_dir) / MODEL_ID


def write_nexus_gen_demo(models_dir, seed: int = 0) -> pathlib.Path:
    """Write (once) the random-weight Nexus-GenV2 demo; returns its folder. Deterministic for a seed."""
    target = nexus_gen_demo_dir(models_dir)

    def complete() -> bool:
        m = read_marker(target / MARKER)
        return m.get("version") == VERSION and m.get("seed") == int(seed) and all((target / f).is_file() for f in FILES)

    def write(tmp):
        _write(tmp, seed)
        write_json(tmp / MARKER, {"version": VERSION, "seed": int(seed), "files": list(FILES)})

    return write_folder_once(target, complete, write)


def _write(root: pathlib.Path, seed: int) -> None:
    import torch

    from .step1x import write_qwen_tokenizer
    tok = write_qwen_tokenizer(root / "processor")
    (root / "processor" / "chat_template.jinja").unlink(missing_ok=True)
    _write_ar(root, seed, tok)
    dit = {"pipe.dit." + k: v for k, v in diffsynth_dit_state_dict(base.bfl_transformer_state_dict(seed)).items()}
    torch.save({**dit, **adapter_state_dict(seed)}, str(root / "generation_decoder.bin"))
    torch.save({**dit, **merger_state_dict(seed)}, str(root / "edit_decoder.bin"))


def diffsynth_dit_state_dict(bfl: dict) -> dict:
    """BFL keys -> DiffSynth FluxDiT keys as Nexus-GenV2 stores them (final_norm_out in diffusers' (scale, shift))."""
    import torch
    out = {}
    for key, t in bfl.items():
        module, _, param = key.rpartition(".")
        param = "weight" if param == "scale" else param
        parts = module.split(".")
        if parts[0] in ("double_blocks", "single_blocks"):
            table, dst = (_DOUBLE, "blocks") if parts[0] == "double_blocks" else (_SINGLE, "single_blocks")
            name = f"{dst}.{parts[1]}.{table['.'.join(parts[2:])]}"
        else:
            name = _TOP[module]
        if name == "final_norm_out.linear":
            shift, scale = t.chunk(2, dim=0)
            t = torch.cat([scale, shift], dim=0)
        out[f"{name}.{param}"] = t
    return out


def adapter_state_dict(seed: int = 0) -> dict:
    import torch
    d_in, d_out = AR_TEXT["hidden_size"], base.T5["d_model"]
    w = RandomWeights(seed, "nexus-gen-adapter", torch.bfloat16)
    w.linear("adapter.0", d_out, d_in)
    w.norm("adapter.1.weight", d_out, "adapter.1.bias")
    w.linear("adapter.3", d_out, d_out)
    w.norm("adapter.4.weight", d_out, "adapter.4.bias")
    return w.sd


def merger_state_dict(seed: int = 0) -> dict:
    import torch
    h, f, kv, out = AR_TEXT["hidden_size"], MERGER["intermediate"], MERGER["kv_heads"], base.T5["d_model"]
    wide = out * MERGER["expand"]
    w = RandomWeights(seed, "nexus-gen-merger", torch.bfloat16)
    p = "embedding_merger.layers.0."
    w.linear(p + "self_attn.q_proj", h, h)
    w.linear(p + "self_attn.k_proj", kv * 128, h)
    w.linear(p + "self_attn.v_proj", kv * 128, h)
    w.linear(p + "self_attn.o_proj", h, h, bias=False)
    w.linear(p + "mlp.gate_proj", f, h, bias=False)
    w.linear(p + "mlp.up_proj", f, h, bias=False)
    w.linear(p + "mlp.down_proj", h, f, bias=False)
    w.norm(p + "input_layernorm.weight", h)
    w.norm(p + "post_attention_layernorm.weight", h)
    w.norm("embedding_merger.projector.0.weight", h)
    w.linear("embedding_merger.projector.1", wide, h)
    w.norm("embedding_merger.projector.2.weight", wide)
    w.linear("embedding_merger.projector.4", out, wide)
    w.norm("embedding_merger.projector.5.weight", out)
    return w.sd


def ar_config_json(tok: dict) -> dict:
    from .step1x import qwen_config_json
    cfg = qwen_config_json(tok)
    t = AR_TEXT
    cfg.update({k: t[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads")})
    cfg["max_window_layers"] = t["num_hidden_layers"]
    cfg["rope_scaling"] = {"mrope_section": t["mrope_section"], "rope_type": "default", "type": "default"}
    cfg["vision_config"]["out_hidden_size"] = t["hidden_size"]
    return cfg


def _write_ar(root: pathlib.Path, seed: int, tok: dict) -> None:
    import torch

    from ..nexus_gen.ar_model import build
    from ..step1x.encoder import qwen_config
    from .step1x import published_qwen_keys
    cfg = ar_config_json(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(qwen_config(cfg))
        # larger than the default 0.02 so the tiny model's outputs depend visibly on its inputs
        for p in model.parameters():
            if p.ndim >= 2:
                p.data.normal_(0, 1 / math.sqrt(p.shape[-1] if p.ndim == 2 else p[0].numel()))
    sd = published_qwen_keys({k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()})
    keys, weight_map = sorted(sd), {}
    for i in range(2):
        name = FILES[i]
        part = {k: sd[k] for k in keys[i::2]}
        save_safetensors(part, root / name)
        weight_map.update({k: name for k in part})
    write_json(root / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    write_json(root / "config.json", cfg)


__all__ = ["MODEL_ID", "adapter_state_dict", "diffsynth_dit_state_dict", "merger_state_dict", "nexus_gen_demo_dir",
           "write_nexus_gen_demo"]
