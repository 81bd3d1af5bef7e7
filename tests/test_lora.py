"""LoRAs in every format: detection, the mapping onto diffusers' FLUX layers (fused splits, the final-layer swap),
runtime adapters checked against the math, several at once, fp8 storage, bad files, and a whole image.

Each format's file is written here for the demo transformer (hidden 64, 2 heads x 32, 2 double + 2 single blocks,
in 64, context 32, pooled 64) with random matrices. Two independent references:

- per layer: the layer's output equals ``x @ (W + weight * scale * dW)^T + b`` with ``dW`` written out by hand from
  the file's tensors (which rows of the fused up matrix, which halves swapped);
- whole model: the LoRA merged into the weights in the file's own space (the BFL checkpoint for kohya / BFL / XLabs
  / DiffSynth, converted by the loader's BFL -> diffusers converter; the diffusers state dict for the others) gives
  the same transformer output as the base model with the runtime adapters.
"""
import copy
import json
import os
import re
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.helpers import write_sparse_safetensors
from engine.loading import build_transformer, convert_bfl_transformer, infer_transformer_config, load_models
from engine.loading.files import read_state_dict
from engine.lora import (LoraError, active_loras, attach_lora, bind, detach_loras, read_lora, set_lora_weight)

pytestmark = pytest.mark.filterwarnings("ignore")

R = 4          # rank of the test LoRAs
W = 0.7        # the weight they are attached with
FP8 = torch.float8_e4m3fn


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base(demo_dir):
    """The demo transformer (float32) and its BFL state dict, loaded once."""
    dit = load_models([demo_dir / "flux1-dev.safetensors"], torch_dtype=torch.float32)["dit"]
    bfl = {k: v.float().clone() for k, v in read_state_dict(demo_dir / "flux1-dev.safetensors").items()}
    return dit, bfl


@pytest.fixture
def dit(base):
    """The demo transformer, with every LoRA removed after the test (and checked gone)."""
    model = base[0]
    yield model
    detach_loras(model)
    assert not any(n.startswith("flux_studio_lora") for n, _ in model.named_children())
    assert not hasattr(model, "_flux_studio_lora_state")
    assert all(not m._forward_hooks for m in model.modules())


def dims(dit):
    c = dit.config
    h = c.num_attention_heads * c.attention_head_dim
    return dict(h=h, mlp=4 * h, inp=c.in_channels, ctx=c.joint_attention_dim, vec=c.pooled_projection_dim, t=256)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([0.6]), img_ids=img_ids,
                txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)


@torch.no_grad()
def run(model, seed=0):
    return model(**inputs(seed))[0]


def module(model, name):
    return dict(model.named_modules())[name]


def check_layer(model, name, dW, weight=W, dbias=None, seed=1):
    """The layer's output against x @ (W + weight * dW)^T + b (+ weight * dbias)."""
    m = module(model, name)
    x = torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got = m(x)
        b = m.bias + (weight * dbias if dbias is not None else 0)
        want = F.linear(x, m.weight + weight * dW, b)
    assert dW.abs().max() > 1e-3  # the LoRA really changes this layer
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class Maker:
    """Random LoRA matrices, and the merged change they make in the file's own space."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)
        self.delta = {}   # weight key (BFL or diffusers space) -> dW
        self.pairs = {}   # file module name -> (A, B, scale)

    def pair(self, out, inp, rank=R):
        A = torch.randn(rank, inp, generator=self.g) * 0.3
        B = torch.randn(out, rank, generator=self.g) * 0.1
        return A, B

    def add(self, key, dW, rows=None):
        if rows is not None:
            full = self.delta.get(key)
            if full is None:
                raise AssertionError("give the full shape first")
            full[rows] += dW
        else:
            self.delta[key] = self.delta.get(key, 0) + dW


def fresh(dit):
    """A new transformer of the same config (no LoRA state copied along)."""
    return build_transformer({k: v for k, v in dit.config.items() if not k.startswith("_")}).eval()


def merged_bfl(dit, bfl, delta):
    """The LoRA merged into the BFL checkpoint's weights, converted by the loader's BFL -> diffusers converter."""
    sd = {k: v.clone() for k, v in bfl.items()}
    for k, d in delta.items():
        sd[k] = sd[k] + d
    model = fresh(dit)
    model.load_state_dict(convert_bfl_transformer(sd))
    return model


def merged_diffusers(dit, delta):
    sd = {k: v.clone() for k, v in dit.state_dict().items()}
    for k, d in delta.items():
        sd[k] = sd[k] + d
    model = fresh(dit)
    model.load_state_dict(sd)
    return model


def check_model(dit, merged):
    """Base + runtime LoRA == merged weights, and the LoRA visibly changes the output."""
    got, want = run(dit), run(merged)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    saved = [(r["name"], r["weight"]) for r in active_loras(dit)]
    for name, _ in saved:
        set_lora_weight(dit, name, 0.0)
    plain = run(dit)
    for name, w in saved:
        set_lora_weight(dit, name, w)
    assert (got - plain).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------- format builders
# BFL module -> (rows of the fused weight, in, out) in the demo's widths; written out by hand.

def bfl_modules(d):
    h, mlp = d["h"], d["mlp"]
    return {
        "double_blocks.0.img_attn.qkv": (h, 3 * h), "double_blocks.1.img_attn.qkv": (h, 3 * h),
        "double_blocks.0.txt_attn.qkv": (h, 3 * h), "double_blocks.1.img_attn.proj": (h, h),
        "double_blocks.0.txt_attn.proj": (h, h), "double_blocks.0.img_mlp.0": (h, mlp),
        "double_blocks.0.img_mlp.2": (mlp, h), "double_blocks.1.txt_mlp.0": (h, mlp), "double_blocks.1.txt_mlp.2": (mlp, h),
        "double_blocks.0.img_mod.lin": (h, 6 * h), "double_blocks.1.txt_mod.lin": (h, 6 * h),
        "single_blocks.0.linear1": (h, 3 * h + mlp), "single_blocks.1.linear1": (h, 3 * h + mlp),
        "single_blocks.0.linear2": (h + mlp, h), "single_blocks.1.modulation.lin": (h, 3 * h),
        "final_layer.adaLN_modulation.1": (h, 2 * h), "final_layer.linear": (h, d["inp"]),
        "img_in": (d["inp"], h), "txt_in": (d["ctx"], h), "time_in.in_layer": (d["t"], h),
        "vector_in.out_layer": (h, h), "guidance_in.in_layer": (d["t"], h),
    }


def make_kohya(d, seed=10):
    mk, sd = Maker(seed), {}
    for i, (bfl, (inp, out)) in enumerate(bfl_modules(d).items()):
        A, B = mk.pair(out, inp)
        alpha = float(R) * (0.5 + 0.25 * (i % 4))      # scales 0.5 .. 1.25
        key = "lora_unet_" + bfl.replace(".", "_")
        sd.update({f"{key}.lora_down.weight": A, f"{key}.lora_up.weight": B, f"{key}.alpha": torch.tensor(alpha)})
        mk.pairs[key] = (A, B, alpha / R)
        mk.add(f"{bfl}.weight", alpha / R * B @ A)
    # a block-diagonal fused LoRA (as converters from per-projection LoRAs write them): A [3r, h], B [3h, 3r]
    h = d["h"]
    A = torch.randn(3 * R, h, generator=mk.g) * 0.3
    B = torch.zeros(3 * h, 3 * R)
    for j in range(3):
        B[j * h:(j + 1) * h, j * R:(j + 1) * R] = torch.randn(h, R, generator=mk.g) * 0.1
    key = "lora_unet_double_blocks_1_txt_attn_qkv"
    sd.update({f"{key}.lora_down.weight": A, f"{key}.lora_up.weight": B, f"{key}.alpha": torch.tensor(float(3 * R))})
    mk.pairs[key] = (A, B, 1.0)
    mk.add("double_blocks.1.txt_attn.qkv.weight", B @ A)
    # a CLIP-L part, as real kohya FLUX LoRAs often carry: reported, not applied
    A, B = mk.pair(64, 64)
    sd.update({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": A,
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": B,
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(float(R))})
    return sd, {"ss_network_dim": str(R)}, mk


def make_bfl(d, seed=11):
    """ComfyUI / BFL control-LoRA naming: diffusion_model. + BFL path, lora_A/lora_B, some lora_B biases."""
    mk, sd = Maker(seed), {}
    for i, (bfl, (inp, out)) in enumerate(bfl_modules(d).items()):
        A, B = mk.pair(out, inp)
        key = f"diffusion_model.{bfl}"
        sd.update({f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B})
        mk.pairs[key] = (A, B, 1.0)
        mk.add(f"{bfl}.weight", B @ A)
        if i % 3 == 0 or bfl == "final_layer.adaLN_modulation.1":
            b = torch.randn(out, generator=mk.g) * 0.1
            sd[f"{key}.lora_B.bias"] = b
            mk.add(f"{bfl}.bias", b)
    sd["diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"] = torch.ones(d["h"] // 2)  # not a LoRA pair
    return sd, {}, mk


def make_xlabs(d, seed=12):
    mk, sd = Maker(seed), {}
    h, mlp = d["h"], d["mlp"]
    spec = {  # XLabs processor layer -> (BFL weight, rows it adds to, in, out)
        "double_blocks.0.processor.qkv_lora1": ("double_blocks.0.img_attn.qkv", None, h, 3 * h),
        "double_blocks.0.processor.proj_lora1": ("double_blocks.0.img_attn.proj", None, h, h),
        "double_blocks.1.processor.qkv_lora2": ("double_blocks.1.txt_attn.qkv", None, h, 3 * h),
        "double_blocks.1.processor.proj_lora2": ("double_blocks.1.txt_attn.proj", None, h, h),
        "single_blocks.0.processor.qkv_lora": ("single_blocks.0.linear1", slice(0, 3 * h), h, 3 * h),
        "single_blocks.1.processor.qkv_lora": ("single_blocks.1.linear1", slice(0, 3 * h), h, 3 * h),
        "single_blocks.1.processor.proj_lora": ("single_blocks.1.linear2", None, h + mlp, h),
    }
    for key, (bfl, rows, inp, out) in spec.items():
        A, B = mk.pair(out, inp)
        sd.update({f"{key}.down.weight": A, f"{key}.up.weight": B})
        mk.pairs[key] = (A, B, 1.0)
        if rows is None:
            mk.add(f"{bfl}.weight", B @ A)
        else:
            full = torch.zeros(3 * h + mlp, h)
            full[rows] = B @ A
            mk.add(f"{bfl}.weight", full)
    return sd, {}, mk


# DiffSynth's FluxDiT names and the BFL weights they are (its state-dict converter's table)
DIFFSYNTH_TO_BFL = {
    "blocks.0.attn.a_to_qkv": "double_blocks.0.img_attn.qkv", "blocks.1.attn.b_to_qkv": "double_blocks.1.txt_attn.qkv",
    "blocks.0.attn.a_to_out": "double_blocks.0.img_attn.proj", "blocks.1.attn.b_to_out": "double_blocks.1.txt_attn.proj",
    "blocks.0.ff_a.0": "double_blocks.0.img_mlp.0", "blocks.0.ff_a.2": "double_blocks.0.img_mlp.2",
    "blocks.1.ff_b.0": "double_blocks.1.txt_mlp.0", "blocks.1.ff_b.2": "double_blocks.1.txt_mlp.2",
    "blocks.0.norm1_a.linear": "double_blocks.0.img_mod.lin", "blocks.1.norm1_b.linear": "double_blocks.1.txt_mod.lin",
    "single_blocks.0.to_qkv_mlp": "single_blocks.0.linear1", "single_blocks.1.to_qkv_mlp": "single_blocks.1.linear1",
    "single_blocks.0.proj_out": "single_blocks.0.linear2", "single_blocks.1.norm.linear": "single_blocks.1.modulation.lin",
    "final_norm_out.linear": "final_layer.adaLN_modulation.1", "final_proj_out": "final_layer.linear",
    "x_embedder": "img_in", "context_embedder": "txt_in", "time_embedder.timestep_embedder.0": "time_in.in_layer",
    "pooled_text_embedder.2": "vector_in.out_layer", "guidance_embedder.timestep_embedder.0": "guidance_in.in_layer",
}


def make_diffsynth(d, seed=13):
    """DiffSynth's trainer: PEFT on its FluxDiT, saved as <module>.lora_A.default.weight (shared A on fused layers)."""
    mk, sd = Maker(seed), {}
    shapes = {re.sub(r"\.\d+\.", ".N.", k): v for k, v in bfl_modules(d).items()}
    for ds, bfl in DIFFSYNTH_TO_BFL.items():
        inp, out = shapes[re.sub(r"\.\d+\.", ".N.", bfl)]
        A, B = mk.pair(out, inp)
        sd.update({f"{ds}.lora_A.default.weight": A, f"{ds}.lora_B.default.weight": B})
        mk.pairs[ds] = (A, B, 1.0)
        mk.add(f"{bfl}.weight", B @ A)
    return sd, {}, mk


DIFFUSERS_LAYERS = (
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.1.attn.to_v",
    "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.1.attn.add_v_proj", "transformer_blocks.0.attn.to_out.0",
    "transformer_blocks.1.attn.to_add_out", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
    "transformer_blocks.1.ff_context.net.0.proj", "transformer_blocks.1.ff_context.net.2",
    "transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1_context.linear",
    "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_k", "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.1.proj_out", "single_transformer_blocks.0.norm.linear", "norm_out.linear", "proj_out",
    "x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
)


def make_diffusers(dit, seed=14, prefix="transformer.", suffix=("lora_A.weight", "lora_B.weight"), alpha=None,
                   kohya_prefix=None):
    """diffusers / PEFT (and, with kohya_prefix, OneTrainer's kohya-style names over the diffusers path)."""
    mk, sd = Maker(seed), {}
    layers = dict(dit.named_modules())
    for i, name in enumerate(DIFFUSERS_LAYERS):
        m = layers[name]
        A, B = mk.pair(m.out_features, m.in_features)
        if kohya_prefix:
            key = kohya_prefix + name.replace(".", "_")
            a = float(R) * (0.5 + 0.5 * (i % 3))
            sd.update({f"{key}.lora_down.weight": A, f"{key}.lora_up.weight": B, f"{key}.alpha": torch.tensor(a)})
            scale = a / R
        else:
            key = prefix + name
            sd.update({f"{key}.{suffix[0]}": A, f"{key}.{suffix[1]}": B})
            scale = 1.0 if alpha is None else alpha / R
        mk.pairs[key] = (A, B, scale)
        mk.add(f"{name}.weight", scale * B @ A)
    return sd, mk


def write(tmp_path, name, sd, metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata or None)
    return path


# --------------------------------------------------------------------------------------------------- the formats


def test_kohya(dit, base, tmp_path):
    d = dims(dit)
    h = d["h"]
    sd, meta, mk = make_kohya(d)
    path = write(tmp_path, "kohya_style.safetensors", sd, meta)
    info = read_lora(path)
    assert info.format == "kohya" and info.rank == R and info.path == str(path)
    rep = attach_lora(dit, path, weight=W)
    assert rep["format"] == "kohya" and rep["name"] == "kohya_style"
    assert rep["pairs"] == rep["pairs_bound"] == len(mk.pairs)
    assert rep["bound"] == rep["total"] == len(info.targets)
    assert rep["text_encoder"] == 1 and any("text-encoder" in s for s in rep["skipped"])

    A, B, s = mk.pairs["lora_unet_double_blocks_1_img_attn_qkv"]
    check_layer(dit, "transformer_blocks.1.attn.to_k", s * B[h:2 * h] @ A)          # the k rows of the fused qkv
    A, B, s = mk.pairs["lora_unet_single_blocks_0_linear1"]
    check_layer(dit, "single_transformer_blocks.0.proj_mlp", s * B[3 * h:] @ A)     # the mlp rows of linear1
    check_layer(dit, "single_transformer_blocks.0.attn.to_v", s * B[2 * h:3 * h] @ A)
    A, B, s = mk.pairs["lora_unet_double_blocks_0_img_mod_lin"]
    check_layer(dit, "transformer_blocks.0.norm1.linear", s * B @ A)                  # modulation: same row order
    A, B, s = mk.pairs["lora_unet_final_layer_adaLN_modulation_1"]
    check_layer(dit, "norm_out.linear", s * torch.cat([B[h:], B[:h]]) @ A)           # (shift, scale) -> (scale, shift)
    A, B, s = mk.pairs["lora_unet_double_blocks_1_txt_attn_qkv"]                     # block-diagonal: rank split too
    check_layer(dit, "transformer_blocks.1.attn.add_v_proj", s * B[2 * h:] @ A)
    assert info.targets["transformer_blocks.1.attn.add_v_proj"][0].shape[0] == R
    assert info.targets["transformer_blocks.1.attn.to_k"][0].shape[0] == R

    check_model(dit, merged_bfl(dit, base[1], {k: W * v for k, v in mk.delta.items()}))


def test_bfl_naming_with_biases(dit, base, tmp_path):
    d = dims(dit)
    h = d["h"]
    sd, meta, mk = make_bfl(d)
    path = write(tmp_path, "comfy_bfl.safetensors", sd)
    info = read_lora(path)
    assert info.format == "BFL" and len(info.ignored) == 1
    rep = attach_lora(dit, path, weight=W)
    assert rep["pairs"] == rep["pairs_bound"] == len(mk.pairs) and rep["ignored"] == 1
    A, B, _ = mk.pairs["diffusion_model.final_layer.adaLN_modulation.1"]
    bias = sd["diffusion_model.final_layer.adaLN_modulation.1.lora_B.bias"]
    check_layer(dit, "norm_out.linear", torch.cat([B[h:], B[:h]]) @ A, dbias=torch.cat([bias[h:], bias[:h]]))
    A, B, _ = mk.pairs["diffusion_model.double_blocks.0.img_attn.qkv"]
    bias = sd["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.bias"]
    check_layer(dit, "transformer_blocks.0.attn.to_q", B[:h] @ A, dbias=bias[:h])
    check_model(dit, merged_bfl(dit, base[1], {k: W * v for k, v in mk.delta.items()}))


def test_xlabs(dit, base, tmp_path):
    d = dims(dit)
    h = d["h"]
    sd, meta, mk = make_xlabs(d)
    path = write(tmp_path, "xlabs_lora.safetensors", sd)
    assert read_lora(path).format == "XLabs"
    rep = attach_lora(dit, path, weight=W)
    assert rep["pairs"] == rep["pairs_bound"] == 7 and rep["bound"] == rep["total"] == 15
    A, B, _ = mk.pairs["single_blocks.1.processor.qkv_lora"]                         # q|k|v only: 3h rows
    check_layer(dit, "single_transformer_blocks.1.attn.to_k", B[h:2 * h] @ A)
    A, B, _ = mk.pairs["double_blocks.1.processor.qkv_lora2"]
    check_layer(dit, "transformer_blocks.1.attn.add_q_proj", B[:h] @ A)
    check_model(dit, merged_bfl(dit, base[1], {k: W * v for k, v in mk.delta.items()}))


def test_diffsynth(dit, base, tmp_path):
    d = dims(dit)
    h = d["h"]
    sd, meta, mk = make_diffsynth(d)
    path = write(tmp_path, "diffsynth_lora.safetensors", sd)
    assert read_lora(path).format == "DiffSynth"
    rep = attach_lora(dit, path, weight=W)
    assert rep["pairs"] == rep["pairs_bound"] == len(DIFFSYNTH_TO_BFL) and rep["skipped"] == []
    A, B, _ = mk.pairs["single_blocks.1.to_qkv_mlp"]
    check_layer(dit, "single_transformer_blocks.1.proj_mlp", B[3 * h:] @ A)
    A, B, _ = mk.pairs["blocks.1.attn.b_to_qkv"]
    check_layer(dit, "transformer_blocks.1.attn.add_k_proj", B[h:2 * h] @ A)
    A, B, _ = mk.pairs["blocks.1.norm1_b.linear"]
    check_layer(dit, "transformer_blocks.1.norm1_context.linear", B @ A)
    A, B, _ = mk.pairs["final_norm_out.linear"]
    check_layer(dit, "norm_out.linear", torch.cat([B[h:], B[:h]]) @ A)
    check_model(dit, merged_bfl(dit, base[1], {k: W * v for k, v in mk.delta.items()}))


def test_kohya_matches_diffusers_converter(dit):
    """Parity with diffusers' own kohya -> diffusers converter on everything it can convert at this width (it
    hard-codes linear1's split as 3 x 3072 + 12288, and ignores the final layer's alphas, so those are left out)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    sd, _, _ = make_kohya(dims(dit), seed=15)
    sd = {k: v for k, v in sd.items() if "linear1" not in k and not k.startswith("lora_te")}
    for key in ("lora_unet_final_layer_adaLN_modulation_1", "lora_unet_final_layer_linear"):
        sd[f"{key}.alpha"] = torch.tensor(float(R))   # diffusers drops the final layer's alphas
    ref = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    ref = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in ref.items()}
    want = {k[: -len(".lora_A.weight")]: ref[k.replace("lora_A", "lora_B")] @ v
            for k, v in ref.items() if k.endswith(".lora_A.weight")}
    info = read_lora(sd)
    assert info.format == "kohya" and set(info.targets) == set(want)
    for name, (A, B, scale) in info.targets.items():
        torch.testing.assert_close(scale * B @ A, want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", ["diffusers", "peft", "ai-toolkit", "onetrainer"])
def test_diffusers_family(dit, tmp_path, variant):
    meta, expected = None, {"diffusers": "diffusers/PEFT", "peft": "diffusers/PEFT", "ai-toolkit": "ai-toolkit",
                            "onetrainer": "OneTrainer"}[variant]
    if variant == "diffusers":   # alpha from diffusers' lora_adapter_metadata: scale 8 / 4 = 2
        sd, mk = make_diffusers(dit, alpha=8.0)
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"transformer.r": R, "transformer.lora_alpha": 8})}
    elif variant == "peft":      # PEFT's own save: base_model.model. prefix, .default. adapter name, no alpha
        sd, mk = make_diffusers(dit, prefix="base_model.model.", suffix=("lora_A.default.weight", "lora_B.default.weight"))
    elif variant == "ai-toolkit":
        sd, mk = make_diffusers(dit)
        meta = {"format": "pt", "software": json.dumps({"name": "ai-toolkit", "url": "https://github.com/ostris/ai-toolkit"}),
                "name": "my_lora"}
    else:
        sd, mk = make_diffusers(dit, kohya_prefix="lora_transformer_")
    path = write(tmp_path, f"{variant}.safetensors", sd, meta)
    info = read_lora(path)
    assert info.format == expected
    rep = attach_lora(dit, path, weight=W)
    assert rep["format"] == expected and rep["bound"] == rep["total"] == rep["pairs"] == len(DIFFUSERS_LAYERS)
    key = next(k for k in mk.pairs if k.endswith(("norm_out.linear", "norm_out_linear")))
    A, B, s = mk.pairs[key]
    check_layer(dit, "norm_out.linear", s * B @ A)                                   # diffusers naming: no swap
    key = next(k for k in mk.pairs if "single_transformer_blocks" in k and k.endswith(("proj_mlp",)))
    A, B, s = mk.pairs[key]
    check_layer(dit, "single_transformer_blocks.0.proj_mlp", s * B @ A)
    check_model(dit, merged_diffusers(dit, {k: W * v for k, v in mk.delta.items()}))


# --------------------------------------------------------------------------------------------------- manifests


DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@pytest.fixture(scope="module")
def meta_flux_dev(manifests_dir):
    m = json.loads((manifests_dir / "FLUX.1-dev" / "flux1-dev.safetensors.json").read_text())
    sd = {k: torch.empty(v["shape"], dtype=DT[v["dtype"]], device="meta") for k, v in m["tensors"].items()}
    with torch.device("meta"):
        return build_transformer(infer_transformer_config(sd))


@pytest.mark.parametrize("name,fmt", [("kohya-flux1-dev-r16.safetensors", "kohya"),
                                      ("diffusers-peft-flux1-dev-r16.safetensors", "diffusers/PEFT")])
def test_manifest_loras_bind_fully_on_meta(manifests_dir, meta_flux_dev, tmp_path, name, fmt):
    m = json.loads((manifests_dir / "loras" / f"{name}.json").read_text())
    pairs = sum(k.endswith((".lora_down.weight", ".lora_A.weight")) for k in m["tensors"])
    path = tmp_path / name
    write_sparse_safetensors(m["tensors"], path)          # header-exact, data a sparse hole: the real file-reading path
    info = read_lora(path, device="meta")
    assert info.format == fmt and info.rank == 16 and info.pairs == pairs
    _, rep = bind(meta_flux_dev, info)
    assert rep["pairs_bound"] == rep["pairs"] == pairs
    assert rep["bound"] == rep["total"] == 418 and rep["skipped"] == []   # every attention + MLP linear, split
    rep = attach_lora(meta_flux_dev, info)
    assert rep["bound"] == 418 and active_loras(meta_flux_dev)[0]["format"] == fmt
    assert len([mm for mm in meta_flux_dev.modules() if mm._forward_hooks]) == 418
    detach_loras(meta_flux_dev)
    assert not any(mm._forward_hooks for mm in meta_flux_dev.modules())
    peft = json.loads((manifests_dir / "loras" / "diffusers-peft-flux1-dev-r16.safetensors.json").read_text())
    peft_layers = {k[len("transformer."): -len(".lora_B.weight")]: v["shape"] for k, v in peft["tensors"].items()
                   if k.endswith(".lora_B.weight")}
    # both manifests reach the same layers (the manifests' README: diffusers' converter maps one onto the other)
    assert {t: list(B.shape[:1]) for t, (A, B, s) in info.targets.items()} == {k: v[:1] for k, v in peft_layers.items()}
    if fmt == "kohya":  # the fused qkv / linear1 of the real widths: 3 x 3072 and 3 x 3072 + 12288
        assert info.targets["single_transformer_blocks.0.proj_mlp"][1].shape == (12288, 16)
        assert info.targets["transformer_blocks.0.attn.add_v_proj"][1].shape == (3072, 16)


# ------------------------------------------------------------------------------------------- several, weights


def test_several_loras_weights_and_exact_removal(dit, tmp_path):
    d = dims(dit)
    base_out = run(dit)
    k_sd, _, k = make_kohya(d, seed=20)
    s_sd, _, s = make_diffsynth(d, seed=21)
    p_sd, p = make_diffusers(dit, seed=22)
    pk, ps, pp = (write(tmp_path, n, sd) for n, sd in (("a.safetensors", k_sd), ("b.safetensors", s_sd),
                                                        ("c.safetensors", p_sd)))
    attach_lora(dit, pk, weight=0.5)
    attach_lora(dit, ps, weight=1.0, name="style")
    attach_lora(dit, pp, weight=-0.3)
    assert [(r["name"], r["weight"], r["format"]) for r in active_loras(dit)] == [
        ("a", 0.5, "kohya"), ("style", 1.0, "DiffSynth"), ("c", -0.3, "diffusers/PEFT")]
    # one hook per layer, however many LoRAs share it
    to_q = module(dit, "transformer_blocks.0.attn.to_q")
    assert len(to_q._forward_hooks) == 1
    # the sum of the three, on a layer all three touch
    h = d["h"]
    Ak, Bk, sk = k.pairs["lora_unet_double_blocks_0_img_attn_qkv"]
    As, Bs, _ = s.pairs["blocks.0.attn.a_to_qkv"]
    Ap, Bp, _ = p.pairs["transformer.transformer_blocks.0.attn.to_q"]
    dW = 0.5 * sk * Bk[:h] @ Ak + 1.0 * Bs[:h] @ As - 0.3 * Bp @ Ap
    check_layer(dit, "transformer_blocks.0.attn.to_q", dW, weight=1.0)
    all3 = run(dit)
    set_lora_weight(dit, "style", 0.25)            # a weight change: no reload, the new sum
    check_layer(dit, "transformer_blocks.0.attn.to_q", 0.5 * sk * Bk[:h] @ Ak + 0.25 * Bs[:h] @ As - 0.3 * Bp @ Ap,
                weight=1.0)
    assert not torch.equal(run(dit), all3)
    set_lora_weight(dit, "style", 1.0)
    assert torch.equal(run(dit), all3)
    assert detach_loras(dit, "style") == ["style"]
    check_layer(dit, "transformer_blocks.0.attn.to_q", 0.5 * sk * Bk[:h] @ Ak - 0.3 * Bp @ Ap, weight=1.0)
    assert len(to_q._forward_hooks) == 1
    # attaching the same file again under the same name replaces it (still one hook, the new weight)
    attach_lora(dit, pk, weight=0.5)
    attach_lora(dit, pk, weight=0.8)
    assert [(r["name"], r["weight"]) for r in active_loras(dit)] == [("a", 0.8), ("c", -0.3)]
    assert len(to_q._forward_hooks) == 1
    # a changed file under the same name is read again
    k2_sd, _, k2 = make_kohya(d, seed=23)
    write(tmp_path, "a.safetensors", k2_sd)
    os.utime(pk, ns=(1, 1))
    attach_lora(dit, pk, weight=1.0)
    A2, B2, s2 = k2.pairs["lora_unet_double_blocks_0_img_attn_qkv"]
    check_layer(dit, "transformer_blocks.0.attn.to_q", s2 * B2[:h] @ A2 - 0.3 * Bp @ Ap, weight=1.0)
    # another file with the same stem gets its own name instead of replacing "a"
    other = tmp_path / "sub"
    other.mkdir()
    rep = attach_lora(dit, write(other, "a.safetensors", k_sd), weight=0.1)
    assert rep["name"] == "a (2)" and [r["name"] for r in active_loras(dit)] == ["c", "a", "a (2)"]
    detach_loras(dit, ["a (2)", "no such name"])
    assert detach_loras(dit) == ["c", "a"]
    assert torch.equal(run(dit), base_out)         # exactly the base model again
    assert not any(m._forward_hooks for m in dit.modules())


def test_adapters_are_buffers_not_state(base, tmp_path):
    dit = copy.deepcopy(base[0])                    # casts below would round the shared model's weights
    sd, _, _ = make_kohya(dims(dit), seed=30)
    keys = set(dit.state_dict())
    n_buffers = len(list(dit.buffers()))
    attach_lora(dit, write(tmp_path, "k.safetensors", sd))
    assert set(dit.state_dict()) == keys            # saving the model is unaffected
    assert len(list(dit.buffers())) > n_buffers     # .to(device) moves them with the model
    bank = dit.flux_studio_lora_1
    dit.to(torch.float16)                           # a float cast follows ...
    assert all(b.dtype == torch.float16 for b in bank.buffers())
    dit.to(FP8)                                     # ... a cast to fp8 does not touch the LoRA
    assert all(b.dtype == torch.float16 for b in bank.buffers())
    dit.to(torch.float32)
    assert all(b.dtype == torch.float32 for b in bank.buffers())
    assert active_loras(dit)[0]["bytes"] > 0


def test_weight_zero_is_the_base_model(dit, tmp_path):
    base_out = run(dit)
    sd, _, _ = make_kohya(dims(dit), seed=31)
    attach_lora(dit, write(tmp_path, "k.safetensors", sd), weight=0.0)
    assert torch.equal(run(dit), base_out)


# ---------------------------------------------------------------------------------------------------- fp8, offload


def test_fp8_storage(base, tmp_path):
    from diffusers.hooks import apply_layerwise_casting

    dit8 = copy.deepcopy(base[0])
    apply_layerwise_casting(dit8, storage_dtype=FP8, compute_dtype=torch.float32)
    d = dims(dit8)
    h = d["h"]
    to_k = module(dit8, "transformer_blocks.1.attn.to_k")
    assert to_k.weight.dtype == FP8
    x = torch.randn(5, h, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain_layer, plain = to_k(x), run(dit8)
    sd, _, mk = make_kohya(d, seed=40)
    rep = attach_lora(dit8, write(tmp_path, "k.safetensors", sd), weight=W)
    assert rep["bound"] == rep["total"]
    assert all(b.dtype == torch.float32 for b in dit8.flux_studio_lora_1.buffers())  # the LoRA is not stored in fp8
    A, B, s = mk.pairs["lora_unet_double_blocks_1_img_attn_qkv"]
    with torch.no_grad():
        got = to_k(x) - plain_layer
    assert to_k.weight.dtype == FP8                 # the base weight is still stored in fp8 after the call
    torch.testing.assert_close(got, W * s * (x @ A.T) @ B[h:2 * h].T, rtol=1e-5, atol=1e-5)
    with_lora = run(dit8)
    assert torch.isfinite(with_lora).all() and (with_lora - plain).abs().max() > 1e-2
    detach_loras(dit8)
    assert torch.equal(run(dit8), plain)


def test_offloading_hooks_compose(base, tmp_path):
    """diffusers' group offloading (block level) before or after attaching: same output as the resident model."""
    from diffusers.hooks import apply_group_offloading

    sd, _, _ = make_kohya(dims(base[0]), seed=41)
    path = write(tmp_path, "k.safetensors", sd)
    ref = copy.deepcopy(base[0])
    attach_lora(ref, path, weight=W)
    want = run(ref)
    cpu = torch.device("cpu")
    for order in ("before", "after"):
        model = copy.deepcopy(base[0])
        if order == "after":
            attach_lora(model, path, weight=W)
        apply_group_offloading(model, onload_device=cpu, offload_device=cpu, offload_type="block_level",
                               num_blocks_per_group=1)
        tensors = {n: {id(t) for t in (*m.parameters(), *m.buffers())} for n, m in model.named_modules()}
        if order == "before":
            attach_lora(model, path, weight=W)
        # no module that existed (and that offloading groups may have listed) gained tensors: streams stay safe
        assert all({id(t) for t in (*m.parameters(), *m.buffers())} == tensors[n]
                   for n, m in model.named_modules() if n in tensors and n != "")
        torch.testing.assert_close(run(model), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ errors


def sd15_kohya():
    g = torch.Generator().manual_seed(50)
    sd = {}
    for key, (out, inp) in {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
        "lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": (1280, 5120),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    }.items():
        sd[f"{key}.lora_down.weight"] = torch.randn(R, inp, generator=g)
        sd[f"{key}.lora_up.weight"] = torch.randn(out, R, generator=g)
        sd[f"{key}.alpha"] = torch.tensor(float(R))
    return sd


def test_errors_name_the_problem_and_leave_the_model_usable(dit, demo_dir, tmp_path):
    base_out = run(dit)
    # an SD 1.5 LoRA: binds to nothing
    path = write(tmp_path, "sd15_style.safetensors", sd15_kohya())
    with pytest.raises(LoraError) as e:
        attach_lora(dit, path)
    msg = str(e.value)
    assert "kohya" in msg and "Stable Diffusion 1.x" in msg and "does not have" in msg and "sd15_style" in msg
    assert "lora_unet_down_blocks_0_attentions_0" in msg
    # a FLUX LoRA for the full-size model: names fit, widths do not
    big = {}
    for key in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear2"):
        big[f"{key}.lora_down.weight"] = torch.zeros(R, 3072 if "qkv" in key else 15360)
        big[f"{key}.lora_up.weight"] = torch.zeros(9216 if "qkv" in key else 3072, R)
    with pytest.raises(LoraError, match=r"kohya.*another size.*3072"):
        attach_lora(dit, write(tmp_path, "full_size.safetensors", big))
    # binds to under half of its targets
    sd, _, _ = make_kohya(dims(dit), seed=51)
    few_ok = {k: v for k, v in sd.items() if k.startswith("lora_unet_double_blocks_1_img_attn_proj")}
    for i in range(3):
        few_ok[f"lora_unet_joint_blocks_{i}_x_block_attn_qkv.lora_down.weight"] = torch.zeros(R, 64)
        few_ok[f"lora_unet_joint_blocks_{i}_x_block_attn_qkv.lora_up.weight"] = torch.zeros(192, R)
    with pytest.raises(LoraError, match=r"binds to 1 of its 4 targets.*joint_blocks"):
        attach_lora(dit, write(tmp_path, "mostly_other.safetensors", few_ok))
    # binds to most: attached, the rest reported
    most = {k: v for k, v in sd.items() if not k.startswith("lora_te")}
    most["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"] = torch.zeros(R, 64)
    most["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"] = torch.zeros(192, R)
    rep = attach_lora(dit, write(tmp_path, "mostly_flux.safetensors", most))
    assert rep["bound"] == rep["total"] - 1 and any("joint_blocks_0" in s for s in rep["skipped"])
    detach_loras(dit)
    # files that are not LoRAs at all
    with pytest.raises(LoraError, match=r"flux1-dev\.safetensors holds a FLUX transformer.*not a LoRA"):
        read_lora(demo_dir / "flux1-dev.safetensors")
    with pytest.raises(LoraError, match=r"ae\.safetensors holds a FLUX VAE.*not a LoRA"):
        read_lora(demo_dir / "ae.safetensors")
    # corrupt, truncated, missing, wrong kind
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 3 + b"garbage" * 10)
    with pytest.raises(LoraError, match="broken.safetensors"):
        read_lora(bad)
    good = write(tmp_path, "cut.safetensors", sd)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraError, match=r"cut\.safetensors is truncated"):
        attach_lora(dit, good)
    with pytest.raises(LoraError, match=r"missing\.safetensors does not exist"):
        attach_lora(dit, tmp_path / "missing.safetensors")
    html = tmp_path / "page.safetensors"
    html.write_text("<!DOCTYPE html><html>rate limited</html>" + " " * 200)
    with pytest.raises(LoraError, match=r"page\.safetensors is an HTML page"):
        attach_lora(dit, html)
    pickle = tmp_path / "junk.bin"
    pickle.write_bytes(b"not a pickle at all")
    with pytest.raises(LoraError, match=r"junk\.bin could not be read"):
        attach_lora(dit, pickle)
    # a DoRA is refused rather than applied wrongly
    dora = dict(sd)
    dora["lora_unet_double_blocks_1_img_attn_proj.dora_scale"] = torch.ones(1, 64)
    with pytest.raises(LoraError, match="DoRA"):
        read_lora(write(tmp_path, "dora.safetensors", dora))
    # nothing was left behind, and a good LoRA still attaches
    assert active_loras(dit) == [] and torch.equal(run(dit), base_out)
    rep = attach_lora(dit, write(tmp_path, "fine.safetensors", sd))
    assert rep["bound"] == rep["total"]
    assert not torch.equal(run(dit), base_out)


def test_text_encoder_only_lora_is_an_error(dit, tmp_path):
    sd = {k: v for k, v in sd15_kohya().items() if k.startswith("lora_te")}
    with pytest.raises(LoraError, match="only holds text-encoder layers"):
        attach_lora(dit, write(tmp_path, "te_only.safetensors", sd))


def test_bin_and_state_dict_inputs(dit, tmp_path):
    p_sd, p = make_diffusers(dit, seed=60)
    path = tmp_path / "pytorch_lora_weights.bin"
    torch.save(p_sd, path)
    assert read_lora(path).format == "diffusers/PEFT"
    rep = attach_lora(dit, tmp_path, weight=1.0, name="folder")    # a folder with diffusers' file name
    assert rep["bound"] == len(DIFFUSERS_LAYERS)
    A, B, _ = p.pairs["transformer.transformer_blocks.0.attn.to_q"]
    check_layer(dit, "transformer_blocks.0.attn.to_q", B @ A, weight=1.0)
    info = read_lora(p_sd)
    assert info.format == "diffusers/PEFT" and info.path == "<state dict>"


def test_peft_adapter_config_alpha(dit, tmp_path):
    """PEFT's save_pretrained folder: adapter_model.safetensors + adapter_config.json (lora_alpha, alpha_pattern)."""
    p_sd, _ = make_diffusers(dit, seed=61, prefix="base_model.model.")
    folder = tmp_path / "peft_adapter"
    folder.mkdir()
    write(folder, "adapter_model.safetensors", p_sd)
    (folder / "adapter_config.json").write_text(json.dumps({"r": R, "lora_alpha": 16, "alpha_pattern": {"proj_out": 4},
                                                             "peft_type": "LORA"}))
    info = read_lora(folder)
    assert info.format == "diffusers/PEFT"
    assert info.targets["transformer_blocks.0.attn.to_q"][2] == 16 / R
    assert info.targets["proj_out"][2] == info.targets["single_transformer_blocks.1.proj_out"][2] == 4 / R
    (folder / "adapter_config.json").write_text(json.dumps({"r": R, "lora_alpha": 8, "use_rslora": True}))
    assert read_lora(folder).targets["x_embedder"][2] == 8 / math.sqrt(R)


# ------------------------------------------------------------------------------------------------- end to end


def test_image_changes_with_a_lora_and_returns_when_detached(demo_dir, tmp_path):
    from engine import FluxImagePipeline, ModelConfig

    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=demo_dir / f) for f in ("flux1-dev.safetensors", "ae.safetensors",
                                                                "text_encoder/model.safetensors", "text_encoder_2")],
        tokenizer_1_config=ModelConfig(path=demo_dir / "tokenizer"),
        tokenizer_2_config=ModelConfig(path=demo_dir / "tokenizer_2"))
    kw = dict(prompt="a red fox in the snow", height=64, width=64, seed=5, num_inference_steps=3)
    before = np.asarray(pipe(**kw))
    sd, _, _ = make_kohya(dims(pipe.dit), seed=70)
    rep = attach_lora(pipe.dit, write(tmp_path, "style.safetensors", sd), weight=1.0)
    assert rep["bound"] == rep["total"]
    with_lora = np.asarray(pipe(**kw))
    again = np.asarray(pipe(**kw))                  # kept across generations, not re-applied
    assert np.abs(with_lora.astype(int) - before.astype(int)).mean() > 1
    assert np.array_equal(with_lora, again)
    detach_loras(pipe.dit)
    assert np.array_equal(np.asarray(pipe(**kw)), before)
